"""scripts/gpu_check.py runs on a CPU (`--device cpu --quick`; CI runs the full `--device cpu`,
.ci/run) and its verdicts can fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on one thread


def _gc():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    return gpu_check


def test_quick_cpu_run_writes_the_report(tmp_path):
    gc = _gc()
    assert gc.main(["--device", "cpu", "--out", str(tmp_path), "--quick"]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["problems"] == []
    fp32 = [r for r in data["agreement"] if r["dtype"] == "float32"]
    assert fp32 and all(r["min_jaccard"] == 1.0 and r["same_tokens"] and r["max_logit_diff"] == 0.0 for r in fp32)
    from nuwa_graph.adapters import PRESETS

    assert {r["model"] for r in data["agreement"]} == set(PRESETS)  # every tiny preset: each family
    assert all(r["finite"] for r in data["agreement"] + [r for r in data["attention"] if "skipped" not in r])
    assert data["syncs"] and all(r["syncs_per_step"] == 1 for r in data["syncs"])  # virtual devices on a CPU
    assert data["padded_batch"] and all(r["same_kept"] and r["same_tokens"] for r in data["padded_batch"])
    assert any(r.get("skipped") for r in data["attention"])  # flash needs CUDA: said, not silently dropped
    assert {"node_ms_synced", "node_ms_not_synced"} <= set(data["node_timing"][0])
    assert data["oracle"] and data["oracle"][0]["ratio"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Agreement with float32 on the CPU" in md and "## Host syncs per decode step" in md


def test_the_verdicts_can_fail():
    gc = _gc()
    ok = {"agreement": [{"model": "m", "dtype": "float32", "pipeline": "p", "finite": True, "same_tokens": True,
                         "min_jaccard": 1.0}],
          "attention": [], "padded_batch": [], "syncs": [{"model": "m", "pipeline": "p", "batch": 1,
                                                           "syncs_per_step": 1.0}]}
    assert gc.problems_of(ok) == []
    bad = json.loads(json.dumps(ok))
    bad["agreement"][0]["min_jaccard"] = 0.9
    bad["syncs"][0]["syncs_per_step"] = 2.0
    bad["padded_batch"] = [{"model": "m", "pipeline": "p", "sample": 1, "same_kept": False, "same_tokens": True,
                            "max_logit_diff": 0.0}]
    assert len(gc.problems_of(bad)) == 3
    half = json.loads(json.dumps(ok))
    half["agreement"][0].update(dtype="bfloat16", min_jaccard=0.5, same_tokens=False)
    assert gc.problems_of(half) == []  # half-precision drift is reported, not failed
    half["agreement"][0]["finite"] = False
    assert gc.problems_of(half)
