"""Loyalty to vanilla, the hard/easy split (apps/loyalty.py) and the per-run costs
(apps/efficiency.py), from unit cases up to `nuwa-graph eval ... --difficulty downsample` on the
embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph.apps.cli import app
from nuwa_graph.apps.efficiency import batch_costs, cost_cells, summarize_costs
from nuwa_graph.apps.evaluate import (
    EvalError,
    evaluate,
    load_data,
    plan_runs,
    sample_data,
    with_difficulty_filter,
    with_question_agnostic,
    with_vanilla,
)
from nuwa_graph.apps.loyalty import add_difficulty, add_loyalty, agree, loyalty

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"


def _g(i, answer, box, correct):
    return {"task": "grounding", "id": str(i), "answer": answer, "box": box, "parsed": box is not None,
            "target": [0, 0, 10, 10], "correct": correct}


def _v(i, answer, correct):
    return {"task": "vqa", "id": str(i), "answer": answer, "answers": ["red"], "correct": correct}


def test_agreement_rules():
    assert agree(_v(0, "Red.", True), _v(0, "the red", True))           # normalised answers
    assert not agree(_v(0, "red", True), _v(0, "blue", False))
    assert agree(_g(0, "a", [0, 0, 10, 10], True), _g(0, "b", [0, 0, 10, 8], True))      # IoU 0.8
    assert not agree(_g(0, "a", [0, 0, 10, 10], True), _g(0, "b", [0, 0, 10, 4], False))  # IoU 0.4
    assert agree(_g(0, "no box", None, False), _g(0, "no  box", None, False))
    assert not agree(_g(0, "no box", None, False), _g(0, "a", [0, 0, 10, 10], True))


def test_loyalty_and_difficulty_on_known_predictions():
    van = {"label": "vanilla", "pipeline": "vanilla", "variables": {}, "budget": None,
           "predictions": [_v(0, "red", True), _v(1, "red", True), _v(2, "blue", False), _v(3, "red", True)]}
    pr = {"label": "x budget=64", "pipeline": "x", "variables": {"budget": 64}, "budget": 64,
          "predictions": [_v(0, "red", True), _v(1, "blue", False), _v(2, "blue", False), _v(3, "green", False)]}
    ds = {"label": "downsample budget=64", "pipeline": "downsample", "variables": {"budget": 64}, "budget": 64,
          "predictions": [_v(0, "red", True), _v(1, "red", True), _v(2, "red", True), _v(3, "no", False)]}
    other = {"label": "x budget=128", "pipeline": "x", "variables": {"budget": 128}, "budget": 128,
             "predictions": [_v(0, "red", True)] * 4}
    assert loyalty(pr, van)["tasks"]["vqa"] == {"n": 4, "agree": 2, "rate": 0.5}
    result = {"results": [pr, van, ds, other]}
    add_loyalty(result, 1)
    assert van["loyalty"]["rate"] == 1.0 and pr["loyalty"]["rate"] == 0.5 and ds["loyalty"]["rate"] == 0.5
    add_difficulty(result, "downsample")
    (split,) = result["difficulty"]["splits"]
    assert split["budget"] == 64 and split["counts"] == {"vqa": {"hard": 1, "easy": 3}}
    assert set(split["runs"]) == {"x budget=64", "vanilla", "downsample budget=64"}  # not the budget-128 run
    hard, easy = pr["difficulty"]["tasks"]["vqa"]["hard"], pr["difficulty"]["tasks"]["vqa"]["easy"]
    assert (hard["n"], hard["correct"], easy["n"], easy["correct"]) == (1, 0, 3, 1)
    assert split["runs"]["vanilla"]["vqa"]["hard"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert ds["difficulty"]["tasks"]["vqa"]["hard"]["accuracy"] == 0.0  # the filter fails its hard set by definition
    assert "difficulty" not in other
    add_loyalty(result, None)
    assert pr["loyalty"] is None


def test_planning_adds_vanilla_filters_and_twins():
    runs = plan_runs([PIPELINES / "fastv.yaml", PIPELINES / "random.yaml"], {"budget": [64, 128]})
    with_ref, added = with_vanilla(runs)
    assert added and with_ref[-1].pipeline.name == "vanilla" and with_vanilla(with_ref) == (with_ref, False)
    filt = with_difficulty_filter(with_ref, "downsample")
    extra = [r.label for r in filt[len(with_ref):]]
    assert extra == ["downsample budget=64 (filter)", "downsample budget=128 (filter)"]
    have = with_difficulty_filter(plan_runs([PIPELINES / "downsample.yaml", PIPELINES / "fastv.yaml"]), "downsample")
    assert [r.label for r in have] == ["downsample", "fastv"]  # the same budget (64) is covered already
    twins = with_question_agnostic(with_ref)
    labels = [r.label for r in twins]
    assert "fastv budget=64 (question-agnostic)" in labels and not any("random" in lab and "agnostic" in lab
                                                                        for lab in labels)
    assert all(r.question_agnostic == lab.endswith("(question-agnostic)") for r, lab in zip(twins, labels))
    with pytest.raises(EvalError, match="must be one of downsample"):
        with_difficulty_filter(runs, "random")
    with pytest.raises(EvalError, match="no evaluated pipeline has a budget"):
        with_difficulty_filter(plan_runs([PIPELINES / "vanilla.yaml"]), "downsample")


def test_costs_of_a_real_run(tiny_llava, tiny_image):
    from nuwa_graph.pipeline import load

    rep = tiny_llava.generate(load(PIPELINES / "fastv.yaml", {"budget": 128}), [tiny_image] * 2, ["a", "b"],
                              max_new_tokens=3)
    c = batch_costs(rep)
    assert c["batch"] == 2 and c["ttft_ms"] >= c["prefill_ms"] > 0 and c["kv_cache_bytes"] > 0
    assert c["method_ms"] == pytest.approx(sum(c["node_ms"].values()), abs=1e-3)
    assert set(c["node_ms"]) == {"attn", "topk", "prune"}
    eff = summarize_costs([c, c], rep.flops[0])
    assert eff["prefill_ms"]["median"] == pytest.approx(c["prefill_ms"], abs=1e-3) and "median of 2 calls" in \
        eff["prefill_ms"]["how"]
    assert eff["kv_cache_bytes"]["per_sample"] == c["kv_cache_bytes"] / 2
    assert eff["flops"]["prefill"] == rep.flops[0]["prefill"] and "1 FLOP" in eff["flops"]["how"]
    assert eff["peak_memory_bytes"]["how"].startswith(rep.peak_memory_source)
    cells = cost_cells(eff)
    assert cells["prefill_gflops"] == round(rep.flops[0]["prefill"] / 1e9, 4) and cells["ttft_ms"] > 0
    assert summarize_costs([]) == {}


def test_question_agnostic_eval_twins_on_a_tiny_model(tiny_llava, tmp_path):
    tasks = load_data(sample_data(tmp_path / "data", n_images=2, seed=3))
    runs = with_question_agnostic(plan_runs([PIPELINES / "fastv.yaml", PIPELINES / "random.yaml"], {"budget": [128]}))
    assert [r.label for r in runs] == ["fastv budget=128", "fastv budget=128 (question-agnostic)", "random budget=128"]
    res = evaluate(tiny_llava, runs, tasks, batch=2, max_new_tokens=2, warmup=False)
    by = {r["label"]: r for r in res["results"]}
    qa = by["fastv budget=128 (question-agnostic)"]
    assert qa["question_agnostic"] and not by["fastv budget=128"]["question_agnostic"]
    assert qa["prompt_signals"] and all(s.startswith("llm.attention") for s in qa["prompt_signals"][:1])
    assert by["random budget=128"]["prompt_signals"] == []
    assert "neutral_prefill_ms" in qa["efficiency"] and "replay" in qa["efficiency"]["method_ms"]["per_node"]
    assert qa["visual_tokens_per_layer"] == by["fastv budget=128"]["visual_tokens_per_layer"]
    assert res["settings"]["neutral_prompt"] == ""
    assert all(r["loyalty"] is None for r in res["results"])  # no vanilla in this eval: no reference


def test_loyalty_and_the_split_on_a_tiny_model(tiny_llava, tmp_path):
    tasks = load_data(sample_data(tmp_path / "data", n_images=3, seed=3))
    runs = with_difficulty_filter(with_vanilla(plan_runs([PIPELINES / "random.yaml"], {"budget": [128]}))[0],
                                  "downsample")
    res = evaluate(tiny_llava, runs, tasks, batch=3, max_new_tokens=2, warmup=False, difficulty="downsample")
    by = {r["label"]: r for r in res["results"]}
    assert set(by) == {"random budget=128", "vanilla", "downsample budget=128 (filter)"}
    assert by["vanilla"]["loyalty"]["rate"] == 1.0 and by["vanilla"]["loyalty"]["tasks"]["vqa"]["n"] == 3
    for r in res["results"]:  # loyalty counts every sample, agreement by the rules above
        van = {(p["task"], p["id"]): p for p in by["vanilla"]["predictions"]}
        agree_n = sum(agree(p, van[(p["task"], p["id"])]) for p in r["predictions"] if p["task"] == "vqa")
        assert r["loyalty"]["tasks"]["vqa"]["agree"] == agree_n
    (split,) = res["difficulty"]["splits"]
    filt = by["downsample budget=128 (filter)"]
    assert split["counts"]["vqa"]["hard"] == sum(not p["correct"] for p in filt["predictions"] if p["task"] == "vqa")
    side = by["random budget=128"]["difficulty"]["tasks"]["vqa"]
    assert side["hard"]["n"] + side["easy"]["n"] == 3


def test_cli_question_agnostic_on_a_tiny_model(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "fastv.yaml"), str(PIPELINES / "random.yaml"), "--model",
                                 "tiny-llava", "--set", "budget=128", "--question-agnostic", "--no-vanilla", "--neutral-prompt",
                                 "describe the image", "--limit", "2", "--batch", "2", "--max-new-tokens", "2",
                                 "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "fastv budget=128 (question-agnostic)" in r.output and "'describe the image'" in r.output
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [x["label"] for x in res["results"]] == ["fastv budget=128", "fastv budget=128 (question-agnostic)",
                                                    "random budget=128"]  # --no-vanilla: no reference added
    assert "added pipelines/vanilla.yaml" not in r.output
    assert res["settings"]["neutral_prompt"] == "describe the image"


def test_cli_difficulty_prints_the_split_with_loyalty(tmp_path):
    """The issue's command, on 3 + 3 samples of the built-in set (the embedded model)."""
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "nuwa.yaml"), str(PIPELINES / "random.yaml"),
                                 str(PIPELINES / "downsample.yaml"), "--difficulty", "downsample", "--limit", "3",
                                 "--batch", "3", "--max-new-tokens", "5", "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "added pipelines/vanilla.yaml as the reference" in out
    assert "hard samples at budget 64: what downsample gets wrong" in out and "loyalty" in out
    assert "what each run cost" in out and "ttft_ms:" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [x["label"] for x in res["results"]] == ["nuwa", "random", "downsample", "vanilla"]
    (split,) = res["difficulty"]["splits"]
    assert split["filter"] == "downsample" and sum(split["counts"]["vqa"].values()) == 3
    for x in res["results"]:
        assert 0.0 <= x["loyalty"]["rate"] <= 1.0 and x["efficiency"]["ttft_ms"]["median"] > 0
    assert res["results"][3]["loyalty"]["rate"] == 1.0
    csv = (tmp_path / "ev" / "results.csv").read_text().splitlines()
    assert "loyalty" in csv[0] and "vqa_hard_accuracy" in csv[0] and "ttft_ms" in csv[0]
    # and the page of this embedded-model eval
    page = CliRunner().invoke(app, ["report", str(tmp_path / "ev"), "-o", str(tmp_path / "r.html")])
    html = (tmp_path / "r.html").read_text()
    assert page.exit_code == 0 and html.count('<svg class="plot"') == 4 and "<h2>Hard samples</h2>" in html
