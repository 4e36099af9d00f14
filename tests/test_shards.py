"""Data-parallel `nuwa-graph eval`: shard bounds, merging shards into exactly what one process
writes (in process, on an untrained embedded-architecture model), the errors of a bad split,
and a real 2-process torchrun run on CPU (slow)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph.apps.cli import app
from nuwa_graph.apps.evaluate import EvalError, evaluate, load_data, plan_runs, sample_data, write_results
from nuwa_graph.apps.shards import Shard, merge, parse_shard, read_shards, shard_payload, write_shard

ROOT = Path(__file__).parent.parent
PIPELINES = ROOT / "pipelines"
TIMING = ("prefill_ms_median", "efficiency")  # measured times (merged as medians over all shards' calls)


def test_parse_shard_and_env():
    assert parse_shard("2/4") == Shard(2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(EvalError, match="--shard"):
            parse_shard(bad)
    assert Shard.from_env({}) is None and Shard.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    s = Shard.from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"})
    assert (s.index, s.count, s.launched, s.local_rank) == (5, 8, True, 1)
    with pytest.raises(EvalError, match="RANK=9"):
        Shard.from_env({"WORLD_SIZE": "8", "RANK": "9"})


@pytest.mark.parametrize("n,count", [(0, 3), (2, 3), (7, 3), (10, 4)])
def test_shards_cover_every_sample_once_in_order(n, count):
    from nuwa_graph.apps.evaluate import Task

    tasks = [Task("vqa", "x", list(range(n)))]
    parts = [Shard(i, count).take(tasks)[0].samples for i in range(count)]
    assert [x for p in parts for x in p] == list(range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.embedded import build_model, save_embedded

    base = tmp_path_factory.mktemp("shards")
    model, proc = build_model(seed=0, text_layers=4)  # 4 LLM layers: faster
    adapter = load_adapter(str(save_embedded(model, proc, base / "model")), "float32", "cpu")
    tasks = load_data(sample_data(base / "data", n_images=5, seed=11))
    grid = {"budget": [32]}
    runs = plan_runs([PIPELINES / "vanilla.yaml", PIPELINES / "random.yaml"], grid)
    return adapter, tasks, runs, grid, base


def _comparable(result):
    return {**result, "settings": {k: v for k, v in result["settings"].items() if k != "shards"},
            "results": [{k: v for k, v in r.items() if k not in TIMING} for r in result["results"]]}


def test_merged_shards_equal_one_process(setup):
    adapter, tasks, runs, grid, base = setup
    kw = dict(batch=1, max_new_tokens=3, warmup=False)
    single = evaluate(adapter, runs, tasks, **kw)
    count = 3
    for i in range(count):
        shard = Shard(i, count)
        part = shard.take(tasks)
        result = evaluate(adapter, runs, [t for t in part if t.samples], raw=True, **kw)
        write_shard(shard_payload(result, tasks, part, shard, grid, [r.label for r in runs]), base / "out")
    merged, merged_grid = merge(read_shards([base / "out"]))
    assert merged_grid == grid and merged["settings"]["shards"] == count
    assert _comparable(merged) == _comparable(single)
    # the files too (timings aside)
    a = write_results(single, base / "a")
    b = write_results(merged, base / "b")
    assert a["predictions"].read_text() == b["predictions"].read_text()
    ja, jb = (_comparable(json.loads(p["json"].read_text())) for p in (a, b))
    assert ja["results"] == jb["results"] and ja["data"] == jb["data"]


def test_merge_refuses_incomplete_or_mixed_splits(setup, tmp_path):
    _, tasks, runs, grid, _ = setup
    labels = [r.label for r in runs]
    write_shard(shard_payload(None, tasks, Shard(0, 2).take(tasks), Shard(0, 2), grid, labels), tmp_path)
    with pytest.raises(EvalError, match="1/2 are missing"):
        read_shards([tmp_path])
    write_shard(shard_payload(None, tasks, Shard(1, 3).take(tasks), Shard(1, 3), grid, labels), tmp_path)
    with pytest.raises(EvalError, match="one of"):
        read_shards([tmp_path])
    with pytest.raises(EvalError, match="no shard files"):
        read_shards([tmp_path / "nothing"])


def test_cli_shard_errors(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "vanilla.yaml"), "--shard", "3/3", "-o", str(tmp_path)])
    assert r.exit_code == 1 and "--shard" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["merge", str(tmp_path)])
    assert r.exit_code == 1 and "no shard files" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU, the shipped embedded model: rank 0's merged files
    equal a single process's (4 + 4 samples, batches of 2, so each rank sees the same batches)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    data = [a for f in sample_data(tmp_path / "data", n_images=4) for a in ("--data", str(f))]
    args = ["eval", str(PIPELINES / "vanilla.yaml"), str(PIPELINES / "fastv.yaml"), "--set", "budget=32", *data,
            "--limit", "4", "--batch", "2", "--max-new-tokens", "6", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "nuwa_graph.apps.cli", *args, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "nuwa_graph.apps.cli", *args, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == ["shard-0-of-2.json",
                                                                               "shard-1-of-2.json"]
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == (tmp_path / "two" / "predictions.jsonl").read_text()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["settings"].pop("shards") == 2
    for r in a["results"] + b["results"]:
        for k in TIMING:
            r.pop(k)
    assert a == b
    assert [r["tasks"]["vqa"]["n"] for r in b["results"]] == [4, 4]
