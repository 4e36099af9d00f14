"""`nuwa-graph eval`: metrics, the evaluation loop on an untrained embedded-architecture model,
the files and pictures it writes, and the command line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph.apps.cli import app
from nuwa_graph.apps.evaluate import (
    EvalError,
    add_relative,
    evaluate,
    grounding_score,
    load_data,
    plan_runs,
    reference_index,
    relative_pct,
    sample_data,
    summarize,
    sweep_axis,
    vqa_score,
    write_results,
)
from nuwa_graph.world.boxes import iou

PIPELINES = Path(__file__).parent.parent / "pipelines"


# --- metrics ----------------------------------------------------------------------------------
def test_iou_and_grounding_score():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou(None, (0, 0, 1, 1)) == 0.0
    # 16 bins on 160 px: <x0> <y0> <x1> <y1> -> (5, 5, 15, 15)
    s = grounding_score("<x0> <y0> <x1> <y1>", (5, 5, 15, 15), 160, 160)
    assert s["parsed"] and s["correct"] and s["iou"] == pytest.approx(1.0)
    s = grounding_score("[0.5, 0.5, 1.0, 1.0]", (0, 0, 80, 80), 160, 160)  # parsed, IoU 0
    assert s["parsed"] and not s["correct"]
    s = grounding_score("the red circle", (0, 0, 80, 80), 160, 160)
    assert not s["parsed"] and not s["correct"] and s["box"] is None


def test_parse_failures_are_wrong_and_counted():
    box = (0, 0, 80, 80)
    scores = [grounding_score(a, box, 160, 160) for a in ["<x0> <y0> <x7> <y7>", "no box", "<y0> <x0>", "[0, 0, 80, 80]"]]
    t = summarize("grounding", scores)
    assert t["n"] == 4 and t["correct"] == 2 and t["parse_failures"] == 2 and t["accuracy"] == 0.5


def test_vqa_exact_match_normalised():
    assert vqa_score("The Red.", ["red"])["correct"]
    assert vqa_score(" 3 ", ["3", "three"])["correct"]
    assert not vqa_score("red circle", ["red"])["correct"]
    assert not vqa_score("red", [])["correct"]
    assert summarize("vqa", [{"correct": True}, {"correct": False}]) == {"n": 2, "correct": 1, "accuracy": 0.5}


def test_relative_math_and_reference():
    assert relative_pct(0.3, 0.6) == pytest.approx(50.0)
    assert relative_pct(0.3, 0.0) is None
    res = [{"pipeline": "fastv", "accuracy": 0.4, "tasks": {"vqa": {"accuracy": 0.4}}},
           {"pipeline": "vanilla", "accuracy": 0.8, "tasks": {"vqa": {"accuracy": 0.8}}}]
    assert reference_index(res) == 1
    add_relative(res)
    assert res[0]["relative_pct"] == pytest.approx(50.0) and res[1]["relative_pct"] == pytest.approx(100.0)
    res = [{"pipeline": "a", "accuracy": 0.5, "tasks": {}}, {"pipeline": "b", "accuracy": 0.25, "tasks": {}}]
    add_relative(res)   # no vanilla: relative to the first
    assert res[1]["relative_pct"] == pytest.approx(50.0)
    assert sweep_axis({"budget": [16, 64], "K": [2]}) == "budget" and sweep_axis({}) is None


# --- data -------------------------------------------------------------------------------------
def test_load_data_detects_kinds_and_errors(tmp_path):
    g, v = sample_data(tmp_path / "d", n_images=4, seed=7)
    tasks = load_data([g, v], limit=3)
    assert [t.kind for t in tasks] == ["grounding", "vqa"] and [len(t.samples) for t in tasks] == [3, 3]
    assert load_data([f"vqa:{v}"])[0].kind == "vqa"
    with pytest.raises(EvalError, match="does not exist"):
        load_data([tmp_path / "nope.json"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(EvalError, match="cannot tell"):
        load_data([bad])


def test_plan_runs_sweeps_only_declared_variables():
    runs = plan_runs([PIPELINES / "vanilla.yaml", PIPELINES / "random.yaml"], {"budget": [16, 64]})
    assert [r.label for r in runs] == ["vanilla", "random budget=16", "random budget=64"]
    with pytest.raises(EvalError, match="no evaluated pipeline"):
        plan_runs([PIPELINES / "vanilla.yaml"], {"budget": [16]})


# --- the loop on an untrained embedded-architecture model ---------------------------------------
@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    from nuwa_graph.embedded import build_model, save_embedded

    model, proc = build_model(seed=0, text_layers=4)  # 4 LLM layers: faster
    return save_embedded(model, proc, tmp_path_factory.mktemp("embedded") / "model")


@pytest.fixture(scope="module")
def evaluated(embedded_dir, tmp_path_factory):
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.apps.viz import write_pictures

    out = tmp_path_factory.mktemp("eval")
    tasks = load_data(sample_data(out / "data", n_images=4, seed=11))
    grid = {"budget": [32, 64]}  # LLaVA-1.5 counts: 8 and 16 of the 144 tokens
    runs = plan_runs([PIPELINES / "random.yaml", PIPELINES / "vanilla.yaml"], grid)
    adapter = load_adapter(str(embedded_dir), "float32", "cpu")
    result = evaluate(adapter, runs, tasks, batch=4, max_new_tokens=4, warmup=False)
    files = write_results(result, out)
    pics = write_pictures(result, out, sweep_axis(grid))
    return result, files, pics, out


def test_eval_result_structure_and_counts(evaluated):
    result, *_ = evaluated
    assert [d["task"] for d in result["data"]] == ["grounding", "vqa"] and all(d["n"] == 4 for d in result["data"])
    labels = [r["label"] for r in result["results"]]
    assert labels == ["random budget=32", "random budget=64", "vanilla"]
    assert result["reference"] == "vanilla"
    for r in result["results"]:
        g, v = r["tasks"]["grounding"], r["tasks"]["vqa"]
        assert g["n"] == 4 and v["n"] == 4 and len(r["predictions"]) == 8
        assert 0 <= g["parse_failures"] <= 4 and g["correct"] <= 4 - g["parse_failures"]
        assert g["correct"] == sum(p["correct"] for p in r["predictions"] if p["task"] == "grounding")
        assert sum(not p["parsed"] for p in r["predictions"] if p["task"] == "grounding") == g["parse_failures"]
        assert r["accuracy"] == pytest.approx((g["accuracy"] + v["accuracy"]) / 2)
        assert len(r["visual_tokens_per_layer"]) == 4 and r["visual_tokens_full"] == 144
        assert r["prefill_ms_median"] > 0 and r["grid"] == [12, 12]
    by = {r["label"]: r for r in result["results"]}
    assert by["random budget=64"]["visual_tokens_avg"] == 16 and by["vanilla"]["visual_tokens_avg"] == 144
    assert len(by["random budget=64"]["sample_kept"]["vision"]) == 16
    assert by["random budget=32"]["visual_tokens_avg"] == 8
    # FLOPs (nuwa_graph/flops.py): pruning before the LLM keeps the tower, cuts the LLM
    fl, fv = by["random budget=32"]["flops"], by["vanilla"]["flops"]
    assert fv["prefill_ratio"] == 1.0 and fl["prefill_ratio"] < 1.0
    assert fl["vision"] == fv["vision"] and fl["llm_prefill"] < fv["llm_prefill"]
    assert fl["vanilla_prefill"] == pytest.approx(fv["prefill"])
    ref = by["vanilla"]
    for r in result["results"]:
        want = None if not ref["accuracy"] else 100 * r["accuracy"] / ref["accuracy"]
        assert r["relative_pct"] == (pytest.approx(want) if want is not None else None)


def test_eval_files_and_pictures(evaluated):
    result, files, pics, out = evaluated
    data = json.loads(files["json"].read_text())
    assert data["reference"] == "vanilla" and "predictions" not in data["results"][0]
    lines = files["csv"].read_text().splitlines()
    assert len(lines) == 4 and "grounding_parse_failures" in lines[0] and "relative_pct" in lines[0]
    assert "prefill_gflops" in lines[0] and "prefill_flops_ratio" in lines[0]
    assert len(files["predictions"].read_text().splitlines()) == 3 * 8
    names = sorted(p.name for p in pics)
    assert "accuracy_vs_budget.png" in names
    assert {"random_budget=32.png", "random_budget=64.png", "vanilla.png"} <= set(names)
    for p in pics:
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"


# --- command line -------------------------------------------------------------------------------
def test_cli_eval_help():
    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "--data" in res.output and "--limit" in res.output


def test_cli_eval_bad_data_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["eval", str(PIPELINES / "vanilla.yaml"), "--model", "tiny-llava",
                                   "--data", str(tmp_path / "missing.json"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "missing.json" in res.output and "does not exist" in res.output and "Traceback" not in res.output


def test_cli_eval_no_model_is_a_clear_error(tmp_path, monkeypatch):
    import nuwa_graph.embedded as emb
    from nuwa_graph.adapters import PRESETS

    monkeypatch.setattr(emb, "WEIGHTS_DIR", tmp_path / "no-weights")
    monkeypatch.delitem(PRESETS, "embedded", raising=False)
    res = CliRunner().invoke(app, ["eval", str(PIPELINES / "vanilla.yaml"), "-o", str(tmp_path / "out"), "--limit", "1"])
    assert res.exit_code == 1 and "train_embedded.py" in res.output


def test_tokens_runs_is_run_length_with_averages_rounded():
    from nuwa_graph.apps.evaluate import tokens_runs

    assert tokens_runs([144, 144, 16, 16]) == "144x2 16x2"
    assert tokens_runs([144.0, 77, 38, 19]) == "144 77 38 19"
    assert tokens_runs([144, 144, 30.25, 0.0]) == "144x2 30.2 0"
