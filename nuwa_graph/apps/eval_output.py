"""What an eval writes: the partial predictions file it resumes from (Checkpoint) and the
results (results.json, results.csv, predictions.jsonl)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..safe_io import atomic_write
from .efficiency import cost_cells

if TYPE_CHECKING:
    from .evaluate import EvalRun
    from .tasks import Task


class Checkpoint:
    """The partial predictions file of an eval: one JSON line per finished batch, flushed at once,
    so an interrupted eval (Ctrl-C, a crash, a lost machine) keeps every finished batch and a rerun
    with the same settings takes them from here instead of running them again.

    The first line holds the settings; a file written with other settings is not reused."""

    def __init__(self, path: str | Path | None, settings: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.settings = json.loads(json.dumps(settings, default=str))
        self.done: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self.discarded = False
        self._fh: TextIO | None = None
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("settings") != self.settings:
            self.discarded = True
            return
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a line cut by the interruption: that batch runs again
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                self.done[rec["key"]] = rec

    @staticmethod
    def key(run: EvalRun, task: Task, chunk: list) -> str:
        return json.dumps([run.label, run.file, task.kind, task.source, [s.id for s in chunk]])

    def get(self, key: str) -> dict[str, Any] | None:
        rec = self.done.get(key)
        if rec is not None:
            self.reused += 1
        return rec

    def add(self, rec: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = list(self.done.values())
            self._fh = self.path.open("w", encoding="utf-8")
            self._fh.write(json.dumps({"settings": self.settings}) + "\n")
            for r in old:
                self._fh.write(json.dumps(r) + "\n")
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool = False) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if remove and self.path is not None and self.path.exists():
            self.path.unlink()



def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run (the CSV)."""
    out = []
    for r in result["results"]:
        row: dict[str, Any] = {"label": r["label"], "pipeline": r["pipeline"], "file": r["file"], **r["variables"]}
        for k, t in r["tasks"].items():
            row[f"{k}_n"] = t["n"]
            row[f"{k}_accuracy"] = round(t["accuracy"], 4)
            if "parse_failures" in t:
                row[f"{k}_parse_failures"] = t["parse_failures"]
                row[f"{k}_mean_iou"] = round(t["mean_iou"], 4)
            row[f"{k}_relative_pct"] = None if t["relative_pct"] is None else round(t["relative_pct"], 2)
        row["accuracy"] = round(r["accuracy"], 4)
        row["relative_pct"] = None if r["relative_pct"] is None else round(r["relative_pct"], 2)
        loy = r.get("loyalty") or {}
        row["loyalty"] = None if loy.get("rate") is None else round(loy["rate"], 4)
        for k, t in (loy.get("tasks") or {}).items():
            row[f"{k}_loyalty"] = None if t["rate"] is None else round(t["rate"], 4)
        for k, t in ((r.get("difficulty") or {}).get("tasks") or {}).items():  # the hard/easy split at its budget
            for side in ("hard", "easy"):
                row[f"{k}_{side}_n"] = t[side]["n"]
                row[f"{k}_{side}_accuracy"] = None if t[side]["accuracy"] is None else round(t[side]["accuracy"], 4)
        row["question_agnostic"] = bool(r.get("question_agnostic"))
        row["visual_tokens_avg"] = r["visual_tokens_avg"]
        row["visual_tokens_full"] = r["visual_tokens_full"]
        row["prefill_ms_median"] = r["prefill_ms_median"]
        row.update(cost_cells(r.get("efficiency") or {}))
        fl = r.get("flops", {})
        if "prefill" in fl:
            row["prefill_gflops"] = round(fl["prefill"] / 1e9, 4)
            row["prefill_flops_ratio"] = round(fl["prefill_ratio"], 4)
            row["decode_step_gflops"] = round(fl["decode_step"] / 1e9, 6)
        row["visual_tokens_per_layer"] = r["visual_tokens_per_layer"]
        out.append(row)
    return out


PARTIAL_PREDICTIONS = "predictions.partial.jsonl"   # the Checkpoint of an eval, inside its output folder
OUTPUT_FILES = ("results.json", "results.csv", "predictions.jsonl", PARTIAL_PREDICTIONS)


def write_results(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json (everything but per-sample predictions), results.csv, predictions.jsonl;
    each written atomically (a temp file renamed), so an old file is never left half-written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "predictions": out / "predictions.jsonl"}
    slim = {**result, "results": [{k: v for k, v in r.items() if k != "predictions"} for r in result["results"]]}
    slim.pop("resumed_batches", None)  # how the results were obtained, not what they are
    atomic_write(paths["json"], json.dumps(slim, indent=2, default=str) + "\n")
    table = rows(result)
    cols: list[str] = []
    for r in table:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in table:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
                    for k, v in r.items()})
    atomic_write(paths["csv"], buf.getvalue())
    atomic_write(paths["predictions"], "".join(json.dumps({"label": r["label"], **p}) + "\n"
                                               for r in result["results"] for p in r["predictions"]))
    return paths


def sweep_axis(grid: dict[str, list[Any]]) -> str | None:
    """The variable to plot accuracy against: `budget` if swept, else the first swept variable
    with more than one numeric value; None if nothing was swept."""
    def numeric(vals):
        return len(vals) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
    if "budget" in grid and numeric(grid["budget"]):
        return "budget"
    for k, v in grid.items():
        if numeric(v):
            return k
    return None
