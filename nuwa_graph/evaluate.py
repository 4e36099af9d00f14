"""`nuwa-graph eval`: accuracy of pipelines over a grounding and/or VQA data set.

    from nuwa_graph.evaluate import load_data, plan_runs, evaluate, write_results
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

import csv
import io
import json
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    BadRecord,
    DataFormatError,
    GroundingSample,
    exact_match,
    load_grounding,
    load_vqa,
    read_records,
)
from .errors import PipelineError, RunError
from .flops import mean_flops
from .pipeline import Pipeline, load
from .safe_io import atomic_write, probe_image
from .world.boxes import iou, parse_box
from .world.shapes import GROUNDING_TEMPLATE

IOU_THRESHOLD = 0.5
SAMPLE_SEED = 4242          # world seed of the built-in sample set (training uses 0, held-out eval 1000003)
SAMPLE_IMAGES = 40          # scenes in the built-in sample set (1 grounding + 1 VQA question each)
GROUNDING_PROMPT = GROUNDING_TEMPLATE   # "where is {expression} ?" (the embedded model's format)
VQA_PROMPT = "{question}"
KINDS = ("grounding", "vqa")


class EvalError(RunError):
    """A user error of an evaluation (bad data file, no model, bad --set): one clear message."""


# --- metrics ----------------------------------------------------------------------------------
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


# --- data ---------------------------------------------------------------------------------------
@dataclass
class Task:
    kind: str          # "grounding" | "vqa"
    source: str        # the data file
    samples: list      # GroundingSample | VQASample
    skipped: int = 0   # bad records left out (--skip-bad-records)

    @property
    def name(self) -> str:
        return self.kind


def detect_kind(path: str | Path) -> str:
    """'grounding' if the records carry a box, else 'vqa' if they carry a question."""
    try:
        recs = read_records(path)
    except DataFormatError as exc:
        raise EvalError(str(exc)) from None
    if not recs:
        raise EvalError(f"data file {str(path)!r} holds no records")
    rec = recs[0]
    if not isinstance(rec, dict):
        raise EvalError(f"data file {str(path)!r}: record 0 is not an object")
    if any(rec.get(k) is not None for k in ("bbox", "box_xyxy", "bbox_xyxy")):
        return "grounding"
    if any(isinstance(rec.get(k), str) for k in ("question", "text", "prompt")):
        return "vqa"
    raise EvalError(f"data file {str(path)!r}: cannot tell grounding from VQA (record 0 has no bbox / box_xyxy and "
                    f"no question); prefix the path with grounding: or vqa:")


MAX_LISTED_PROBLEMS = 50     # bad records listed in one error message (the count is always given)
# a data file is read whole: past this size it is refused before reading (raise it with the
# environment variable NUWA_GRAPH_MAX_DATA_BYTES on a machine with the memory for it)
MAX_DATA_BYTES = 1 << 30


def _max_data_bytes() -> int:
    raw = os.environ.get("NUWA_GRAPH_MAX_DATA_BYTES")
    if raw is None:
        return MAX_DATA_BYTES
    try:
        return int(raw)
    except ValueError:
        raise EvalError(f"NUWA_GRAPH_MAX_DATA_BYTES={raw!r}: give a whole number of bytes") from None


def _read_task(text: str, kind: str | None, limit: int | None, bbox_format: str, problems: list[BadRecord],
               image_root: str | Path | None = None, image_template: str | None = None) -> Task:
    path = Path(text).expanduser()
    if not path.is_file():
        raise EvalError(f"data file {text!r} does not exist; pass --data with a RefCOCO-style JSON (grounding) "
                        f"or a VQA JSONL file, or leave --data out for the built-in sample set")
    size, limit_bytes = path.stat().st_size, _max_data_bytes()
    if size > limit_bytes:
        raise EvalError(f"data file {text!r} is {size} bytes; at most {limit_bytes} are read (limit MAX_DATA_BYTES; "
                        f"set NUWA_GRAPH_MAX_DATA_BYTES to raise it, or split the file)")
    found: list[BadRecord] = []
    try:
        kind = kind or detect_kind(path)
        samples = (load_grounding(path, image_root, bbox_format=bbox_format, limit=limit, problems=found,
                                  image_template=image_template) if kind == "grounding"
                   else load_vqa(path, image_root, image_template, limit=limit, problems=found, require_answers=True))
    except DataFormatError as exc:
        raise EvalError(f"data file {text!r} is not valid {kind or 'grounding/VQA'} data: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"data file {text!r} could not be read ({type(exc).__name__}: {exc})") from None
    checked: dict[Any, str | None] = {}
    for s in samples:  # every image is probed (header only) before anything runs
        key = s.image if isinstance(s.image, str) else id(s.image)
        if key not in checked:
            checked[key] = probe_image(s.image)
            if checked[key]:
                found.append(BadRecord(str(path), s.record, "image", checked[key]))
    bad = {b.record for b in found}
    task = Task(kind, str(path), [s for s in samples if s.record not in bad], skipped=len(bad))
    problems += sorted(found, key=lambda b: b.record)
    return task


def load_data(specs: Iterable[str | Path], limit: int | None = None, bbox_format: str = "xywh",
              skip_bad: bool = False, image_root: str | Path | None = None,
              image_template: str | None = None) -> list[Task]:
    """One Task per data file; `grounding:PATH` / `vqa:PATH` force the kind, else it is detected.
    Two files of the same kind are two tasks (named kind, kind#2, ...). `image_root` (else each
    file's folder) resolves relative image paths; `image_template` names images from record
    fields (e.g. "{imageId}.jpg") where a record has no image field.

    Every record of every file is checked first (see data.py; images are probed). Bad records
    raise one EvalError listing them all (file, record, field), or with `skip_bad` are left out
    and counted in `Task.skipped`."""
    if bbox_format not in ("xywh", "xyxy"):
        raise EvalError(f"--bbox-format {bbox_format!r}: use xywh ([x, y, w, h], COCO / lmms-eval) or xyxy "
                        f"([x0, y0, x1, y1])")
    tasks: list[Task] = []
    problems: list[BadRecord] = []
    for spec in specs:
        text = str(spec)
        kind = None
        for k in KINDS:
            if text.startswith(k + ":"):
                kind, text = k, text[len(k) + 1:]
        tasks.append(_read_task(text, kind, limit, bbox_format, problems, image_root, image_template))
    if problems and not skip_bad:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise EvalError(f"{len(problems)} bad data record{'s' if len(problems) != 1 else ''} (nothing was run):\n"
                        f"{shown}" + (f"\n  ... and {more} more" if more > 0 else "")
                        + "\nfix them, or pass --skip-bad-records to leave them out (the count is reported)")
    for t in tasks:
        if not t.samples:
            raise EvalError(f"data file {t.source!r} holds no usable {t.kind} samples"
                            + (f" ({t.skipped} bad records skipped)" if t.skipped else ""))
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.kind] = seen.get(t.kind, 0) + 1
        if seen[t.kind] > 1:
            t.kind = f"{t.kind}#{seen[t.kind]}"
    return tasks


def sample_data(out_dir: str | Path, n_images: int = SAMPLE_IMAGES, seed: int = SAMPLE_SEED) -> list[Path]:
    """The built-in sample set: shapes-world scenes [0, n_images) of world `seed`, written once
    to `out_dir` (reused when its world.json matches) -> [refcoco.json, vqa.jsonl]."""
    from .world import write_split

    out = Path(out_dir)
    world = out / "world.json"
    paths = [out / "refcoco.json", out / "vqa.jsonl"]
    try:
        meta = json.loads(world.read_text())
        fresh = (meta.get("seed"), meta.get("n_images"), meta.get("start")) == (seed, n_images, 0)
    except (OSError, ValueError):
        fresh = False
    if not fresh or not all(p.is_file() for p in paths):
        write_split(out, n_images, seed, n_grounding=1, n_vqa=1)
    return paths


# --- model --------------------------------------------------------------------------------------
def default_model() -> str:
    """The embedded model (preset `embedded` if one is registered, else its weights folder)."""
    from .adapters import PRESETS
    from .embedded import WEIGHTS_DIR

    if "embedded" in PRESETS:
        return "embedded"
    if (WEIGHTS_DIR / "config.json").is_file():
        return str(WEIGHTS_DIR)
    raise EvalError(f"the embedded model is not trained yet ({WEIGHTS_DIR} has no config.json). Train it with "
                    f"`python scripts/train_embedded.py` (see docs/embedded.md), or pass --model "
                    f"(a local model folder, a cached hub id, or the untrained preset tiny-llava for a smoke test)")


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


class Checkpoint:
    """The partial predictions file of an eval: one JSON line per finished batch, flushed at once,
    so an interrupted eval (Ctrl-C, a crash, a lost machine) keeps every finished batch and a rerun
    with the same settings takes them from here instead of running them again.

    The first line holds the settings; a file written with other settings is not reused."""

    def __init__(self, path: str | Path | None, settings: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.settings = json.loads(json.dumps(settings, default=str))
        self.done: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self.discarded = False
        self._fh = None
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("settings") != self.settings:
            self.discarded = True
            return
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a line cut by the interruption: that batch runs again
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                self.done[rec["key"]] = rec

    @staticmethod
    def key(run: EvalRun, task: Task, chunk: list) -> str:
        return json.dumps([run.label, run.file, task.kind, task.source, [s.id for s in chunk]])

    def get(self, key: str) -> dict[str, Any] | None:
        rec = self.done.get(key)
        if rec is not None:
            self.reused += 1
        return rec

    def add(self, rec: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old = list(self.done.values())
            self._fh = self.path.open("w", encoding="utf-8")
            self._fh.write(json.dumps({"settings": self.settings}) + "\n")
            for r in old:
                self._fh.write(json.dumps(r) + "\n")
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool = False) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if remove and self.path is not None and self.path.exists():
            self.path.unlink()


def _batch_record(key: str, rep, prompts: list[str]) -> dict[str, Any]:
    """What a finished batch contributes to the results (all JSON)."""
    return {"key": key, "answers": list(rep.answers), "prompts": prompts,
            "counts": [list(c) for c in rep.visual_tokens_per_layer], "avg": list(rep.visual_tokens_avg),
            "full": rep.visual_tokens_full,
            "fulls": list(getattr(rep, "visual_tokens_full_per_sample", None) or [rep.visual_tokens_full] * len(prompts)),
            "prefill_ms": rep.prefill_ms, "kept": rep.kept[0] if rep.kept else {},
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
    from .preflight import check_context

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
                res["grid"] = _grid(adapter, fulls[0])
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


# --- output -------------------------------------------------------------------------------------
def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run (the CSV)."""
    out = []
    for r in result["results"]:
        row: dict[str, Any] = {"label": r["label"], "pipeline": r["pipeline"], "file": r["file"], **r["variables"]}
        for k, t in r["tasks"].items():
            row[f"{k}_n"] = t["n"]
            row[f"{k}_accuracy"] = round(t["accuracy"], 4)
            if "parse_failures" in t:
                row[f"{k}_parse_failures"] = t["parse_failures"]
                row[f"{k}_mean_iou"] = round(t["mean_iou"], 4)
            row[f"{k}_relative_pct"] = None if t["relative_pct"] is None else round(t["relative_pct"], 2)
        row["accuracy"] = round(r["accuracy"], 4)
        row["relative_pct"] = None if r["relative_pct"] is None else round(r["relative_pct"], 2)
        row["visual_tokens_avg"] = r["visual_tokens_avg"]
        row["visual_tokens_full"] = r["visual_tokens_full"]
        row["prefill_ms_median"] = r["prefill_ms_median"]
        fl = r.get("flops", {})
        if "prefill" in fl:
            row["prefill_gflops"] = round(fl["prefill"] / 1e9, 4)
            row["prefill_flops_ratio"] = round(fl["prefill_ratio"], 4)
            row["decode_step_gflops"] = round(fl["decode_step"] / 1e9, 6)
        row["visual_tokens_per_layer"] = r["visual_tokens_per_layer"]
        out.append(row)
    return out


PARTIAL_PREDICTIONS = "predictions.partial.jsonl"   # the Checkpoint of an eval, inside its output folder
OUTPUT_FILES = ("results.json", "results.csv", "predictions.jsonl", PARTIAL_PREDICTIONS)


def write_results(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json (everything but per-sample predictions), results.csv, predictions.jsonl;
    each written atomically (a temp file renamed), so an old file is never left half-written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "predictions": out / "predictions.jsonl"}
    slim = {**result, "results": [{k: v for k, v in r.items() if k != "predictions"} for r in result["results"]]}
    slim.pop("resumed_batches", None)  # how the results were obtained, not what they are
    atomic_write(paths["json"], json.dumps(slim, indent=2, default=str) + "\n")
    table = rows(result)
    cols: list[str] = []
    for r in table:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in table:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v))
                    for k, v in r.items()})
    atomic_write(paths["csv"], buf.getvalue())
    atomic_write(paths["predictions"], "".join(json.dumps({"label": r["label"], **p}) + "\n"
                                               for r in result["results"] for p in r["predictions"]))
    return paths


def sweep_axis(grid: dict[str, list[Any]]) -> str | None:
    """The variable to plot accuracy against: `budget` if swept, else the first swept variable
    with more than one numeric value; None if nothing was swept."""
    def numeric(vals):
        return len(vals) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
    if "budget" in grid and numeric(grid["budget"]):
        return "budget"
    for k, v in grid.items():
        if numeric(v):
            return k
    return None


__all__ = [
    "IOU_THRESHOLD",
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
