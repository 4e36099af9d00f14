"""benchmarks/bench_adapters.py runs end to end on the tiny preset (both modes' code paths)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_adapters

    return bench_adapters


def test_methods_mode_on_tiny_llava(tmp_path, capsys):
    out = tmp_path / "perf.md"
    out.write_text("# x\n\n<!-- bench:methods:start -->\nold\n<!-- bench:methods:end -->\n")
    code = _bench().main(["--model", "tiny-llava", "--methods", "vanilla,fastv,visionzip", "--budgets", "64",
                          "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--write", str(out)])
    assert code == 0
    text = out.read_text()
    assert "old" not in text and "| vanilla | - | 64.0 |" in text
    assert "| fastv | 64 |" in text and "| visionzip | 64 | 7.0 |" in text  # 64 of 576 -> 7 of 64 tokens
    assert "Oracle (stock model" in text and "k=64" in text and "k=7" in text


def test_growth_mode_on_tiny_qwen(tmp_path):
    out = tmp_path / "perf.md"
    code = _bench().main(["--mode", "growth", "--model", "tiny-qwen", "--tokens", "12,20", "--growth-methods",
                          "fastv", "--growth-budget", "8", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                          "--write", str(out)])
    assert code == 0
    text = out.read_text()
    assert "| 12 (3x4) | vanilla | 12.0 |" in text and "| 20 (4x5) | fastv 8 |" in text


def test_profile_nodes_names_the_nodes(capsys):
    _bench()
    import profile_nodes

    code = profile_nodes.main(["--methods", "visionzip", "--budgets", "64", "--repeats", "1", "--warmup", "0",
                               "--vision-layers", "2", "--vision-hidden", "32", "--llm-layers", "2", "--llm-hidden", "64",
                               "--cprofile", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "## visionzip 64: prefill" in out
    assert out.count(" ms\n") >= 3  # one line per node
    assert "cumulative" in out or "Ordered by" in out


@pytest.mark.slow
def test_methods_mode_on_the_qwen_line_with_oracle_and_stock(tmp_path):
    """The real-shape random Qwen2-VL / Qwen3-VL builders (here at toy widths), the Qwen oracle
    (DeepStack rows of the k tokens fed too) and the stock model's generate next to vanilla."""
    for model in ("random-qwen2-vl", "random-qwen3-vl"):
        out = tmp_path / f"{model}.md"
        code = _bench().main(["--model", model, "--methods", "vanilla,random", "--budgets", "64", "--repeats", "1",
                              "--warmup", "0", "--new-tokens", "2", "--vision-layers", "3", "--vision-hidden", "64",
                              "--llm-layers", "2", "--llm-hidden", "128", "--write", str(out)]
                             + (["--interleave", "--stat", "min"] if model == "random-qwen3-vl" else []))
        assert code == 0
        text = out.read_text()
        assert "| vanilla | - | 576.0 |" in text and "| random | 64 | 64.0 |" in text
        assert "Stock (the unmodified model's own generate" in text and "k=64:" in text and "k=576:" in text
        assert ("DeepStack after blocks [1, 2]" in text) == (model == "random-qwen3-vl")


def test_the_random_qwen_line_builders_have_the_real_structure():
    """random-qwen2-vl / random-qwen3-vl: the real classes, patch 14 / 16, no windows, Qwen3-VL's
    DeepStack levels spread over the tower and head_dim 128; one pruned run each."""
    import argparse

    from nuwa_graph import load
    from nuwa_graph.adapters.tiny import tiny_qwen_image, tiny_qwen_prompt

    bench = _bench()
    args = argparse.Namespace(vision_layers=4, vision_hidden=64, llm_layers=2, llm_hidden=256)
    for kind, patch in (("qwen2_vl", 14), ("qwen3_vl", 16)):
        adapter = bench.random_qwen_line(kind, bench.torch.float32, "cpu", "sdpa", args)
        vc, tc = adapter.model.config.vision_config, adapter.model.config.text_config
        assert adapter.family == kind and vc.patch_size == patch and getattr(vc, "window_size", None) is None
        if kind == "qwen3_vl":
            assert list(vc.deepstack_visual_indexes) == [1, 2, 3] and tc.head_dim == 128
        rep = adapter.generate(load(ROOT / "pipelines/random.yaml", {"budget": 8}),
                               [tiny_qwen_image((4, 6), unit=2 * patch)], [tiny_qwen_prompt()], max_new_tokens=1)
        assert rep.visual_tokens_per_layer[0] == [8, 8]


def test_methods_mode_on_random_smolvlm(tmp_path):
    """The real-geometry random SmolVLM builder (toy widths): a 640x480 picture is 4x3 tiles + the
    global image = 13 runs of 64 tokens; the oracle feeds k rows in place of the runs, and the
    stock model's generate runs beside vanilla."""
    out = tmp_path / "smolvlm.md"
    code = _bench().main(["--model", "random-smolvlm", "--methods", "vanilla,random", "--budgets", "64", "--repeats",
                          "1", "--warmup", "0", "--new-tokens", "2", "--vision-layers", "1", "--vision-hidden", "32",
                          "--llm-layers", "2", "--llm-hidden", "64", "--write", str(out)])
    assert code == 0
    text = out.read_text()
    assert "| vanilla | - | 832.0 |" in text and "| random | 64 | 64.0 |" in text
    assert "Stock (the unmodified model's own generate" in text and "k=64:" in text and "k=832:" in text
