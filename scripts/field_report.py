"""The field's evaluations on the results page (docs/results.md): loyalty to vanilla, the
hard/easy split of VTC-Bench and question-agnostic pruning, per budget and per method.

A script's module beside scripts/results_report.py (which renders the rest of the page); every
number comes from an eval's results (nuwa_graph/apps/loyalty.py, nuwa_graph/replay.py).
"""

from __future__ import annotations

import json
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _acc(r: dict[str, Any], task: str) -> float:
    return r["tasks"][task]["accuracy"]


def _key(r: dict[str, Any]) -> str:
    return r["label"].split(" ")[0]


def _split(main: dict[str, Any], budget) -> dict[str, Any] | None:
    return next((sp for sp in (main.get("difficulty") or {}).get("splits", []) if sp["budget"] == budget), None)


def _side(per: dict[str, Any] | None, task: str, side: str) -> str:
    s = ((per or {}).get(task) or {}).get(side) or {}
    return "-" if not s.get("n") else _pct(s["accuracy"])


def field_table(main: dict[str, Any], budget, titles: dict[str, str]) -> list[str]:
    """Loyalty, hard / easy and question-agnostic accuracy of every run at `budget` (and vanilla)."""
    by = {r["label"]: r for r in main["results"]}
    split = _split(main, budget)
    runs = [r for r in main["results"] if not r.get("question_agnostic")
            and (r["variables"].get("budget") == budget or not r["variables"])]
    if not runs:
        return []
    counts = ""
    if split:
        counts = " Hard / easy: " + "; ".join(f"{t} {c['hard']} / {c['easy']}" for t, c in split["counts"].items()) \
            + f" samples ({split['filter']} wrong / right)."
    out = [f"Loyalty, hard samples and question-agnostic pruning at budget {budget}.{counts} `=`: the method reads "
           "the image only, so it is question-agnostic by construction (the same run).", "",
           "| pipeline | loyalty grounding % | loyalty VQA % | grounding hard % | grounding easy % | VQA hard % | "
           "VQA easy % | question-agnostic grounding % | question-agnostic VQA % |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        loy = (r.get("loyalty") or {}).get("tasks") or {}
        per = (split or {}).get("runs", {}).get(r["label"])
        twin = by.get(f"{r['label']} (question-agnostic)")
        if twin is not None:
            qa = [_pct(_acc(twin, "grounding")), _pct(_acc(twin, "vqa"))]
        elif not r.get("prompt_signals"):
            qa = [f"= {_pct(_acc(r, 'grounding'))}", f"= {_pct(_acc(r, 'vqa'))}"]
        else:
            qa = ["-", "-"]
        name = "vanilla" if r["pipeline"] == "vanilla" else titles.get(_key(r), _key(r))
        out.append(f"| {name} | {_pct((loy.get('grounding') or {}).get('rate'))} | "
                   f"{_pct((loy.get('vqa') or {}).get('rate'))} | {_side(per, 'grounding', 'hard')} | "
                   f"{_side(per, 'grounding', 'easy')} | {_side(per, 'vqa', 'hard')} | {_side(per, 'vqa', 'easy')} | "
                   f"{qa[0]} | {qa[1]} |")
    return out + [""]


def question_agnostic_lines(main: dict[str, Any], titles: dict[str, str]) -> list[str]:
    """What each method reads of the prompt (what sees the neutral prompt when it runs
    question-agnostically), from the runs themselves."""
    seen: dict[str, list[str]] = {}
    for r in main["results"]:
        key = _key(r)
        if key not in seen and not r.get("question_agnostic"):
            seen[key] = list(r.get("prompt_signals") or [])
    if not seen:
        return []
    neutral = main.get("settings", {}).get("neutral_prompt", "")
    lines = ["## Question-agnostic pruning: what each method reads of the prompt", "",
             f"A question-agnostic run prunes each image from the neutral prompt {json.dumps(neutral)} (the question "
             "removed, the chat template kept), records the pruning and replays it on the full prompt "
             "(docs/evaluation.md). What sees the neutral prompt instead of the question, per method (as the "
             "first budget's run read it):", ""]
    for key, sigs in seen.items():
        lines.append(f"- {titles.get(key, key)}: " + (", ".join(f"`{x}`" for x in sigs) if sigs else
                                                      "nothing (reads the image only: question-agnostic by "
                                                      "construction)"))
    return lines + [""]
