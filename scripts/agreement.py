"""Agreement with the paper: the sandbox's % of vanilla beside the Nüwa paper's, and Kendall's tau.

The paper (arXiv 2602.02951, LLaVA-1.5-7B) reports each method as a % of the unpruned model on
RefCOCO (grounding) and on an average of VQA benchmarks. The shapes world mirrors those two
tasks, so the order in which it ranks the methods can be compared with the paper's. The values
below are the paper's (as quoted in issue 14); everything else is computed from a results run.
Agreement is an outcome to report: nothing here feeds back into a method, the world or the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The paper's tables, % of vanilla (LLaVA-1.5-7B). Keys are the shipped pipeline names.
PAPER: dict[tuple[str, int], dict[str, float]] = {
    ("grounding", 64): {"fastv": 3.81, "sparsevlm": 1.88, "visionzip": 7.28, "nuwa": 47.19},
    ("grounding", 128): {"fastv": 18.55, "sparsevlm": 23.67, "visionzip": 8.1, "nuwa": 75.20},
    ("vqa", 64): {"fastv": 79.36, "pdrop": 71.56, "sparsevlm": 89.93, "visionzip": 93.99, "nuwa": 94.91},
    ("vqa", 128): {"fastv": 85.04, "pdrop": 94.32, "sparsevlm": 93.36, "visionzip": 97.63, "nuwa": 97.87},
}
TASK_TITLE = {"grounding": "RefCOCO avg (paper) / shapes grounding Acc@0.5 (ours)",
              "vqa": "VQA avg (paper) / shapes VQA exact match (ours)"}
# The paper's position-reconstruction table: each fix against its original, on grounding.
FIX_PAIRS = (("visionzip", "visionzip_fix"), ("fastv", "fastv_fix"))


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two score lists over the same items (ties allowed; None if either list
    is constant, where no order exists to compare)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: {len(x)} and {len(y)} scores")
    conc = disc = tie_x = tie_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tie_x) * (conc + disc + tie_y))
    return None if denom == 0 else (conc - disc) / denom


@dataclass(frozen=True)
class Comparison:
    """One paper table: the methods it lists, the paper's value and ours for each, and tau."""

    task: str
    budget: int
    methods: tuple[str, ...]
    paper: tuple[float, ...]
    ours: tuple[float | None, ...]

    @property
    def tau(self) -> float | None:
        pairs = [(p, o) for p, o in zip(self.paper, self.ours) if o is not None]
        if len(pairs) < 2:
            return None
        return kendall_tau([p for p, _ in pairs], [o for _, o in pairs])


def _relative(results: dict[str, Any], name: str, budget: int, task: str) -> float | None:
    for r in results["results"]:
        if r["label"] == f"{name} budget={budget}" and task in r["tasks"]:
            return r["tasks"][task]["relative_pct"]
    return None


def compare(results: dict[str, Any]) -> list[Comparison]:
    """Every paper table the results run can mirror (a method missing from the run shows as None)."""
    out = []
    for (task, budget), paper in PAPER.items():
        methods = tuple(paper)
        out.append(Comparison(task, budget, methods, tuple(paper[m] for m in methods),
                              tuple(_relative(results, m, budget, task) for m in methods)))
    return out


def fix_rows(results: dict[str, Any], budgets: tuple[int, ...]) -> list[tuple[int, str, str, float | None, float | None]]:
    """(budget, original, fix, original's grounding % of vanilla, fix's) for the position table."""
    return [(b, orig, fix, _relative(results, orig, b, "grounding"), _relative(results, fix, b, "grounding"))
            for b in budgets for orig, fix in FIX_PAIRS]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def render(results: dict[str, Any], titles: dict[str, str], budgets: tuple[int, ...]) -> list[str]:
    """The markdown section "Agreement with the paper"."""
    lines = ["## Agreement with the paper", "",
             "Each table of the Nüwa paper that the shapes world can mirror, % of vanilla, the paper's value "
             "(LLaVA-1.5-7B) beside ours, and Kendall's tau-b between the two orderings of the methods "
             "(1 = same order, -1 = reversed; computed here, not typed). With 4 or 5 methods one swapped pair "
             "moves tau by 0.33 or 0.2, so read tau as a coarse summary.", ""]
    for c in compare(results):
        tau = c.tau
        lines += [f"### {TASK_TITLE[c.task]}, budget {c.budget}", "",
                  "| method | paper % of vanilla | ours % of vanilla |", "| --- | --- | --- |"]
        lines += [f"| {titles.get(m, m)} | {p:.2f} | {_num(o)} |" for m, p, o in zip(c.methods, c.paper, c.ours)]
        lines += ["", f"Kendall's tau: **{'-' if tau is None else f'{tau:.2f}'}**"
                  + ("" if tau is not None else " (fewer than two ranked methods, or a constant column)"), ""]
    lines += ["### Position reconstruction (RPME) on grounding", "",
              "The paper's position table replaces each method's position policy by RPME (VisionZip: PERC -> RPME; "
              "FastV: PESP -> RPME) and reports that grounding improves. Its exact values are not in this "
              "project's references, so the check here is the direction: does the fix raise grounding?", "",
              "| budget | original | % of vanilla | with RPME | % of vanilla | fix helps? |",
              "| --- | --- | --- | --- | --- | --- |"]
    for b, orig, fix, o, f in fix_rows(results, budgets):
        verdict = "-" if o is None or f is None else ("yes" if f > o else ("equal" if f == o else "no"))
        lines.append(f"| {b} | {titles.get(orig, orig)} | {_num(o)} | {titles.get(fix, fix)} | {_num(f)} | {verdict} |")
    lines.append("")
    return lines
