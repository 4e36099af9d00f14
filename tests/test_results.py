"""docs/results.md machinery (scripts/results_report.py), head masking, and the `run` comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nuwa_graph import load
from nuwa_graph.apps.cli import app
from nuwa_graph.embedded import WEIGHTS_DIR
from nuwa_graph.nodes.scorer_llm import drop_heads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # results generation is a script's module, not the package's
from results_report import (  # noqa: E402
    ENTRIES,
    caveat_findings,
    effect_findings,
    load_run,
    plan,
    render,
    run_all,
    shown_model,
    with_heads_excluded,
)

# the deep embedded model
EMBEDDED_VARS = {"llm_layers": 16, "vision_layers": 6, "grid_tokens": 144, "crop_tokens": 144, "crops": 1}


# --- head masking --------------------------------------------------------------------------------
def test_drop_heads_removes_the_head_and_rejects_bad_ones():
    rows = torch.tensor([[[9.0, 0.0]], [[1.0, 3.0]], [[1.0, 5.0]]])  # (heads, q, n); head 0 disagrees
    assert torch.equal(drop_heads(rows, [0], "n").mean(0)[0], torch.tensor([1.0, 4.0]))
    assert drop_heads(rows, [], "n") is rows
    with pytest.raises(ValueError, match="has 3 heads"):
        drop_heads(rows, [3], "n")
    with pytest.raises(ValueError, match="at least one head"):
        drop_heads(rows, [0, 1, 2], "n")


@pytest.mark.parametrize("file, layer, changed", [
    ("nuwa", 7, 1),       # stage 2 reads layer llm_layers // 2 - 1
    ("fastv", 0, 1),      # K = scale32(2) = 1 on 16 layers: reads layer 0
    ("pdrop", 5, 1),      # layers scale32([8, 16, 24]) - 1 = [1, 5, 10]: only the second stage reads 5
    ("sparsevlm", 3, 1),  # raters at layers [1, 3, 8]
    ("feather", 7, 1),    # K = [4, 8]: reads 3 and 7
    ("visionzip", 0, 0),  # reads no LLM attention
])
def test_with_heads_excluded_touches_only_scorers_of_that_layer(file, layer, changed):
    pipe = load(ROOT / f"pipelines/{file}.yaml", {}, model_vars=EMBEDDED_VARS)
    masked, n = with_heads_excluded(pipe, layer, [0], EMBEDDED_VARS)
    assert n == changed
    for name, node in masked.nodes.items():
        excluded = getattr(node.params, "exclude_heads", None)
        if excluded is not None:
            assert excluded == ([0] if node.params.layer == layer else [])
        assert type(node) is type(pipe.nodes[name])


def test_plan_runs_every_pipeline_at_every_budget():
    runs = plan(model_vars=EMBEDDED_VARS)
    labels = [r.label for r in runs]
    assert labels[0] == "vanilla" and "prumerge_plus" in labels
    assert len(runs) == 1 + 1 + 3 * (len(ENTRIES) - 2)  # vanilla and PruMerge+ once
    by = {r.label: r for r in runs}
    assert by["fastv budget=64"].pipeline.nodes["topk"].params.k == 16  # 64 of 576 -> 16 of 144
    assert by["visionzip budget=192"].pipeline.nodes["zip"].params.contextual == 48 - 48 * 27 // 32
    masked = plan(model_vars=EMBEDDED_VARS, mask=(0, [0]))
    # only the text-attention pipelines with a scorer reading layer 0: FastV and FastV-fix (K=1 on 16 layers)
    assert {r.label.split(" ")[0] for r in masked} == {"fastv", "fastv_fix"}
    assert all(r.label.endswith(" -head") for r in masked) and len(masked) == 3 * 2
    assert by["fastv budget=64"].pipeline.nodes["attn"].params.layer == 0
    assert all(not e.fixed for e in ENTRIES)  # every method file runs unchanged


# --- the words are computed from the numbers -------------------------------------------------------
def _result(acc: dict[str, tuple[float, float]]) -> dict:
    """A result dict as evaluate() returns it, from label -> (grounding, vqa) accuracy."""
    from nuwa_graph.apps.evaluate import add_relative

    res = []
    for label, (g, v) in acc.items():
        name, *rest = label.split(" ")
        var = {"budget": int(rest[0].split("=")[1])} if rest and rest[0].startswith("budget=") else {}
        res.append({"label": label, "pipeline": name, "variables": var, "accuracy": (g + v) / 2,
                    "visual_tokens_avg": 16.0, "visual_tokens_full": 144, "visual_tokens_per_layer": [16, 16, 16, 16],
                    "prefill_ms_median": 1.0, "grid": [12, 12],
                    "tasks": {"grounding": {"accuracy": g, "parse_failures": 0, "n": 10}, "vqa": {"accuracy": v, "n": 10}}})
    add_relative(res)
    return {"results": res}


def test_effect_findings_say_whether_the_effect_appears():
    shows = _result({"vanilla": (0.8, 0.9), "fastv budget=64": (0.1, 0.85), "visionzip budget=64": (0.05, 0.8),
                     "nuwa budget=64": (0.6, 0.88)})
    (s,) = effect_findings(shows, budgets=(64,))
    assert s.endswith("the paper's effect appears.") and "collapses (< 50 %) for FastV, VisionZip." in s
    assert "Grounding, % of vanilla: FastV 12, VisionZip 6, Nüwa 75." in s
    absent = _result({"vanilla": (0.8, 0.9), "fastv budget=64": (0.7, 0.85), "visionzip budget=64": (0.05, 0.8),
                      "nuwa budget=64": (0.02, 0.88)})
    (s,) = effect_findings(absent, budgets=(64,))
    assert s.endswith("the effect does not appear.") and "collapses (< 50 %) for VisionZip." in s
    part = _result({"vanilla": (0.8, 0.9), "fastv budget=64": (0.7, 0.85), "visionzip budget=64": (0.0, 0.8),
                    "nuwa budget=64": (0.2, 0.88)})
    (s,) = effect_findings(part, budgets=(64,))
    assert s.endswith("the effect appears only in part.") and "(25 % vs VisionZip's 0 %" in s


def test_caveat_findings_report_ranking_changes():
    main = _result({"vanilla": (0.8, 0.9), "fastv budget=64": (0.5, 0.8), "nuwa budget=64": (0.4, 0.7)})
    same = _result({"fastv budget=64 -head": (0.45, 0.8), "nuwa budget=64 -head": (0.3, 0.7)})
    rows, notes = caveat_findings(main, same, budgets=(64,))
    assert len(rows) == 2 and all("identical" in n for n in notes)
    flipped = _result({"fastv budget=64 -head": (0.2, 0.8), "nuwa budget=64 -head": (0.4, 0.7)})
    _, notes = caveat_findings(main, flipped, budgets=(64,))
    assert "positions changed" in notes[0] and "Kendall tau -1.00" in notes[0] and "identical" in notes[1]


# --- end to end on an untrained embedded-architecture model ----------------------------------------
@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    import json

    from nuwa_graph.embedded import build_model, save_embedded

    model, proc = build_model(seed=0, text_layers=4)  # 4 LLM layers: faster
    d = save_embedded(model, proc, tmp_path_factory.mktemp("embedded") / "model")
    (Path(d) / "training_log.json").write_text(json.dumps(
        {"minutes": 0, "final": {"grounding_acc50": 0.0, "vqa_em": 0.0, "n": 0},
         "supervised_attention_head": {"layer": 1, "head": 0, "zero_from_lm_step": 0}}))
    return Path(d)


def test_generated_docs_name_the_shipped_weights_by_their_repository_path(untrained):
    assert shown_model(str(WEIGHTS_DIR)) == "nuwa_graph/embedded/weights"
    assert shown_model(str(WEIGHTS_DIR / ".." / "weights")) == "nuwa_graph/embedded/weights"
    assert shown_model(str(untrained)) == str(untrained)  # any other model: as it was given
    assert shown_model("tiny-llava") == "tiny-llava"
    shown = (ROOT / "docs/results.md").read_text().split("- Model: `", 1)[1].split("`", 1)[0]
    assert shown == "nuwa_graph/embedded/weights"


def test_run_all_and_render(untrained, tmp_path):
    entries = [e for e in ENTRIES if e.name in ("vanilla", "downsample", "visionzip", "fastv", "nuwa")]
    totals = []
    res = run_all(str(untrained), 2, tmp_path, batch=2, max_new_tokens=2, budgets=(64,), entries=entries,
                  on_total=totals.append)
    # this 4-layer model's log records a supervised head at layer 1: FastV (K = scale32(2) = 1) reads
    # layer 0, Nüwa's stage 2 layer 1, so only Nüwa is rerun with the head masked
    assert totals == [(5 + 2 + 1) * 2 * 2]  # (main + question-agnostic twins + masked runs) x 2 tasks x 2 samples
    main, caveat = res["main"], res["caveat"]
    assert [r["label"] for r in main["results"]] == [
        "vanilla", "downsample budget=64", "fastv budget=64", "fastv budget=64 (question-agnostic)",
        "visionzip budget=64", "nuwa budget=64", "nuwa budget=64 (question-agnostic)"]
    assert [r["label"] for r in caveat["results"]] == ["nuwa budget=64 -head"]
    by = {r["label"]: r for r in main["results"]}
    assert by["visionzip budget=64"]["visual_tokens_avg"] == 16 and by["vanilla"]["visual_tokens_avg"] == 144
    assert by["fastv budget=64"]["visual_tokens_per_layer"] == [144, 16, 16, 16]
    assert res["settings"]["budgets"] == [64]
    text = render(res, "python scripts/gen_results.py --n 2")
    assert "## Budget 64 of 576 (16 of 144 visual tokens)" in text and "| Nüwa | 16.0 |" in text
    assert "Does the paper's effect appear?" in text and "head masked" in text
    assert (tmp_path / "main/results.csv").is_file() and (tmp_path / "caveat/results.json").is_file()
    assert render(load_run(tmp_path), "python scripts/gen_results.py --n 2") == text  # --render-only path
    # the agreement with the paper and the schedules are part of the page
    assert "## Agreement with the paper" in text and "| Nüwa | 47.19 |" in text and "Kendall's tau: **" in text
    assert "## Schedules used" in text and "- FastV: `pipelines/fastv.yaml: " in text
    # the field's evaluations: loyalty, the hard/easy split by downsample, question-agnostic twins
    assert "Loyalty, hard samples and question-agnostic pruning at budget 64. Hard / easy: grounding" in text
    assert "| vanilla | 100.0 | 100.0 |" in text and "= " in text.split("| VisionZip |", 2)[2].split("\n")[0]
    assert "## Question-agnostic pruning: what each method reads of the prompt" in text
    assert "- VisionZip: nothing (reads the image only" in text and "- FastV: `llm.attention(layer=0" in text
    assert main["difficulty"]["splits"][0]["filter"] == "downsample budget=64"
    assert "(question-agnostic)" not in text.split("## Question-agnostic pruning")[0].split("| pipeline |")[1]
    assert str(ROOT) not in text  # files by their place in the repository, not this machine's path


def test_a_model_trained_without_attention_supervision_gets_no_caveat_rerun(untrained, tmp_path):
    import json

    log = json.loads((untrained / "training_log.json").read_text())
    (untrained / "training_log.json").write_text(json.dumps({**log, "supervised_attention_head": None,
                                                             "attention_loss": None}))
    try:
        entries = [e for e in ENTRIES if e.name in ("vanilla", "nuwa")]
        res = run_all(str(untrained), 1, tmp_path, batch=1, max_new_tokens=1, budgets=(64,), entries=entries)
    finally:
        (untrained / "training_log.json").write_text(json.dumps(log))
    assert res["caveat"] is None
    text = render(res, "gen")
    assert "## Attention supervision" in text and "`attention_loss` null" in text and "head masked" not in text


# --- `nuwa-graph run FILE` with nothing else: the comparison ---------------------------------------
def test_run_without_model_image_or_prompt_compares_against_vanilla(monkeypatch, tmp_path):
    import nuwa_graph.apps.demo as demo

    seen = {}

    def fake(pipeline, **kw):
        seen.update(kw, pipeline=pipeline)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake)
    r = CliRunner().invoke(app, ["run", str(ROOT / "pipelines/nuwa.yaml"), "--set", "budget=128", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert seen["pipeline"].variables["budget"] == 128 and seen["out"] == tmp_path and seen["max_new_tokens"] == 6


def test_run_demo_on_the_embedded_model(tmp_path, monkeypatch, untrained):
    from rich.console import Console

    import nuwa_graph.apps.demo as demo

    monkeypatch.setattr(demo, "default_model", lambda: str(untrained))
    console = Console(record=True, width=200)
    code = demo.run_demo(load(ROOT / "pipelines/nuwa.yaml"), out=tmp_path, samples=3, max_new_tokens=2,
                         console=console)
    text = console.export_text()
    assert code == 0 and "nuwa beside vanilla and the baselines" in text
    # depth-independent: whatever the embedded LLM's depth L, the schedules follow it
    import re

    from nuwa_graph.expressions import scale_layers

    L = int(re.search(r"\((\d+) LLM layers\)", text).group(1))
    K = scale_layers(2, L)

    def per_layer(*runs):  # run-length, as `tokens_runs` prints them: 144x2 16x2
        return " " + " ".join(f"{c}x{n}" if n > 1 else f"{c}" for n, c in runs) + " "

    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert per_layer((L, 144)) in rows["vanilla"]
    assert per_layer((L // 2, 28), (L - L // 2, 4)) in rows["nuwa"]  # K1 = 112/576 of 144, K2 = K1 // 7
    # the baselines at nuwa's budget: VisionZip 64 -> 16 of 144 at every layer; FastV from layer K = scale32(2)
    assert per_layer((L, 16)) in rows["visionzip"] and per_layer((K, 144), (L - K, 16)) in rows["fastv"]
    assert all(" 64 " in rows[k] for k in ("nuwa", "visionzip", "fastv"))
    assert f"K={K} (scale32(2) on {L} LLM layers)" in text
    assert (tmp_path / "nuwa_kept.png").read_bytes()[:4] == b"\x89PNG"
