"""An interrupted `eval` keeps its finished batches; the same command again resumes from them and
writes the same results files as an uninterrupted run."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph.adapters.base import RunReport
from nuwa_graph.apps import cli
from nuwa_graph.apps.evaluate import (
    PARTIAL_PREDICTIONS,
    evaluate,
    load_data,
    plan_runs,
    sample_data,
)

PIPELINES = Path(__file__).parent.parent / "pipelines"
RESULT_FILES = ("results.json", "results.csv", "predictions.jsonl")


class FakeAdapter:
    """Deterministic answers and timings from the prompts, so two runs can be compared byte for byte."""

    name = "fake"
    device = "cpu"
    dtype = "float32"
    grid = (12, 12)

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def generate(self, pipeline, images, prompts, max_new_tokens=16, seed=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        h = [zlib.crc32(f"{pipeline.name}|{p}".encode()) for p in prompts]
        answers = [f"[{x % 7}, {x % 5}, {x % 7 + 3}, {x % 5 + 4}]" if "where" in p else ["red", "blue"][x % 2]
                   for x, p in zip(h, prompts)]
        counts = [[144] * 2 + [16 + x % 3] * 6 for x in h]
        return RunReport(model=self.name, pipeline=pipeline.name, answers=answers, new_tokens=[[1]] * len(prompts),
                         visual_tokens_per_layer=counts, visual_tokens_avg=[sum(c) / len(c) for c in counts],
                         visual_tokens_full=144, prefill_ms=float(sum(h) % 1000) / 7, decode_ms_per_token=0.0,
                         decode_steps=1, peak_memory_bytes=0, peak_memory_source="none", kv_cache_bytes=0,
                         node_ms={}, kept=[{"llm.2": list(range(16))} for _ in prompts], actions=[[] for _ in prompts])


@pytest.fixture
def data(tmp_path):
    return [str(p) for p in sample_data(tmp_path / "data", n_images=6, seed=5)]


def eval_args(data, out):
    args = ["eval", str(PIPELINES / "vanilla.yaml"), str(PIPELINES / "fastv.yaml"), "--set", "budget=64,128",
            "--batch", "2", "-o", str(out)]
    for d in data:
        args += ["--data", d]
    return args


def test_interrupted_eval_resumes_to_the_same_results(tmp_path, data, monkeypatch):
    from nuwa_graph import adapters

    # reference: one uninterrupted run
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: FakeAdapter())
    r = CliRunner().invoke(cli.app, eval_args(data, tmp_path / "ref"))
    assert r.exit_code == 0, r.output
    # interrupted at the 7th generate call (the warm-up is the 1st): Ctrl-C keeps the 5 batches done
    fake = FakeAdapter(fail_at=7)
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: fake)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli.app, eval_args(data, out))
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "run the same command again to resume" in r.output
    partial = out / PARTIAL_PREDICTIONS
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 5 and not (out / "results.json").exists()
    # the same command again: the finished batches are not run again
    again = FakeAdapter()
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: again)
    r = CliRunner().invoke(cli.app, eval_args(data, out))
    assert r.exit_code == 0, r.output
    assert "resumed: 5 batches" in r.output
    total = 3 * 2 * 3  # 3 runs (vanilla; fastv at 2 budgets) x 2 tasks x 3 batches of 2
    assert again.calls == 1 + total - 5  # warm-up + the batches not done before
    for name in RESULT_FILES:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not partial.exists()


def test_partial_predictions_of_other_settings_are_not_reused(tmp_path, data, monkeypatch):
    from nuwa_graph import adapters

    fake = FakeAdapter(fail_at=4)
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: fake)
    out = tmp_path / "run"
    assert CliRunner().invoke(cli.app, eval_args(data, out)).exit_code == 130
    again = FakeAdapter()
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: again)
    r = CliRunner().invoke(cli.app, eval_args(data, out) + ["--max-new-tokens", "3"])
    assert r.exit_code == 0 and "resumed" not in r.output
    assert again.calls == 1 + 3 * 2 * 3
    # --fresh discards a matching partial file too
    fake = FakeAdapter(fail_at=4)
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: fake)
    assert CliRunner().invoke(cli.app, eval_args(data, out)).exit_code == 130
    again = FakeAdapter()
    monkeypatch.setattr(adapters, "load_adapter", lambda *a, **k: again)
    r = CliRunner().invoke(cli.app, eval_args(data, out) + ["--fresh"])
    assert r.exit_code == 0 and again.calls == 1 + 3 * 2 * 3


def test_a_cut_last_line_runs_that_batch_again(tmp_path, data):
    tasks = load_data(data)
    runs = plan_runs([PIPELINES / "vanilla.yaml"])
    ckpt = tmp_path / "partial.jsonl"
    first = evaluate(FakeAdapter(), runs, tasks, batch=2, warmup=False, checkpoint=ckpt)
    text = ckpt.read_text()
    ckpt.write_text(text[: len(text) - 40])  # the last batch's line was cut by a kill
    again = FakeAdapter()
    second = evaluate(again, runs, tasks, batch=2, warmup=False, checkpoint=ckpt)
    assert again.calls == 1 and second["resumed_batches"] == 5
    assert json.dumps(first["results"]) == json.dumps(second["results"])


def test_a_real_model_report_round_trips_through_the_checkpoint(tmp_path, tiny_llava):
    tasks = load_data([str(p) for p in sample_data(tmp_path / "data", n_images=2, seed=3)])
    runs = plan_runs([PIPELINES / "fastv.yaml"])
    ckpt = tmp_path / "partial.jsonl"
    first = evaluate(tiny_llava, runs, tasks, batch=2, max_new_tokens=2, warmup=False, checkpoint=ckpt)

    class NoRun:
        name, device, dtype, model = tiny_llava.name, tiny_llava.device, tiny_llava.dtype, tiny_llava.model
        encode = tiny_llava.encode

        def generate(self, *a, **k):
            raise AssertionError("a finished batch ran again")

    second = evaluate(NoRun(), runs, tasks, batch=2, max_new_tokens=2, warmup=False, checkpoint=ckpt)
    assert second["resumed_batches"] == 2
    first["results"][0].pop("grid"), second["results"][0].pop("grid")
    assert json.dumps(first["results"], sort_keys=True) == json.dumps(second["results"], sort_keys=True)
