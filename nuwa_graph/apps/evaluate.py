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
  `vanilla` if it is evaluated, else the first run);
- loyalty to vanilla and the hard/easy split (loyalty.py), costs (efficiency.py), multi-turn
  dialogs per turn (dialogs.py), question-agnostic runs (nuwa_graph/replay.py).

The per-run loop is eval_batches.py; `with_vanilla`, `with_difficulty_filter` and
`with_question_agnostic` add the runs those evaluations need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..pipeline import Pipeline, load
from ..replay import NEUTRAL_PROMPT, prompt_signals, reads_prompt
from ..resources import shipped_pipeline
from ..world.shapes import GROUNDING_TEMPLATE
from .dialogs import MODES
from .errors import EvalError
from .eval_batches import evaluate_run, finish_run, full_mean, load_image, placed, prompt_of
from .eval_output import OUTPUT_FILES, PARTIAL_PREDICTIONS, Checkpoint, rows, sweep_axis, write_results
from .loyalty import DIFFICULTY_FILTERS, add_difficulty, add_loyalty
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
    question_agnostic: bool = False  # prune from a neutral prompt, answer the full one (replay.py)

    @property
    def budget(self) -> Any:
        """The pipeline's `budget` variable (None: it has none)."""
        return self.pipeline.variables.get("budget")


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


def with_vanilla(runs: list[EvalRun]) -> tuple[list[EvalRun], bool]:
    """`runs` plus the shipped vanilla pipeline as the reference (loyalty, % of vanilla) when
    none of them is vanilla; -> (runs, whether it was added)."""
    if any(r.pipeline.name == "vanilla" for r in runs):
        return runs, False
    return runs + plan_runs([shipped_pipeline("vanilla")]), True


def with_difficulty_filter(runs: list[EvalRun], name: str) -> list[EvalRun]:
    """`runs` plus the filter pipeline `name` (shipped) at every budget some run has and no
    `name` run covers yet (VTC-Bench's split needs it at the same budget)."""
    if name not in DIFFICULTY_FILTERS:
        raise EvalError(f"--difficulty {name!r}: the filter must be one of {', '.join(DIFFICULTY_FILTERS)}")
    have = {r.budget for r in runs if r.pipeline.name == name}
    need = sorted({r.budget for r in runs if r.budget is not None} - have,
                  key=lambda b: (0, b, "") if isinstance(b, (int, float)) else (1, 0, str(b)))
    if not need and not have:
        raise EvalError(f"--difficulty {name}: no evaluated pipeline has a budget, so there is no budget to run "
                        f"{name} at; evaluate budgeted pipelines (e.g. --set budget=64)")
    path = shipped_pipeline(name)
    extra = []
    for b in need:
        try:
            pipe = load(path, {"budget": b})
        except PipelineError as exc:
            raise EvalError(f"--difficulty {name}: {path} at budget={b!r}: {exc}") from None
        extra.append(EvalRun(f"{pipe.name} budget={b} (filter)", str(path), {"budget": b}, pipe))
    return runs + extra


def with_question_agnostic(runs: list[EvalRun], model_vars: dict[str, Any] | None = None) -> list[EvalRun]:
    """Each run whose pruning reads the prompt's text (replay.prompt_signals), followed by its
    question-agnostic twin; runs that read the image only are question-agnostic already.
    `model_vars` (the adapter's): what a file reads is that of the file it runs as on the model
    (`family_files`: nuwa.yaml runs nuwa_qwen.yaml on the Qwen-VL line)."""
    out = []
    for r in runs:
        out.append(r)
        pipe = r.pipeline
        if model_vars:
            try:
                pipe = pipe.bind_model(model_vars)
            except PipelineError:
                pass  # it does not fit the model: evaluate() says so; the file as given decides here
        if prompt_signals(pipe) and not r.question_agnostic:
            out.append(EvalRun(f"{r.label} (question-agnostic)", r.file, dict(r.variables), r.pipeline, True))
    return out


def vanilla_index(results: list[dict[str, Any]]) -> int | None:
    """The first result of the pipeline named vanilla (None: no vanilla run)."""
    return next((i for i, r in enumerate(results) if r["pipeline"] == "vanilla"), None)


def reference_index(runs: list) -> int:
    """The run accuracy is relative to: the first pipeline named `vanilla`, else the first run."""
    for i, r in enumerate(runs):
        name = r.pipeline.name if isinstance(r, EvalRun) else r["pipeline"]
        if name == "vanilla":
            return i
    return 0


def evaluate(adapter, runs: list[EvalRun], tasks: list[Task], batch: int = 8, max_new_tokens: int = 16,
             seed: int | None = None, grounding_prompt: str = GROUNDING_PROMPT, vqa_prompt: str = VQA_PROMPT,
             progress: Callable[[str, int], None] | None = None, warmup: bool = True,
             checkpoint: str | Path | None = None,
             prompt_fn: Callable[[Any, str], str] | None = None,
             score_fn: Callable[[Any, str, Any], dict[str, Any]] | None = None,
             raw: bool = False, neutral_prompt: str = NEUTRAL_PROMPT, turn_modes: tuple[str, ...] = MODES,
             difficulty: str | None = None) -> dict[str, Any]:
    """Run every run over every task; returns the result dict (see docs/evaluation.md).

    `progress(description, n_done)` is called after each batch. Each run also keeps, for the
    kept-token picture, the first sample of the first task: `sample_kept` (site -> ids),
    `sample_image` (path) and `grid` (rows, cols). `prompt_fn(sample, text)` turns the
    templated prompt into the text given to the adapter and `score_fn(sample, answer, image)`
    replaces the default scoring (`prompts.lmms_eval_style`). With `raw`, each run also carries
    `raw` (unrounded sums and per-task scores) so that shards can be merged exactly
    (`shards.merge`).

    A run with `question_agnostic` prunes from `neutral_prompt` (replay.py); dialog tasks run in
    each of `turn_modes` (dialogs.py); every run gets its loyalty to the vanilla run (when one is
    evaluated) and, with `difficulty` (a filter pipeline's name, e.g. 'downsample'), its accuracy
    on the samples that filter's runs get wrong and right (loyalty.py).

    `checkpoint`: the partial predictions file (see Checkpoint). Batches found there (same
    settings, same samples) are taken from it, the others run and are appended as they finish;
    the result is the same as an uninterrupted run's."""
    if batch < 1:
        raise EvalError(f"--batch {batch}: it must be at least 1")
    if not runs:
        raise EvalError("no pipeline to evaluate")
    if not tasks:
        raise EvalError("no data to evaluate on")
    bad_modes = [m for m in turn_modes if m not in MODES]
    if bad_modes or not turn_modes:
        raise EvalError(f"turn modes {', '.join(turn_modes) or '(none)'}: use {' and/or '.join(MODES)}")
    dialogs = [t for t in tasks if t.kind.startswith("dialog")]
    if dialogs and (prompt_fn is not None or score_fn is not None):
        raise EvalError("multi-turn data runs with the native prompt style only (the model's own chat format for "
                        "every turn); leave out --prompt-style lmms-eval for dialog files")
    if dialogs and any(r.question_agnostic for r in runs):
        raise EvalError("--question-agnostic applies to grounding and VQA data; dialog data (several questions per "
                        "image) has its own modes: reuse (the first turn's kept tokens and KV cache) and prune")
    check_prompts(adapter, tasks, grounding_prompt, vqa_prompt, max_new_tokens, prompt_fn)
    settings = {"model": str(getattr(adapter, "name", "model")), "device": str(getattr(adapter, "device", "")),
                "dtype": str(getattr(adapter, "dtype", "")), "batch": batch, "max_new_tokens": max_new_tokens,
                "seed": seed, "grounding_prompt": grounding_prompt, "vqa_prompt": vqa_prompt,
                "prompt_fn": getattr(prompt_fn, "__qualname__", None), "score_fn": getattr(score_fn, "__qualname__", None),
                "runs": [[r.label, r.file, r.pipeline.dumps(), r.question_agnostic] for r in runs],
                "neutral_prompt": neutral_prompt, "turn_modes": list(turn_modes)}
    ckpt = Checkpoint(checkpoint, settings)
    keys = [Checkpoint.key(run, task, task.samples[i:i + batch]) for run in runs for task in tasks
            for i in range(0, len(task.samples), batch)]
    if warmup and not all(k in ckpt.done for k in keys):  # first-call costs stay out of the timings
        s0 = tasks[0].samples[0]
        p0 = prompt_of(tasks[0], s0, grounding_prompt, vqa_prompt)
        adapter.generate(runs[0].pipeline, [load_image(s0)], [prompt_fn(s0, p0) if prompt_fn else p0],
                         max_new_tokens=1, seed=seed)
    results = []
    grid_fn = lambda n: _grid(adapter, n)  # noqa: E731
    try:
        for run in runs:
            res, tally, scores = evaluate_run(adapter, run, tasks, batch, max_new_tokens, seed, grounding_prompt,
                                              vqa_prompt, progress, ckpt, prompt_fn, score_fn, raw, neutral_prompt,
                                              turn_modes, grid_fn)
            # what its pruning read of the prompt's text (a question-agnostic run: of the neutral prompt)
            res["prompt_signals"] = [x for x in res.get("signals", []) if reads_prompt(x.split("(")[0])]
            results.append(finish_run(res, tally, scores, raw))
    finally:
        ckpt.close()
    add_relative(results)
    out = {"model": str(getattr(adapter, "name", "model")), "device": str(getattr(adapter, "device", "")),
           "dtype": str(getattr(adapter, "dtype", "")).replace("torch.", ""),
           "data": [{"task": t.kind, "source": t.source, "n": len(t.samples), "skipped_bad_records": t.skipped}
                    for t in tasks],
           "settings": {"batch": batch, "max_new_tokens": max_new_tokens, "seed": seed,
                        "iou_threshold": IOU_THRESHOLD, "grounding_prompt": grounding_prompt,
                        "vqa_prompt": vqa_prompt, "prefill_ms": "median over batches of one generate call each",
                        "neutral_prompt": neutral_prompt, "turn_modes": list(turn_modes), "difficulty": difficulty},
           "reference": results[reference_index(results)]["label"],
           "results": results, "resumed_batches": ckpt.reused}
    analyse(out, difficulty)
    return out


def analyse(result: dict[str, Any], difficulty: str | None) -> None:
    """Loyalty to vanilla and the hard/easy split, from the predictions (also after a merge)."""
    add_loyalty(result, vanilla_index(result["results"]))
    if difficulty:
        add_difficulty(result, difficulty)


def check_prompts(adapter, tasks: list[Task], grounding_prompt: str, vqa_prompt: str, max_new_tokens: int,
                  prompt_fn=None) -> None:
    """The longest prompt of each task (a dialog: its first question plus every later turn and
    answer) must fit the model's context, before any run."""
    from ..preflight import check_context

    for task in tasks:
        if task.kind.startswith("dialog"):
            s_long = max(task.samples, key=lambda s: sum(len(t.question) for t in s.turns))
            extra = sum(len(adapter.turn_ids(t.question)) + 1 for t in s_long.turns[1:])
            check_context(adapter, load_image(s_long), s_long.turns[0].question,
                          max_new_tokens * len(s_long.turns) + extra,
                          where=f"the dialog {s_long.id!r} of {task.source} (all its turns)")
            continue
        s_long = max(task.samples, key=lambda s: len(prompt_of(task, s, grounding_prompt, vqa_prompt)))
        p_long = prompt_of(task, s_long, grounding_prompt, vqa_prompt)
        img_long = load_image(s_long)
        check_context(adapter, img_long, placed(adapter, prompt_fn(s_long, p_long) if prompt_fn else p_long, img_long),
                      max_new_tokens, where=f"the prompt of sample {s_long.id!r} of {task.source}")


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
    "with_difficulty_filter",
    "with_question_agnostic",
    "with_vanilla",
    "write_results",
]
