"""docs/results.md: every shipped pipeline on the embedded model, measured, in one command.

A script's module (beside scripts/gen_results.py, not in the wheel): results generation is
not part of the package.

`python scripts/gen_results.py` (options: `--help`) runs the paper's Section I comparison on
the shapes world: vanilla and each baseline at budgets equivalent to 64/128/192 of LLaVA-1.5's
576 tokens (1/9, 2/9, 1/3 of the grid), grounding Acc@0.5 and VQA exact match on held-out
scenes, every method file run unchanged (its layer schedule scaled to the model's depth), and
the agreement of the ranking with the paper's tables (scripts/agreement.py), and the evaluations
the field argues about (docs/evaluation.md): each run's loyalty to vanilla, its accuracy on the
samples downsampling at the same budget gets wrong (hard) and right (easy), and, for every method
that reads the prompt's text, its question-agnostic twin. A model trained
with an attention-supervised head (recorded in its training log) also gets the caveat rerun:
the text-attention methods with that head left out of their scorers. The markdown is written
from the numbers; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from agreement import render as render_agreement
from field_report import field_table, question_agnostic_lines

from nuwa_graph.apps.evaluate import (
    EvalRun,
    evaluate,
    load_data,
    sample_data,
    tokens_runs,
    with_question_agnostic,
    write_results,
)
from nuwa_graph.embedded import WEIGHTS_DIR
from nuwa_graph.pipeline import Pipeline, load, load_text
from nuwa_graph.resources import shipped_pipeline

BUDGETS = (64, 128, 192)  # LLaVA-1.5 counts of 576; budget * grid_tokens // 576 on the embedded grid


@dataclass(frozen=True)
class Entry:
    """One shipped pipeline as the results table runs it (unchanged unless `fixed` is given)."""

    file: str
    title: str
    fixed: dict[str, Any] = field(default_factory=dict)  # variables set on top of the file (none shipped)
    text_attention: bool = False  # its scorer reads LLM attention (subject of the caveat check)
    key: str = ""  # label of its runs when one file runs twice (default: the file name)

    @property
    def name(self) -> str:
        return self.key or self.file


ENTRIES: tuple[Entry, ...] = (
    Entry("vanilla", "vanilla"),
    Entry("random", "random"),
    Entry("downsample", "downsample"),
    Entry("fastv", "FastV", {}, True),
    Entry("pdrop", "PDrop", {}, True),
    Entry("sparsevlm", "SparseVLM", {}, True),
    Entry("visionzip", "VisionZip"),
    Entry("prumerge_plus", "PruMerge+ (adaptive)"),
    Entry("feather", "FEATHER", {}, True),
    Entry("visionzip_fix", "VisionZip-fix"),
    Entry("fastv_fix", "FastV-fix", {}, True),
    Entry("nuwa", "Nüwa", {}, True),
    # the field's baselines (issue 22); none reads LLM attention rows
    Entry("dart", "DART"),
    Entry("divprune", "DivPrune"),
    Entry("vispruner", "VisPruner"),
    Entry("fastervlm", "FasterVLM"),
    Entry("hiprune", "HiPrune"),
    Entry("cdpruner", "CDPruner"),
    Entry("gprune", "G-Prune"),
    Entry("vtw", "VTW"),
)
LLM_SCORERS = ("scorer.llm-attention", "scorer.sparsevlm-raters")


def with_heads_excluded(pipe: Pipeline, layer: int, heads: list[int], model_vars: dict[str, Any]) -> tuple[Pipeline, int]:
    """`pipe` with `heads` left out of every LLM-attention scorer that reads `layer`; returns
    (pipeline, number of scorers changed). The model must be bound so `layer` is resolved."""
    data = pipe.dump()
    changed = 0
    for spec in data["nodes"]:
        node = pipe.nodes[spec["name"]]
        if node.type_name in LLM_SCORERS and int(node.params.layer) == layer:
            spec.setdefault("params", {})["exclude_heads"] = list(heads)
            changed += 1
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return load_text(text, f"{pipe.source} (heads {heads} of layer {layer} excluded)", model_vars=model_vars), changed


def plan(entries=ENTRIES, budgets=BUDGETS, model_vars: dict[str, Any] | None = None,
         mask: tuple[int, list[int]] | None = None, question_agnostic: bool = False) -> list[EvalRun]:
    """The runs: vanilla once, every budgeted pipeline at every budget, adaptive ones once.
    With `mask` = (layer, heads): only the text-attention pipelines, with those heads excluded.
    With `question_agnostic`: each run that reads the prompt's text followed by its
    question-agnostic twin (evaluate.with_question_agnostic)."""
    runs = []
    for e in entries:
        path = shipped_pipeline(e.file)
        has_budget = "budget" in load(path).variables
        for b in (budgets if has_budget else (None,)):
            over = {**e.fixed, **({"budget": b} if b is not None else {})}
            pipe = load(path, over, model_vars=model_vars)
            label = e.name + (f" budget={b}" if b is not None else "")
            if mask is not None:
                if not e.text_attention:
                    continue
                pipe, n = with_heads_excluded(pipe, mask[0], mask[1], model_vars or {})
                if not n:
                    continue
                label += " -head"
            runs.append(EvalRun(label, f"pipelines/{e.file}.yaml", {"budget": b} if b is not None else {}, pipe))
    return with_question_agnostic(runs, model_vars) if question_agnostic and mask is None else runs


def run_all(model: str, n: int, out: Path, batch: int = 32, max_new_tokens: int = 6, budgets=BUDGETS,
            entries=ENTRIES, caveat: bool = True, progress: Callable[[str, int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate everything; writes results.json/csv/predictions under `out` (main and caveat).
    `on_total(samples)` is told the number of generations once the runs are planned."""
    from nuwa_graph.adapters import load_adapter

    t0 = time.time()
    adapter = load_adapter(model, "float32", "cpu")
    mv = adapter.model_variables()
    tasks = load_data(sample_data(out / "data", n_images=n, seed=HELD_OUT_SEED))
    info = training_info(model)
    head = info.get("supervised_attention_head") or {}
    main_runs = plan(entries, budgets, mv, question_agnostic=True)
    runs = plan(entries, budgets, mv, mask=(int(head["layer"]), [int(head["head"])])) if caveat and head else []
    if on_total:
        on_total((len(main_runs) + len(runs)) * sum(len(t.samples) for t in tasks))
    loads: list[float] = []  # the machine's 1-min load average, every 30 s: prefill ms mean little under load
    told, sampled = progress, 0.0

    def progress(desc: str, k: int) -> None:
        nonlocal sampled
        if time.time() - sampled >= 30:
            sampled = time.time()
            loads.append(os.getloadavg()[0])
        if told:
            told(desc, k)
    main = evaluate(adapter, main_runs, tasks, batch=batch, max_new_tokens=max_new_tokens, progress=progress,
                    difficulty="downsample")
    write_results(main, out / "main")
    masked = None
    if runs:
        masked = evaluate(adapter, runs, tasks, batch=batch, max_new_tokens=max_new_tokens, progress=progress,
                          warmup=False)
        masked["mask"] = {"layer": head["layer"], "heads": [head["head"]]}
        write_results(masked, out / "caveat")
    meta = {"training": info, "n": n, "model": model, "model_variables": mv, "seconds": round(time.time() - t0, 1),
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_1min": {"median": round(statistics.median(loads), 2), "max": round(max(loads), 2)} if loads else None,
            "settings": {"batch": batch, "max_new_tokens": max_new_tokens, "budgets": list(budgets),
                         "seed": HELD_OUT_SEED}}
    (out / "run.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return {"main": main, "caveat": masked, **meta}


def load_run(out: Path) -> dict[str, Any]:
    """What run_all returned, read back from its files (to re-render without re-running)."""
    out = Path(out)
    try:
        meta = json.loads((out / "run.json").read_text())
        main = json.loads((out / "main" / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{out} holds no complete results run ({exc}); run scripts/gen_results.py first") from None
    cav = out / "caveat" / "results.json"
    return {"main": main, "caveat": json.loads(cav.read_text()) if cav.is_file() else None, **meta}


HELD_OUT_SEED = 4242  # world seed of the evaluation scenes (training draws from seed 0; its own eval from 1000003)


def training_info(model: str) -> dict[str, Any]:
    p = Path(model) / "training_log.json"
    if not p.is_file():
        return {}
    log = json.loads(p.read_text())
    return {k: log.get(k) for k in ("command", "minutes", "stopped_early", "images_seen", "final",
                                    "supervised_attention_head", "attention_loss", "params")}


# --- markdown -----------------------------------------------------------------------------------
SHIPPED_WEIGHTS = "nuwa_graph/embedded/weights"   # how the docs name the committed model


REPO_ROOT = Path(__file__).resolve().parent.parent


def shown_model(model: str) -> str:
    """The model as the generated docs name it: the shipped weights by their place in the
    repository, never by this machine's absolute path; any other model as it was given."""
    try:
        if Path(model).resolve() == WEIGHTS_DIR.resolve():
            return SHIPPED_WEIGHTS
    except (OSError, ValueError):
        pass
    return model


def _load_text(res: dict[str, Any]) -> str:
    """The machine's load over the run (prefill ms are only comparable on an otherwise idle machine)."""
    load = res.get("load_1min")
    if not load:
        return ""
    return (f"; 1-min load average over the run: median {load['median']:.1f}, max {load['max']:.1f}, on "
            f"{res.get('cpus') or '?'} CPUs")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _rel(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _by_label(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in result["results"]}


def _key(r: dict[str, Any]) -> str:
    return r["label"].split(" ")[0]


def _acc(r: dict[str, Any], task: str) -> float:
    return r["tasks"][task]["accuracy"]


def _row(title: str, r: dict[str, Any]) -> str:
    g, v = r["tasks"]["grounding"], r["tasks"]["vqa"]
    return (f"| {title} | {r['visual_tokens_avg']:.1f} | {tokens_runs(r['visual_tokens_per_layer'])} | "
            f"{_pct(g['accuracy'])} | {_rel(g['relative_pct'])} | {g['parse_failures']} | "
            f"{_pct(v['accuracy'])} | {_rel(v['relative_pct'])} | {r['prefill_ms_median']:.1f} |")


HEADER = ("| pipeline | avg tokens / layer | tokens per layer | grounding Acc@0.5 % | % of vanilla | unparsed | "
          "VQA EM % | % of vanilla | prefill ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def effect_findings(main: dict[str, Any], budgets=BUDGETS) -> list[str]:
    """Plain sentences on the paper's claims, each computed from the table: VQA kept means
    >= 80 % of vanilla, a grounding collapse < 50 %; Nüwa recovers when its grounding is >= 50 %
    of vanilla and above FastV's and VisionZip's; it helps when it beats VisionZip (same tokens,
    also pruned before the LLM) by at least 5 points of vanilla."""
    by = _by_label(main)
    if "vanilla" not in by:
        return ["(no vanilla run: nothing to compare against)"]
    names = [("fastv", "FastV"), ("visionzip", "VisionZip"), ("nuwa", "Nüwa")]
    out = []
    for b in budgets:
        rs = {f: by.get(f"{f} budget={b}") for f, _ in names}
        if rs["fastv"] is None or rs["visionzip"] is None or rs["nuwa"] is None:
            continue
        have = [(f, t) for f, t in names if rs[f] is not None]
        rel = {f: (rs[f]["tasks"]["vqa"]["relative_pct"], rs[f]["tasks"]["grounding"]["relative_pct"]) for f, _ in have}
        full = rs["nuwa"]["visual_tokens_full"]
        if any(v is None for pair in rel.values() for v in pair):
            out.append(f"Budget {b}: vanilla scores 0 % on a task, so there is no % of vanilla to compare.")
            continue
        kept = [t for f, t in have if rel[f][0] >= 80]
        collapsed = [t for f, t in have if f != "nuwa" and rel[f][1] < 50]
        nuwa_g, vz_g = rel["nuwa"][1], rel["visionzip"][1]
        best_llm = max(rel[f][1] for f, _ in have if f.startswith("fastv"))
        recovers = nuwa_g >= 50 and nuwa_g > max(vz_g, best_llm)
        helps = nuwa_g - vz_g >= 5
        s = (f"Budget {b} ({b * full // 576} of {full} tokens). VQA, % of vanilla: "
             + ", ".join(f"{t} {rel[f][0]:.0f}" for f, t in have)
             + ". Grounding, % of vanilla: " + ", ".join(f"{t} {rel[f][1]:.0f}" for f, t in have)
             + ". Average visual tokens per layer: "
             + ", ".join(f"{t} {rs[f]['visual_tokens_avg']:g}" for f, t in have) + ". "
             f"VQA kept (>= 80 %) by {', '.join(kept) or 'none of them'}; grounding collapses (< 50 %) for "
             f"{', '.join(collapsed) or 'none of FastV / VisionZip'}. ")
        if recovers and "VisionZip" in collapsed and "FastV" in collapsed:
            s += "Nüwa recovers grounding: the paper's effect appears."
        elif helps:
            s += (f"Nüwa recovers part of it ({nuwa_g:.0f} % vs VisionZip's {vz_g:.0f} % at the same tokens) but "
                  + ("not to the paper's level" if nuwa_g < 50 else "not above the LLM-side methods")
                  + ": the effect appears only in part.")
        else:
            s += f"Nüwa does not recover grounding ({nuwa_g:.0f} % vs VisionZip's {vz_g:.0f} %): the effect does not appear."
        out.append(s)
    return out


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's tau between two orderings of the same items (1 = identical, -1 = reversed)."""
    pos = {x: i for i, x in enumerate(b)}
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if pos[a[i]] < pos[a[j]] else -1
    return s / (n * (n - 1) / 2) if n > 1 else 1.0


def caveat_findings(main: dict[str, Any], masked: dict[str, Any] | None, budgets=BUDGETS) -> tuple[list[str], list[str]]:
    """(table rows, sentences): each text-attention run with and without the supervised head,
    and whether the ranking of ALL pipelines per budget and task changes when it is masked."""
    if masked is None:
        return [], ["No caveat check: the model has no recorded supervised attention head."]
    by_main, by_mask = _by_label(main), _by_label(masked)
    rows, notes = [], []
    for lab, m in by_mask.items():
        if not lab.endswith(" -head"):
            continue
        base = by_main.get(lab[: -len(" -head")])
        if base is None:
            continue
        rows.append(f"| {base['label']} | {_pct(_acc(base, 'grounding'))} | {_pct(_acc(m, 'grounding'))} | "
                    f"{_pct(_acc(base, 'vqa'))} | {_pct(_acc(m, 'vqa'))} |")
    for b in budgets:
        labels = [lab for lab in by_main if lab.endswith(f"budget={b}")]
        if not labels:
            continue
        swapped = {lab: by_mask.get(lab + " -head", by_main[lab]) for lab in labels}
        for task in ("grounding", "vqa"):
            before = sorted(labels, key=lambda lab: -_acc(by_main[lab], task))
            after = sorted(labels, key=lambda lab: -_acc(swapped[lab], task))
            short = [lab.split(" ")[0] for lab in before]
            same = before == after
            moved = [] if same else [lab.split(" ")[0] for i, lab in enumerate(after) if before[i] != lab]
            tau = kendall_tau(before, after)
            notes.append(f"Budget {b}, {task}: ranking {' > '.join(short)}; with the head masked "
                         + ("identical." if same else
                            f"{' > '.join(lab.split(' ')[0] for lab in after)} (positions changed: {', '.join(moved)}; "
                            f"Kendall tau {tau:.2f})."))
    return rows, notes


def write_pictures(res: dict[str, Any], out: Path, budget: int = 64) -> list[Path]:
    """Grounding and VQA accuracy vs budget, and the kept tokens of one sample per run at `budget`."""
    from nuwa_graph.apps.viz import draw_kept, plot_accuracy, safe_name

    main = {**res["main"], "results": [r for r in res["main"]["results"] if not r.get("question_agnostic")]}
    paths = [plot_accuracy(main, "budget", out / "grounding_vs_budget.png", metric="grounding"),
             plot_accuracy(main, "budget", out / "vqa_vs_budget.png", metric="vqa")]
    for r in main["results"]:
        if r["variables"].get("budget", budget) != budget or not r.get("sample_image") or not r.get("grid"):
            continue
        paths.append(draw_kept(r["sample_image"], r.get("sample_kept") or {}, r["grid"],
                               out / "kept" / f"{safe_name(r['label'])}.png", title=r["label"]))
    return paths


def schedule_lines(main: dict[str, Any], titles: dict[str, str]) -> list[str]:
    """Which schedule each file used on this model (one line per pipeline, from its first run)."""
    from nuwa_graph.apps.runner import describe_schedule

    seen: dict[str, str] = {}
    for r in main["results"]:
        key = _key(r)
        if key not in seen and r.get("schedule"):
            # files by their place in the repository, never by this machine's absolute path
            seen[key] = describe_schedule(r["schedule"]).replace(f"{REPO_ROOT}/", "")
    if not seen:
        return []
    return ["## Schedules used", "", "What each file resolved to on this model (variables, where each value came "
            "from, and the sites), as the run reports it at the first budget:", ""] + \
        [f"- {titles.get(k, k)}: `{v}`" for k, v in seen.items()] + [""]


def render(res: dict[str, Any], command: str) -> str:
    main, tr = res["main"], res["training"]
    by = _by_label(main)
    full = main["results"][0]["visual_tokens_full"]
    final = (tr.get("final") or {})
    lines = [
        "# Results: every pipeline on the embedded model (shapes world)",
        "",
        f"Generated by `{command}` on {res['date']} ({res['machine']}, CPU"
        + (f" x {res['threads']} threads" if res.get("threads") else "") + f", float32; "
        f"{res['seconds'] / 60:.1f} min" + _load_text(res) + "). Do not edit by hand: rerun the command.",
        "",
        f"- Model: `{shown_model(res['model'])}` (the committed embedded LLaVA: CLIP-style ViT + "
        f"{res['model_variables']['llm_layers']}-layer "
        f"Llama, {full} visual tokens = a {main['results'][0].get('grid')} grid). Its training run "
        f"(docs/embedded.md): {tr.get('minutes', '?')} min, held-out grounding Acc@0.5 "
        f"{_pct(final.get('grounding_acc50'))} %, VQA {_pct(final.get('vqa_em'))} % "
        f"(n = {final.get('n', '?')} each, the trainer's own eval set).",
        f"- Data: {res['n']} grounding + {res['n']} VQA samples from held-out shapes-world scenes "
        f"(world seed {res['settings']['seed']}; training draws from seed 0), one of each per scene. "
        f"Greedy decoding, {res['settings']['max_new_tokens']} new tokens, batch {res['settings']['batch']}.",
        f"- Budgets are LLaVA-1.5 counts of 576 scaled to the {full}-token grid (`budget * grid_tokens // 576`): "
        + ", ".join(f"{b} -> {b * full // 576}" for b in res["settings"]["budgets"])
        + " tokens, i.e. 1/9, 2/9, 1/3 of the grid. Each method counts its budget as its file says (FastV keeps "
          "all tokens before layer K, DART keeps budget + 4 from layer K on, Nüwa's and VTW's budgets are averages "
          "over layers, PruMerge+ is adaptive), so compare "
          "the measured `avg tokens / layer` column too. Every method file runs unchanged: layer schedules "
          "written for LLaVA-1.5's 32 layers are scaled to this model's depth (`scale32`, docs/pipelines.md); "
          "the schedule each file used is listed under \"Schedules used\".",
        "- Metrics: grounding Acc@IoU>=0.5 with the box parsed from the answer (unparsed answers count as wrong "
        "and are counted), VQA exact match; % of vanilla per task; prefill ms = median over batches. Under each "
        "budget's table, the field's evaluations (docs/evaluation.md): loyalty = how often a run answers as "
        "vanilla does on the same sample (VQA: the same normalised answer; grounding: boxes with IoU >= 0.5); hard "
        "/ easy = accuracy on the samples downsampling at the same budget answers wrongly / rightly (VTC-Bench's "
        "split; the counts are in the heading); question-agnostic = accuracy when the method prunes from the "
        "neutral prompt (the question removed, the chat template kept) and answers the full prompt over the "
        "kept tokens.",
        "",
    ]
    titles = {e.name: e.title for e in ENTRIES}
    van = by.get("vanilla")
    for b in res["settings"]["budgets"]:
        lines += [f"## Budget {b} of 576 ({b * full // 576} of {full} visual tokens)", "", HEADER]
        if van:
            lines.append(_row("vanilla", van))
        for r in main["results"]:
            if r["variables"].get("budget") == b and not r.get("question_agnostic"):
                lines.append(_row(titles.get(_key(r), _key(r)), r))
        lines.append("")
        lines += field_table(main, b, titles)
    adaptive = [r for r in main["results"] if not r["variables"] and r["pipeline"] != "vanilla"
                and not r.get("question_agnostic")]
    if adaptive:
        lines += ["## Adaptive (no budget)", "", HEADER]
        lines += [_row(titles.get(_key(r), _key(r)), r) for r in adaptive]
        lines.append("")
    lines += question_agnostic_lines(main, titles)
    lines += ["## Does the paper's effect appear?", "",
              "The paper's claim: VQA survives pruning, grounding collapses for FastV/VisionZip, Nüwa recovers it. "
              "Computed from the tables above:", ""]
    lines += [f"- {s}" for s in effect_findings(main, res["settings"]["budgets"])]
    lines.append("")
    lines += render_agreement(main, titles, tuple(res["settings"]["budgets"]))
    lines += schedule_lines(main, titles)
    masked = res.get("caveat")
    head = (tr.get("supervised_attention_head") or {})
    if not head:
        lines += ["## Attention supervision", "",
                  "None: the model was trained from answers (and question tokens) only, with no loss on any "
                  "attention map in any layer (training_log.json: `attention_loss` "
                  f"{json.dumps(tr.get('attention_loss'))}), so no text-attention scorer reads a head trained to "
                  "look at the target, and no masked-head rerun is needed.", ""]
        lines += ["Files: `runs/results/main/` (results.json, results.csv, predictions.jsonl); plots "
                  "`docs/results/grounding_vs_budget.png`, `docs/results/vqa_vs_budget.png`; the kept tokens of one "
                  "sample per run at budget 64 in `docs/results/kept/`.", ""]
        return "\n".join(lines)
    rows, notes = caveat_findings(main, masked, res["settings"]["budgets"])
    lines += ["## Caveat: the attention-supervised head", "",
              f"Training supervised LLM layer {head.get('layer')} head {head.get('head')} to look from the question at "
              f"the target's patches (weight annealed to 0 from LM step {head.get('zero_from_lm_step')}). Text-attention "
              "scorers (FastV, PDrop, SparseVLM, FEATHER, Nüwa stage 2) that read that layer could be flattered by it. "
              "Below, the same runs with that head left out of every scorer reading that layer "
              "(`exclude_heads` on `scorer.llm-attention` / `scorer.sparsevlm-raters`):", ""]
    if rows:
        lines += ["| run | grounding % | grounding % (head masked) | VQA % | VQA % (head masked) |",
                  "| --- | --- | --- | --- | --- |"] + rows + [""]
    lines += [f"- {s}" for s in notes]
    lines += ["", "Files: `runs/results/main/` and `runs/results/caveat/` (results.json, results.csv, "
              "predictions.jsonl); plots `docs/results/grounding_vs_budget.png`, `docs/results/vqa_vs_budget.png`; "
              "the kept tokens of one sample per run at budget 64 in `docs/results/kept/`.", ""]
    return "\n".join(lines)
