"""The tables `nuwa-graph eval` and `merge` print: accuracy with loyalty, the hard/easy split,
accuracy per turn of dialogs, and what each run cost (with how it was measured)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .efficiency import cost_cells
from .scoring import tokens_runs


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def task_keys(result: dict[str, Any]) -> list[str]:
    """Task columns in data order (a dialog file gives one per turn mode)."""
    keys: list[str] = []
    for r in result["results"]:
        keys += [k for k in r["tasks"] if k not in keys]
    return keys


def accuracy_table(result: dict[str, Any]) -> Table:
    sizes = ", ".join(f"{d['task']}: {d['n']}" for d in result["data"])
    table = Table(title=f"eval on {escape(result['model'])} ({sizes}; relative to {escape(result['reference'])})")
    table.add_column("run", overflow="fold")
    keys = task_keys(result)
    for k in keys:
        table.add_column(f"{k} acc", justify="right")
        if k.startswith("grounding"):
            table.add_column(f"{k} unparsed", justify="right")
    for col in ("mean acc", "rel. %", "loyalty", "avg tokens"):
        table.add_column(col, justify="right")
    table.add_column("tokens per layer", overflow="fold")
    table.add_column("prefill ms", justify="right")
    for r in result["results"]:
        cells = [escape(r["label"])]
        for k in keys:
            t = r["tasks"].get(k)
            cells.append("-" if t is None else _pct(t["accuracy"]))
            if k.startswith("grounding"):
                cells.append("-" if t is None else f"{t['parse_failures']}/{t['n']}")
        rel, loy = r["relative_pct"], (r.get("loyalty") or {}).get("rate")
        cells += [_pct(r["accuracy"]), "-" if rel is None else f"{rel:.1f}", _pct(loy),
                  f"{r['visual_tokens_avg']:.1f}/{r['visual_tokens_full']}",
                  tokens_runs(r["visual_tokens_per_layer"]), f"{r['prefill_ms_median']:.1f}"]
        table.add_row(*cells)
    return table


def split_rows(split: dict[str, Any]) -> tuple[list[str], str, list[tuple[str, list[str]]]]:
    """One budget's hard/easy split as text: (tasks, the counts, per run its cells: accuracy on
    the hard and the easy samples of each task, with correct / n)."""
    tasks = list(split["counts"])
    counts = "; ".join(f"{t}: {c['hard']} hard, {c['easy']} easy" for t, c in split["counts"].items())
    rows = []
    for label, per in split["runs"].items():
        cells = []
        for t in tasks:
            for side in ("hard", "easy"):
                s = (per.get(t) or {}).get(side) or {}
                cells.append("-" if not s.get("n") else f"{_pct(s['accuracy'])} ({s['correct']}/{s['n']})")
        rows.append((label, cells))
    return tasks, counts, rows


def difficulty_tables(result: dict[str, Any]) -> list[Table]:
    """One table per budget: each run's accuracy on the filter's hard and easy samples."""
    diff = result.get("difficulty") or {}
    by = {r["label"]: r for r in result["results"]}
    out = []
    for split in diff.get("splits", []):
        tasks, counts, rows = split_rows(split)
        note = f"; {split['note']}" if split.get("note") else ""
        table = Table(title=f"hard samples at budget {split['budget']}: what {escape(split['filter'])} gets wrong "
                            f"({counts}){escape(note)}")
        table.add_column("run", overflow="fold")
        for t in tasks:
            table.add_column(f"{t} hard", justify="right")
            table.add_column(f"{t} easy", justify="right")
        table.add_column("loyalty", justify="right")
        for label, cells in rows:
            table.add_row(escape(label), *cells, _pct(((by.get(label) or {}).get("loyalty") or {}).get("rate")))
        out.append(table)
    return out


def turn_rows(result: dict[str, Any]) -> tuple[int, list[list[str]]]:
    """Accuracy per turn of every dialog task and mode as text: (turns, rows of run, task, the
    accuracy of each turn, loyalty, the median prefill ms of each turn)."""
    keys = [k for k in task_keys(result) if k.startswith("dialog")]
    if not keys:
        return 0, []
    n = max(len(r["tasks"][k].get("per_turn", [])) for r in result["results"] for k in keys if k in r["tasks"])
    rows = []
    for r in result["results"]:
        for k in keys:
            t = r["tasks"].get(k)
            if t is None:
                continue
            per = {p["turn"]: p for p in t.get("per_turn", [])}
            loy = (((r.get("loyalty") or {}).get("tasks") or {}).get(k) or {}).get("rate")
            pre = " / ".join(f"{v:g}" for v in (t.get("prefill_ms_per_turn") or {}).values())
            rows.append([r["label"], k] + [_pct(per[i]["accuracy"]) if i in per else "-" for i in range(1, n + 1)]
                        + [_pct(loy), pre])
    return n, rows


def turn_table(result: dict[str, Any]) -> Table | None:
    """Accuracy per turn of every dialog task and mode."""
    n, rows = turn_rows(result)
    if not rows:
        return None
    table = Table(title="multi-turn: accuracy per turn (reuse = the first turn's kept tokens and KV cache; "
                        "prune = pruned again each turn)")
    for col in ["run", "task"] + [f"turn {t}" for t in range(1, n + 1)] + ["loyalty", "prefill ms per turn"]:
        table.add_column(col, justify="left" if col in ("run", "task") else "right", overflow="fold")
    for row in rows:
        table.add_row(*[escape(c) for c in row])
    return table


def cost_table(result: dict[str, Any]) -> tuple[Table, list[str]]:
    """What each run cost, and the lines saying how each column was measured."""
    table = Table(title="what each run cost (medians over generate calls; FLOPs counted per sample)")
    cols = [("run", "left"), ("prefill ms", "right"), ("TTFT ms", "right"), ("decode ms/token", "right"),
            ("method ms", "right"), ("peak MiB", "right"), ("KV KiB/sample", "right"), ("prefill GFLOPs", "right")]
    for name, just in cols:
        table.add_column(name, justify=just, overflow="fold")  # type: ignore[arg-type]
    how: list[str] = []
    for r in result["results"]:
        eff = r.get("efficiency") or {}
        c = cost_cells(eff)
        table.add_row(escape(r["label"]), *["-" if c[k] is None else f"{c[k]:g}" for k in
                                            ("prefill_ms", "ttft_ms", "decode_ms_per_token", "method_ms",
                                             "peak_memory_mib", "kv_cache_kib_per_sample", "prefill_gflops")])
        if not how and eff:
            how = [f"{k}: {v['how']}" for k, v in eff.items() if isinstance(v, dict) and "how" in v]
    return table, how


def print_tables(result: dict[str, Any], console: Console) -> None:
    console.print(accuracy_table(result))
    for t in difficulty_tables(result):
        console.print(t)
    tt = turn_table(result)
    if tt is not None:
        console.print(tt)
    ct, how = cost_table(result)
    console.print(ct)
    for line in how:
        console.print(f"  {escape(line)}", highlight=False)
    agnostic = [r for r in result["results"] if r.get("question_agnostic")]
    if agnostic:
        console.print(f"question-agnostic runs pruned with {result['settings'].get('neutral_prompt', '')!r} in the "
                      f"chat template instead of the question; what read it:", highlight=False)
        for r in agnostic:
            console.print(f"  {escape(r['label'])}: {escape(', '.join(r.get('prompt_signals') or []))}", highlight=False)
