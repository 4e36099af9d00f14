"""How an answer is scored (grounding: IoU of the parsed box; VQA: normalised exact match) and
how per-sample scores add up to a task's accuracy; see docs/evaluation.md."""

from __future__ import annotations

from typing import Any

from ..world.boxes import iou, parse_box
from .data import exact_match

IOU_THRESHOLD = 0.5


def grounding_score(answer: str, box, width: int, height: int, threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """{'parsed': bool, 'iou': float, 'correct': bool, 'box': parsed box or None} for one answer."""
    pred = parse_box(answer, width, height)
    v = iou(pred, tuple(box)) if pred is not None else 0.0
    return {"parsed": pred is not None, "iou": v, "correct": pred is not None and v >= threshold,
            "box": None if pred is None else [round(float(c), 2) for c in pred]}


def vqa_score(answer: str, answers: list[str]) -> dict[str, Any]:
    """{'correct': bool} by normalised exact match against any reference answer."""
    return {"correct": bool(exact_match(answer, answers)) if answers else False}


def summarize(kind: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and accuracy of one task's per-sample scores."""
    n = len(scores)
    correct = sum(bool(s["correct"]) for s in scores)
    out: dict[str, Any] = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    if kind == "grounding":
        out["parse_failures"] = sum(not s["parsed"] for s in scores)
        out["mean_iou"] = sum(s["iou"] for s in scores) / n if n else 0.0
    elif kind.startswith("dialog"):  # several questions per image: accuracy per turn too
        per: dict[int, list[bool]] = {}
        for s in scores:
            per.setdefault(int(s["turn"]), []).append(bool(s["correct"]))
        out["per_turn"] = [{"turn": t, "n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)}
                           for t, v in sorted(per.items())]
        boxes = [s for s in scores if "parsed" in s]
        if boxes:
            out["parse_failures"] = sum(not s["parsed"] for s in boxes)
    return out


def tokens_runs(values: list[float]) -> str:
    """[144, 144, 16, 16] -> '144x2 16x2': visual tokens per layer, run-length; averages over
    samples (non-integers) with one decimal."""
    parts: list[list] = []
    for v in values:
        if parts and parts[-1][0] == v:
            parts[-1][1] += 1
        else:
            parts.append([v, 1])
    return " ".join((f"{v:g}" if v == int(v) else f"{v:.1f}") + (f"x{n}" if n > 1 else "") for v, n in parts)


def relative_pct(acc: float | None, ref: float | None) -> float | None:
    """acc as % of ref (None when ref is 0 or missing)."""
    if acc is None or not ref:
        return None
    return 100.0 * acc / ref

