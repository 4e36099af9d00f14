"""`nuwa-graph report RESULTS.json -o report.html`: one self-contained HTML page of an eval.

Per task, accuracy against the budget and against counted prefill FLOPs (the Pareto frontier
drawn); the accuracy table with % of vanilla and loyalty; the hard/easy split; accuracy per
turn of dialogs; what each run cost, with how it was measured; the kept tokens of one sample
per run. Everything is inline (SVG, base64 images, CSS, a small script that records what the
browser rendered in `#render-check`): the page fetches nothing.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from .efficiency import cost_cells
from .eval_tables import split_rows, task_keys, turn_rows
from .loyalty import run_budget
from .report_svg import Series, image_data_uri, kept_picture, plot
from .scoring import tokens_runs

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555}.plots{display:flex;flex-wrap:wrap;gap:12px}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.plot .frame{fill:#fff;stroke:#999}.plot .grid{stroke:#eee}.plot .tick,.plot .legend{font-size:11px;fill:#444}
.plot .axis{font-size:12px;fill:#222}.plot .ptitle{font-size:13px;font-weight:600;fill:#222}
.plot .frontier{fill:none;stroke:#000;stroke-width:1;stroke-dasharray:2 3}.plot .frontier-point{fill:none;stroke:#000}
.kept-grid{display:flex;flex-wrap:wrap;gap:16px}.kept figcaption{font-weight:600;margin-bottom:4px}
.panels{display:flex;gap:8px;margin-bottom:6px}.stack{position:relative}
.stack img,.stack .grid-overlay,.stack .noimg{position:absolute;left:0;top:0}
.noimg{background:#ccc;color:#555;font-size:11px;display:flex;align-items:center;justify-content:center}
.grid-overlay .drop{fill:#000;fill-opacity:.6}.grid-overlay .keep{fill:none;stroke:#ffe600;stroke-width:.8}
.site{font-size:12px;color:#444}.how{font-size:12px;color:#555}.qa{color:#7b4173}
"""

# records what the browser laid out and decoded; the browser test reads it (tests/test_report_html.py)
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var plots = Array.prototype.filter.call(document.querySelectorAll('svg.plot'), function (s) {
    var r = s.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  var points = document.querySelectorAll('svg.plot circle.point').length;
  var imgs = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  var rows = document.querySelectorAll('table tbody tr').length;
  document.getElementById('render-check').textContent = JSON.stringify(
    {plots: plots.length, points: points, images: imgs.length, images_total: document.images.length,
     table_rows: rows, tables: document.querySelectorAll('table').length});
});
"""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _series_key(r: dict[str, Any]) -> str:
    return r["pipeline"] + (" (question-agnostic)" if r.get("question_agnostic") else "")


def task_plots(result: dict[str, Any], task: str) -> str:
    runs = [r for r in result["results"] if task in r["tasks"]]
    budgets = [run_budget(r) for r in runs]
    use_budget = any(isinstance(b, (int, float)) and not isinstance(b, bool) for b in budgets)
    by: dict[str, Series] = {}
    refs: list[Series] = []
    scatter: dict[str, Series] = {}
    for r in runs:
        acc = 100 * r["tasks"][task]["accuracy"]
        b = run_budget(r)
        name = _series_key(r)
        if use_budget and not isinstance(b, (int, float)):
            refs.append(Series(r["label"], [], lines=False, horizontal=acc))
        else:
            x = float(b) if use_budget else float(r["visual_tokens_avg"])
            by.setdefault(name, Series(name, [])).points.append((x, acc, f"{r['label']}: {acc:.1f} %"))
        gf = (r.get("flops") or {}).get("prefill")
        if gf:
            scatter.setdefault(name, Series(name, [], lines=True)).points.append(
                (gf / 1e9, acc, f"{r['label']}: {acc:.1f} % at {gf / 1e9:.3g} GFLOPs"))
    xb = "budget (the pipelines' `budget` variable)" if use_budget else "visual tokens per LLM layer (measured)"
    p1 = plot(list(by.values()) + refs, f"{task}: accuracy vs budget (Pareto frontier dotted)", xb, "accuracy (%)",
              frontier=True)
    p2 = plot(list(scatter.values()), f"{task}: accuracy vs prefill FLOPs (Pareto frontier dotted)",
              "prefill GFLOPs per sample (counted)", "accuracy (%)", frontier=True)
    return f'<div class="plots">{p1}{p2}</div>'


def accuracy_table(result: dict[str, Any]) -> str:
    keys = task_keys(result)
    head = ["run"] + [f"{k} acc %" for k in keys] + ["% of vanilla"] + [f"{k} loyalty %" for k in keys] + \
        ["avg tokens / layer", "tokens per layer", "question-agnostic"]
    rows = []
    for r in result["results"]:
        loy = (r.get("loyalty") or {}).get("tasks") or {}
        rel = r.get("relative_pct")
        qa = "yes" if r.get("question_agnostic") else ("by construction" if not r.get("prompt_signals") else "no")
        rows.append([escape(r["label"])] + [_pct(r["tasks"][k]["accuracy"]) if k in r["tasks"] else "-" for k in keys]
                    + ["-" if rel is None else f"{rel:.1f}"]
                    + [_pct((loy.get(k) or {}).get("rate")) for k in keys]
                    + [f"{r['visual_tokens_avg']:.1f}", escape(tokens_runs(r["visual_tokens_per_layer"])), qa])
    return _table(head, rows, "accuracy")


def difficulty_section(result: dict[str, Any]) -> str:
    diff = result.get("difficulty") or {}
    if not diff.get("splits"):
        return ""
    parts = [f"<h2>Hard samples</h2><p>{escape(diff.get('rule', ''))}.</p>"]
    for split in diff["splits"]:
        tasks, counts, rows = split_rows(split)
        head = ["run"] + [f"{t} {side}" for t in tasks for side in ("hard", "easy")]
        parts.append(f"<h3>budget {escape(str(split['budget']))}: filter {escape(split['filter'])} "
                     f"({escape(counts)})</h3>"
                     + (f'<p class="how">{escape(split["note"])}</p>' if split.get("note") else "")
                     + _table(head, [[escape(label)] + [escape(c) for c in cells] for label, cells in rows],
                              "difficulty"))
    return "".join(parts)


def turns_section(result: dict[str, Any]) -> str:
    n, rows = turn_rows(result)
    if not rows:
        return ""
    head = ["run", "task"] + [f"turn {t} %" for t in range(1, n + 1)] + ["loyalty %", "prefill ms per turn"]
    return ("<h2>Multi-turn</h2><p>reuse: later turns continue the first turn's KV cache (its kept tokens); "
            "prune: every turn is a fresh run over the conversation, pruned again.</p>"
            + _table(head, [[escape(c) for c in row] for row in rows], "turns"))


def cost_section(result: dict[str, Any]) -> str:
    names = [("prefill_ms", "prefill ms"), ("ttft_ms", "TTFT ms"), ("decode_ms_per_token", "decode ms / token"),
             ("method_ms", "method ms"), ("peak_memory_mib", "peak MiB"), ("kv_cache_kib_per_sample", "KV KiB / sample"),
             ("prefill_gflops", "prefill GFLOPs")]
    rows: list[list[str]] = []
    how: list[str] = []
    for r in result["results"]:
        eff = r.get("efficiency") or {}
        c = cost_cells(eff)
        rows.append([escape(r["label"])] + ["-" if c[k] is None else f"{c[k]:g}" for k, _ in names])
        if not how and eff:
            how = [f"<li><b>{escape(k)}</b>: {escape(v['how'])}</li>" for k, v in eff.items()
                   if isinstance(v, dict) and "how" in v]
    return ("<h2>Costs</h2>" + _table(["run"] + [n for _, n in names], rows, "costs")
            + f'<ul class="how">{"".join(how)}</ul>')


def kept_section(result: dict[str, Any]) -> str:
    uris: dict[str, str | None] = {}
    figs = []
    for r in result["results"]:
        if not r.get("grid") and not r.get("views"):
            continue
        img = r.get("sample_image")
        if img not in uris:
            uris[img] = image_data_uri(img)
        figs.append(kept_picture(uris[img], r.get("sample_kept") or {}, r.get("grid"), r["label"],
                                 views=r.get("views")))
    if not figs:
        return ""
    prompt = next((r.get("sample_prompt") for r in result["results"] if r.get("sample_prompt")), "")
    return (f"<h2>Kept tokens</h2><p>The first sample of the first task (prompt: <code>{escape(str(prompt))}</code>): "
            f"dropped patches shaded, kept ones outlined, one row per site where tokens were dropped (a tiled image: "
            f"a panel per crop view in each row).</p>"
            f'<div class="kept-grid">{"".join(figs)}</div>')


def render(result: dict[str, Any], source: str = "") -> str:
    data = ", ".join(f"{d['task']}: {d['n']} ({escape(str(d['source']))})" for d in result.get("data", []))
    st = result.get("settings", {})
    qa = [r for r in result["results"] if r.get("question_agnostic")]
    qa_note = ""
    if qa:
        qa_note = (f"<p class=\"qa\">Question-agnostic runs pruned with the neutral prompt "
                   f"<code>{escape(repr(st.get('neutral_prompt', '')))}</code> in the chat template instead of the "
                   f"question (empty: the question removed), then answered the full prompt over the kept tokens. "
                   f"What read the neutral prompt: "
                   + "; ".join(f"{escape(r['label'])}: {escape(', '.join(r.get('prompt_signals') or []))}" for r in qa)
                   + "</p>")
    body = [f"<h1>nuwa-graph eval report</h1><p class=\"meta\">model <code>{escape(result.get('model', ''))}</code> "
            f"({escape(result.get('device', ''))}, {escape(result.get('dtype', ''))}); data {data}; batch "
            f"{st.get('batch')}, {st.get('max_new_tokens')} new tokens; reference {escape(result.get('reference', ''))}"
            f"{'; from ' + escape(source) if source else ''}.</p>"]
    for task in task_keys(result):
        body.append(f"<h2>{escape(task)}</h2>" + task_plots(result, task))
    body.append("<h2>Accuracy, % of vanilla and loyalty</h2><p>Loyalty: how often a run answers as vanilla does on "
                "the same sample (VQA: the same normalised answer; grounding: boxes with IoU &gt;= 0.5).</p>"
                + accuracy_table(result) + qa_note)
    body += [difficulty_section(result), turns_section(result), cost_section(result), kept_section(result)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>nuwa-graph report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}"
            f'<pre id="render-check" hidden></pre><script>{CHECK_SCRIPT}</script></body></html>\n')


def load_results(path: str | Path) -> dict[str, Any]:
    """An eval's results.json (or its folder); a clear error for anything else."""
    from .errors import EvalError

    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalError(f"{path}: cannot be read ({exc.strerror or exc}); give the results.json that "
                        f"`nuwa-graph eval -o DIR` wrote (or DIR)") from None
    except ValueError as exc:
        raise EvalError(f"{p}: not JSON ({exc})") from None
    if not isinstance(result, dict) or not isinstance(result.get("results"), list) or not result["results"]:
        raise EvalError(f"{p}: not an eval results file (no 'results' list); give the results.json of "
                        f"`nuwa-graph eval`")
    return result
