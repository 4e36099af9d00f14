"""`nuwa-graph eval`: accuracy of pipelines over a grounding and/or VQA data set.

    from nuwa_graph.apps.evaluate import load_data, plan_runs, evaluate, write_results
    tasks = load_data(["data/refcoco_val.json", "data/gqa.jsonl"], limit=200)
    runs = plan_runs(["pipelines/vanilla.yaml", "pipelines/fastv.yaml"], {"budget": [64, 128]})
    result = evaluate(adapter, runs, tasks, batch=8)
    write_results(result, "runs/eval")

Metrics (see docs/evaluation.md):
- grounding: Acc@IoU>=0.5 of the box parsed from the answer (`world.boxes.parse_box`: coordinate
  tokens, normalised or pixel `[x0, y0, x1, y1]`); an answer without a box is wrong and is
  also counted in `parse_failures`;
- VQA: exact match after normalisation (`data.exact_match`: lower case, no punctuation or
  articles) against any reference answer;
- per run: visual tokens per LLM layer (mean over samples) and their average, median prefill
  time per batch, and accuracy relative to the reference run in % (the pipeline named
  `vanilla` if it is evaluated, else the first run).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..flops import mean_flops
from ..pipeline import Pipeline, load
from ..world.shapes import GROUNDING_TEMPLATE
from .data import GroundingSample
from .errors import EvalError
from .eval_output import OUTPUT_FILES, PARTIAL_PREDICTIONS, Checkpoint, rows, sweep_axis, write_results
from .models import default_model
from .scoring import IOU_THRESHOLD, grounding_score, relative_pct, summarize, tokens_runs, vqa_score
from .tasks import KINDS, SAMPLE_IMAGES, SAMPLE_SEED, Task, detect_kind, load_data, sample_data

GROUNDING_PROMPT = GROUNDING_TEMPLATE   # "where is {expression} ?" (the embedded model's format)
VQA_PROMPT = "{question}"


# --- runs ---------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    label: str
    file: str
    variables: dict[str, Any]     # the swept values this run uses
    pipeline: Pipeline


def plan_runs(files: Iterable[str | Path], grid: dict[str, list[Any]] | None = None) -> list[EvalRun]:
    """Every pipeline x every combination of the swept variables it declares (a pipeline that
    declares none of them runs once). All files are validated; problems are reported together."""
    from .sweep import load_all

    grid = grid or {}
    runs: list[EvalRun] = []
    problems = []
    used: set[str] = set()
    for f in files:
        try:
            base = load(f)
        except PipelineError as exc:
            problems += exc.problems
            continue
        own = {k: v for k, v in grid.items() if k in base.variables}
        used |= set(own)
        try:
            loaded = load_all(f, own) if own else [({}, base)]
        except PipelineError as exc:
            problems += exc.problems
            continue
        for combo, pipe in loaded:
            label = pipe.name + (" " + " ".join(f"{k}={v}" for k, v in combo.items()) if combo else "")
            runs.append(EvalRun(label, str(f), combo, pipe))
    if problems:
        raise PipelineError(problems)
    unknown = [k for k in grid if k not in used]
    if unknown:
        raise EvalError(f"--set {', '.join(unknown)}: no evaluated pipeline has such a variable")
    labels: dict[str, int] = {}
    for r in runs:  # two files with the same pipeline name: tell them apart
        labels[r.label] = labels.get(r.label, 0) + 1
        if labels[r.label] > 1:
            r.label = f"{r.label} ({Path(r.file).stem})"
    return runs


def reference_index(runs: list) -> int:
    """The run accuracy is relative to: the first pipeline named `vanilla`, else the first run."""
    for i, r in enumerate(runs):
        name = r.pipeline.name if isinstance(r, EvalRun) else r["pipeline"]
        if name == "vanilla":
            return i
    return 0


def _prompt(task: Task, s, grounding_prompt: str, vqa_prompt: str) -> str:
    if isinstance(s, GroundingSample):
        return grounding_prompt.format(expression=s.expression)
    return vqa_prompt.format(question=s.question)


def _load_image(s):
    try:
        return s.load_image()
    except (OSError, ValueError) as exc:
        raise EvalError(f"image of sample {s.id!r} ({s.image if isinstance(s.image, str) else '<bytes>'}) could not "
                        f"be read: {exc}") from None


def _score(s, answer: str, image) -> dict[str, Any]:
    if isinstance(s, GroundingSample):
        if (s.width is None or s.height is None) and image is None:
            image = _load_image(s)  # a batch taken from the checkpoint: only the size is needed
        w, h = (s.width or image.size[0]), (s.height or image.size[1])
        return grounding_score(answer, s.box, w, h)
    return vqa_score(answer, s.answers)



def _batch_record(key: str, rep, prompts: list[str]) -> dict[str, Any]:
    """What a finished batch contributes to the results (all JSON)."""
    return {"key": key, "answers": list(rep.answers), "prompts": prompts,
            "counts": [list(c) for c in rep.visual_tokens_per_layer], "avg": list(rep.visual_tokens_avg),
            "full": rep.visual_tokens_full,
            "fulls": list(getattr(rep, "visual_tokens_full_per_sample", None) or [rep.visual_tokens_full] * len(prompts)),
            "prefill_ms": rep.prefill_ms, "kept": rep.kept[0] if rep.kept else {},
            "views": rep.views[0] if getattr(rep, "views", None) else [],
            "schedule": rep.schedule, "signals": list(rep.signals), "flops": list(rep.flops)}


def evaluate(adapter, runs: list[EvalRun], tasks: list[Task], batch: int = 8, max_new_tokens: int = 16,
             seed: int | None = None, grounding_prompt: str = GROUNDING_PROMPT, vqa_prompt: str = VQA_PROMPT,
             progress: Callable[[str, int], None] | None = None, warmup: bool = True,
             checkpoint: str | Path | None = None,
             prompt_fn: Callable[[Any, str], str] | None = None,
             score_fn: Callable[[Any, str, Any], dict[str, Any]] | None = None,
             raw: bool = False) -> dict[str, Any]:
    """Run every run over every task; returns the result dict (see docs/evaluation.md).

    `progress(description, n_done)` is called after each batch. Each run also keeps, for the
    kept-token picture, the first sample of the first task: `sample_kept` (site -> ids),
    `sample_image` (path) and `grid` (rows, cols). `prompt_fn(sample, text)` turns the
    templated prompt into the text given to the adapter and `score_fn(sample, answer, image)`
    replaces the default scoring (`prompts.lmms_eval_style`). With `raw`, each run also carries
    `raw` (unrounded sums and per-task scores) so that shards can be merged exactly
    (`shards.merge`).

    `checkpoint`: the partial predictions file (see Checkpoint). Batches found there (same
    settings, same samples) are taken from it, the others run and are appended as they finish;
    the result is the same as an uninterrupted run's."""
    if batch < 1:
        raise EvalError(f"--batch {batch}: it must be at least 1")
    if not runs:
        raise EvalError("no pipeline to evaluate")
    if not tasks:
        raise EvalError("no data to evaluate on")
    from ..preflight import check_context

    for task in tasks:  # the longest prompt of each task must fit the model's context, before any run
        s_long = max(task.samples, key=lambda s: len(_prompt(task, s, grounding_prompt, vqa_prompt)))
        p_long = _prompt(task, s_long, grounding_prompt, vqa_prompt)
        check_context(adapter, _load_image(s_long), prompt_fn(s_long, p_long) if prompt_fn else p_long,
                      max_new_tokens, where=f"the prompt of sample {s_long.id!r} of {task.source}")
    settings = {"model": str(getattr(adapter, "name", "model")), "device": str(getattr(adapter, "device", "")),
                "dtype": str(getattr(adapter, "dtype", "")), "batch": batch, "max_new_tokens": max_new_tokens,
                "seed": seed, "grounding_prompt": grounding_prompt, "vqa_prompt": vqa_prompt,
                "prompt_fn": getattr(prompt_fn, "__qualname__", None), "score_fn": getattr(score_fn, "__qualname__", None),
                "runs": [[r.label, r.file, r.pipeline.dumps()] for r in runs]}
    ckpt = Checkpoint(checkpoint, settings)
    keys = [Checkpoint.key(run, task, task.samples[i:i + batch]) for run in runs for task in tasks
            for i in range(0, len(task.samples), batch)]
    if warmup and not all(k in ckpt.done for k in keys):  # first-call costs stay out of the timings
        s0 = tasks[0].samples[0]
        p0 = _prompt(tasks[0], s0, grounding_prompt, vqa_prompt)
        adapter.generate(runs[0].pipeline, [_load_image(s0)], [prompt_fn(s0, p0) if prompt_fn else p0],
                         max_new_tokens=1, seed=seed)
    results = []
    try:
        for run in runs:
            results.append(_evaluate_run(adapter, run, tasks, batch, max_new_tokens, seed, grounding_prompt,
                                         vqa_prompt, progress, ckpt, prompt_fn, score_fn, raw))
    finally:
        ckpt.close()
    add_relative(results)
    model = getattr(adapter, "name", "model")
    return {"model": str(model), "device": str(getattr(adapter, "device", "")),
            "dtype": str(getattr(adapter, "dtype", "")).replace("torch.", ""),
            "data": [{"task": t.kind, "source": t.source, "n": len(t.samples), "skipped_bad_records": t.skipped}
                     for t in tasks],
            "settings": {"batch": batch, "max_new_tokens": max_new_tokens, "seed": seed,
                         "iou_threshold": IOU_THRESHOLD, "grounding_prompt": grounding_prompt,
                         "vqa_prompt": vqa_prompt, "prefill_ms": "median over batches of one generate call each"},
            "reference": results[reference_index(results)]["label"],
            "results": results, "resumed_batches": ckpt.reused}


def _evaluate_run(adapter, run: EvalRun, tasks: list[Task], batch: int, max_new_tokens: int, seed: int | None,
                  grounding_prompt: str, vqa_prompt: str, progress, ckpt: Checkpoint, prompt_fn=None,
                  score_fn=None, raw: bool = False) -> dict[str, Any]:
    res: dict[str, Any] = {"label": run.label, "pipeline": run.pipeline.name, "file": run.file,
                           "variables": dict(run.variables), "tasks": {}, "predictions": []}
    per_layer_sum: list[float] = []
    n_counted = 0
    avg_sum = 0.0
    prefill: list[float] = []
    flops: list[dict[str, Any]] = []
    full_sum = 0
    raw_scores: dict[str, list] = {}
    for task in tasks:
        scores = []
        for i in range(0, len(task.samples), batch):
            chunk = task.samples[i:i + batch]
            key = Checkpoint.key(run, task, chunk)
            rec = ckpt.get(key)
            images = None
            if rec is None:
                images = [_load_image(s) for s in chunk]
                prompts = [_prompt(task, s, grounding_prompt, vqa_prompt) for s in chunk]
                if prompt_fn:
                    prompts = [prompt_fn(s, p) for s, p in zip(chunk, prompts)]
                rep = adapter.generate(run.pipeline, images, prompts, max_new_tokens=max_new_tokens, seed=seed)
                rec = _batch_record(key, rep, prompts)
                ckpt.add(rec)
            prefill.append(rec["prefill_ms"])
            flops.extend(rec.get("flops", []))
            # image tokens before pruning, per sample (Qwen2.5-VL's depend on each image's size)
            fulls = rec.get("fulls") or [rec["full"]] * len(chunk)
            for b, s in enumerate(chunk):
                answer = rec["answers"][b]
                if score_fn is not None:
                    sc = score_fn(s, answer, images[b] if images is not None else _load_image(s))
                else:
                    sc = _score(s, answer, images[b] if images is not None else None)
                full_sum += fulls[b]
                scores.append(sc)
                pred = {"task": task.kind, "id": s.id, "prompt": rec["prompts"][b], "answer": answer,
                        "correct": bool(sc["correct"])}
                if isinstance(s, GroundingSample):
                    pred.update(parsed=sc["parsed"], iou=round(sc["iou"], 4), box=sc["box"],
                                target=[round(float(c), 2) for c in s.box])
                else:
                    pred["answers"] = s.answers
                res["predictions"].append(pred)
                counts = rec["counts"][b]
                if len(per_layer_sum) < len(counts):
                    per_layer_sum += [0.0] * (len(counts) - len(per_layer_sum))
                for L, c in enumerate(counts):
                    per_layer_sum[L] += c
                avg_sum += rec["avg"][b]
                n_counted += 1
            if "sample_kept" not in res:
                res["sample_kept"] = rec["kept"]
                res["sample_image"] = chunk[0].image if isinstance(chunk[0].image, str) else None
                res["sample_prompt"] = rec["prompts"][0]
                res["grid"] = _grid(adapter, fulls[0]) if not rec.get("views") else None
                if rec.get("views"):  # a tiled image: a panel per crop view (viz.draw_kept)
                    res["views"] = rec["views"]
                res["schedule"] = rec.get("schedule", {})  # file, variable values (and their origin), sites
                res["signals"] = rec.get("signals", [])
            if progress:
                progress(f"{run.label} [{task.kind}]", len(chunk))
        res["tasks"][task.kind] = summarize(task.kind.split("#")[0], scores)
        raw_scores[task.kind] = scores
    accs = [t["accuracy"] for t in res["tasks"].values()]
    res["accuracy"] = sum(accs) / len(accs)
    res["visual_tokens_per_layer"] = [round(v / n_counted, 3) for v in per_layer_sum] if n_counted else []
    res["visual_tokens_avg"] = round(avg_sum / n_counted, 3) if n_counted else 0.0
    res["visual_tokens_full"] = full_mean(full_sum, n_counted)
    res["prefill_ms_median"] = round(statistics.median(prefill), 3) if prefill else 0.0
    res["flops"] = mean_flops(flops)  # per sample, mean over the data (nuwa_graph/flops.py)
    if raw:
        res["raw"] = {"scores": raw_scores, "per_layer_sum": per_layer_sum, "avg_sum": avg_sum,
                      "full_sum": full_sum, "n": n_counted, "prefill_ms": prefill, "flops": flops}
    return res


def full_mean(full_sum: float, n: int) -> float | int:
    """Image tokens of the unpruned prompt, mean over samples: an int when every sample had the
    same count (LLaVA), else rounded to 3 decimals (Qwen2.5-VL, image-size dependent)."""
    if not n:
        return 0
    v = full_sum / n
    return int(v) if v == int(v) else round(v, 3)


def add_relative(results: list[dict[str, Any]]) -> None:
    """Set `relative_pct` (overall and per task) against the reference run, in place."""
    if not results:
        return
    ref = results[reference_index(results)]
    for r in results:
        r["relative_pct"] = relative_pct(r["accuracy"], ref["accuracy"])
        for k, t in r["tasks"].items():
            t["relative_pct"] = relative_pct(t["accuracy"], ref["tasks"].get(k, {}).get("accuracy"))


def _grid(adapter, n_tokens: int) -> list[int] | None:
    g = getattr(adapter, "grid", None)
    if isinstance(g, (tuple, list)) and len(g) == 2:
        return [int(g[0]), int(g[1])]
    side = int(round(n_tokens ** 0.5))
    return [side, side] if side * side == n_tokens and side else None


# Moved to their own modules (errors, models, scoring, tasks, eval_output) and still importable
# from here, where the eval's users (the CLI, shards, docs/evaluation.md) look for them.
__all__ = [
    "GROUNDING_PROMPT",
    "IOU_THRESHOLD",
    "KINDS",
    "SAMPLE_IMAGES",
    "SAMPLE_SEED",
    "VQA_PROMPT",
    "OUTPUT_FILES",
    "PARTIAL_PREDICTIONS",
    "Checkpoint",
    "EvalError",
    "EvalRun",
    "Task",
    "add_relative",
    "default_model",
    "detect_kind",
    "evaluate",
    "full_mean",
    "grounding_score",
    "load_data",
    "plan_runs",
    "reference_index",
    "relative_pct",
    "rows",
    "sample_data",
    "summarize",
    "sweep_axis",
    "tokens_runs",
    "vqa_score",
    "write_results",
]
