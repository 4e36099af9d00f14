"""Two readings of an eval's predictions the field argues about (docs/evaluation.md):

- loyalty (EffiVLM-Bench): how often a pruned run gives the answer the unpruned model gives on
  the same sample: VQA answers equal after normalisation; grounding boxes with IoU >= 0.5
  between the two (two unparsed answers agree when their text does);
- hard samples (VTC-Bench): a filter run (the downsample baseline at the same budget) splits
  the samples into those it gets wrong ("hard") and right ("easy"); each run's accuracy on
  both, with counts.

Both are computed from the per-sample predictions, after the runs, so shards merged by
`nuwa-graph merge` get them too.
"""

from __future__ import annotations

from typing import Any

from ..world.boxes import iou
from .data import normalize_answer
from .scoring import IOU_THRESHOLD

DIFFICULTY_FILTERS = ("downsample",)  # the filter pipelines `--difficulty` takes (shipped pipeline names)


def _key(p: dict[str, Any]) -> tuple[str, str]:
    return (p["task"], str(p["id"]))


def agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two predictions of the same sample agree (see the module docstring)."""
    if "target" in a or "box" in a:  # grounding
        if a.get("box") is not None and b.get("box") is not None:
            return iou(tuple(a["box"]), tuple(b["box"])) >= IOU_THRESHOLD
        if a.get("box") is None and b.get("box") is None:
            return normalize_answer(a["answer"]) == normalize_answer(b["answer"])
        return False
    return normalize_answer(a["answer"]) == normalize_answer(b["answer"])


def loyalty(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Agreement of `run` with `ref` on the samples both answered: overall and per task."""
    theirs = {_key(p): p for p in ref["predictions"]}
    tasks: dict[str, dict[str, Any]] = {}
    for p in run["predictions"]:
        q = theirs.get(_key(p))
        if q is None:
            continue
        t = tasks.setdefault(p["task"], {"n": 0, "agree": 0})
        t["n"] += 1
        t["agree"] += int(agree(p, q))
    for t in tasks.values():
        t["rate"] = t["agree"] / t["n"] if t["n"] else None
    rates = [t["rate"] for t in tasks.values() if t["rate"] is not None]
    return {"reference": ref["label"], "rate": sum(rates) / len(rates) if rates else None, "tasks": tasks}


def add_loyalty(result: dict[str, Any], ref_index: int | None) -> None:
    """Set `loyalty` on every run (None without a vanilla reference), in place."""
    if ref_index is None:
        for r in result["results"]:
            r["loyalty"] = None
        return
    ref = result["results"][ref_index]
    for r in result["results"]:
        r["loyalty"] = loyalty(r, ref)


def run_budget(r: dict[str, Any]) -> Any:
    """The budget a run was evaluated at (its `budget` variable), or None."""
    return r.get("budget", r.get("variables", {}).get("budget"))


def _split_counts(preds: list[dict[str, Any]], hard: set, easy: set) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in preds:
        k = _key(p)
        side = "hard" if k in hard else "easy" if k in easy else None
        if side is None:
            continue
        t = out.setdefault(p["task"], {"hard": {"n": 0, "correct": 0}, "easy": {"n": 0, "correct": 0}})
        t[side]["n"] += 1
        t[side]["correct"] += int(bool(p["correct"]))
    for t in out.values():
        for side in ("hard", "easy"):
            s = t[side]
            s["accuracy"] = s["correct"] / s["n"] if s["n"] else None
    return out


def add_difficulty(result: dict[str, Any], filter_name: str) -> None:
    """The hard/easy split of every budget that has a `filter_name` run, in place: each run at
    that budget (and each run without a budget, such as vanilla) gets its accuracy on the
    filter's wrong ("hard") and right ("easy") samples; `result['difficulty']` lists the splits."""
    splits = []
    filters = [r for r in result["results"] if r["pipeline"] == filter_name and run_budget(r) is not None]
    for f in filters:
        b = run_budget(f)
        hard = {_key(p) for p in f["predictions"] if not p["correct"]}
        easy = {_key(p) for p in f["predictions"] if p["correct"]}
        counts: dict[str, dict[str, int]] = {}
        for p in f["predictions"]:
            c = counts.setdefault(p["task"], {"hard": 0, "easy": 0})
            c["hard" if not p["correct"] else "easy"] += 1
        runs = {}
        for r in result["results"]:
            rb = run_budget(r)
            if rb is None or rb == b:
                runs[r["label"]] = _split_counts(r["predictions"], hard, easy)
                if rb == b:
                    r["difficulty"] = {"filter": f["label"], "budget": b, "tasks": runs[r["label"]]}
        split = {"budget": b, "filter": f["label"], "counts": counts, "runs": runs,
                 "filter_tokens": f.get("visual_tokens_avg")}
        kept = f.get("visual_tokens_avg")
        if isinstance(b, (int, float)) and isinstance(kept, (int, float)) and kept and abs(kept - b) > 0.5:
            # a filter that keeps another count is a different difficulty: said, never silently the same split
            split["note"] = (f"the filter kept {kept:g} visual tokens per sample on average, not {b:g}: this "
                             f"model counts its budget differently (downsample: per spatial part of a tiled "
                             f"image, docs/families.md)")
        splits.append(split)
    result["difficulty"] = {"filter": filter_name, "splits": splits,
                            "rule": f"hard = samples {filter_name} at the same budget answers wrongly, easy = rightly "
                                    f"(VTC-Bench)"}
