"""scripts/agreement.py: Kendall's tau and the paper-vs-sandbox tables are computed, not typed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import agreement  # noqa: E402


def test_tau_identical_reversed_and_ties():
    assert agreement.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert agreement.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one discordant pair of six: (5 - 1) / 6
    assert agreement.kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: pairs 6, concordant 5, tied-in-y 1 -> 5 / sqrt(6 * 5)
    assert agreement.kendall_tau([1, 2, 3, 4], [1, 2, 3, 3]) == pytest.approx(5 / (6 * 5) ** 0.5)
    assert agreement.kendall_tau([1, 2, 3], [7, 7, 7]) is None


def _run(values: dict[tuple[str, int, str], float]) -> dict:
    results = []
    for (name, budget, task), v in values.items():
        label = f"{name} budget={budget}"
        r = next((r for r in results if r["label"] == label), None)
        if r is None:
            r = {"label": label, "tasks": {}}
            results.append(r)
        r["tasks"][task] = {"relative_pct": v}
    return {"results": results}


def test_compare_reads_the_run_and_ranks_against_the_paper():
    paper = agreement.PAPER[("grounding", 64)]
    # ours ranks the four methods exactly as the paper does -> tau 1; reversed -> -1
    same = _run({(m, 64, "grounding"): v * 2 for m, v in paper.items()})
    rev = _run({(m, 64, "grounding"): -v for m, v in paper.items()})
    c_same = next(c for c in agreement.compare(same) if (c.task, c.budget) == ("grounding", 64))
    c_rev = next(c for c in agreement.compare(rev) if (c.task, c.budget) == ("grounding", 64))
    assert c_same.tau == pytest.approx(1.0) and c_rev.tau == pytest.approx(-1.0)
    assert c_same.paper == tuple(paper.values())
    # a table the run does not hold has no tau and renders as '-'
    c_missing = next(c for c in agreement.compare(same) if (c.task, c.budget) == ("vqa", 128))
    assert c_missing.tau is None and set(c_missing.ours) == {None}
    text = "\n".join(agreement.render(same, {"nuwa": "Nüwa"}, (64,)))
    assert "| Nüwa | 47.19 | 94.4 |" in text and "Kendall's tau: **1.00**" in text


def test_fix_rows_say_whether_rpme_helps():
    run = _run({("visionzip", 64, "grounding"): 10.0, ("visionzip_fix", 64, "grounding"): 30.0,
                ("fastv", 64, "grounding"): 20.0, ("fastv_fix", 64, "grounding"): 5.0})
    text = "\n".join(agreement.render(run, {}, (64,)))
    assert "| 64 | visionzip | 10.0 | visionzip_fix | 30.0 | yes |" in text
    assert "| 64 | fastv | 20.0 | fastv_fix | 5.0 | no |" in text
