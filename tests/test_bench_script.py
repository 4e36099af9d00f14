"""benchmarks/bench_adapters.py runs end to end on the tiny preset (both modes' code paths)."""

from __future__ import annotations

import sys
from pathlib import Path

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
