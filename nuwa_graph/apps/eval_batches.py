"""One eval run over the tasks, batch by batch: prompts, generation (plain, question-agnostic,
or turn by turn for dialogs), scoring, and what each batch adds to the run's results.

`evaluate_run` is what `evaluate.evaluate` calls per run; a finished batch is a JSON record
(`Checkpoint`), so an interrupted eval resumes with the same numbers.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from ..flops import mean_flops
from ..replay import generate_question_agnostic
from .data import GroundingSample
from .dialogs import MODES, DialogSample, run_dialogs, turn_batches
from .efficiency import batch_costs, summarize_costs
from .errors import EvalError
from .eval_output import Checkpoint
from .scoring import grounding_score, summarize, vqa_score

if TYPE_CHECKING:
    from .evaluate import EvalRun
    from .tasks import Task


def prompt_of(task: Task, s, grounding_prompt: str, vqa_prompt: str) -> str:
    if isinstance(s, DialogSample):
        return s.turns[0].question
    if isinstance(s, GroundingSample):
        return grounding_prompt.format(expression=s.expression)
    return vqa_prompt.format(question=s.question)


def placed(adapter, prompt: str, image) -> str:
    """A prompt of several images whose text writes `<image>` where each goes: the adapter's chat
    prompt with them there (without placeholders the adapter puts them before the question)."""
    if isinstance(image, list) and "<image>" in prompt:
        return adapter.chat_prompt(prompt, len(image))
    return prompt


def load_image(s):
    try:
        return s.load_image()
    except (OSError, ValueError) as exc:
        raise EvalError(f"image of sample {s.id!r} ({s.image if isinstance(s.image, str) else '<bytes>'}) could not "
                        f"be read: {exc}") from None


def _size(s, image) -> tuple[int, int]:
    if (s.width is None or s.height is None) and image is None:
        image = load_image(s)  # a batch taken from the checkpoint: only the size is needed
    return (s.width or image.size[0]), (s.height or image.size[1])


def score(s, answer: str, image) -> dict[str, Any]:
    if isinstance(s, GroundingSample):
        w, h = _size(s, image)
        return grounding_score(answer, s.box, w, h)
    return vqa_score(answer, s.answers)


def _prediction(kind: str, sid: str, prompt: str, answer: str, sc: dict[str, Any], box=None, answers=None):
    pred = {"task": kind, "id": sid, "prompt": prompt, "answer": answer, "correct": bool(sc["correct"])}
    if box is not None:
        pred.update(parsed=sc["parsed"], iou=round(sc["iou"], 4), box=sc["box"],
                    target=[round(float(c), 2) for c in box])
    else:
        pred["answers"] = answers
    return pred


def batch_record(key: str, rep, prompts: list[str]) -> dict[str, Any]:
    """What a finished batch contributes to the results (all JSON)."""
    return {"key": key, "answers": list(rep.answers), "prompts": prompts,
            "counts": [list(c) for c in rep.visual_tokens_per_layer], "avg": list(rep.visual_tokens_avg),
            "full": rep.visual_tokens_full,
            "fulls": list(getattr(rep, "visual_tokens_full_per_sample", None) or [rep.visual_tokens_full] * len(prompts)),
            "prefill_ms": rep.prefill_ms, "kept": rep.kept[0] if rep.kept else {},
            "views": rep.views[0] if getattr(rep, "views", None) else [],
            "grid": rep.grids[0] if getattr(rep, "grids", None) else None,
            "schedule": rep.schedule, "signals": list(rep.signals), "flops": list(rep.flops),
            "costs": batch_costs(rep)}


class RunTally:
    """The sums a run's results are made of (tokens per layer, prefill times, FLOPs, costs)."""

    def __init__(self) -> None:
        self.per_layer_sum: list[float] = []
        self.n = 0
        self.avg_sum = 0.0
        self.full_sum = 0
        self.prefill: list[float] = []
        self.flops: list[dict[str, Any]] = []
        self.costs: list[dict[str, Any]] = []
        self.neutral: list[dict[str, Any]] = []
        self.turn_prefill: dict[str, dict[str, list[float]]] = {}  # dialog task -> turn -> prefill ms of its calls

    def add_batch(self, rec: dict[str, Any]) -> None:
        self.prefill.append(rec["prefill_ms"])
        self.flops.extend(rec.get("flops", []))
        if "costs" in rec:
            self.costs.append(rec["costs"])
        if "neutral" in rec:
            self.neutral.append(rec["neutral"])
        fulls = rec.get("fulls") or [rec["full"]] * len(rec["counts"])
        for b, counts in enumerate(rec["counts"]):
            if len(self.per_layer_sum) < len(counts):
                self.per_layer_sum += [0.0] * (len(counts) - len(self.per_layer_sum))
            for L, c in enumerate(counts):
                self.per_layer_sum[L] += c
            self.avg_sum += rec["avg"][b]
            self.full_sum += fulls[b]
            self.n += 1


def _first_sample(res: dict[str, Any], rec: dict[str, Any], s, grid_fn) -> None:
    if "sample_kept" in res:
        return
    fulls = rec.get("fulls") or [rec["full"]]
    res["sample_kept"] = rec["kept"]
    res["sample_image"] = (s.image if isinstance(s.image, str) else s.image
                           if isinstance(s.image, list) and all(isinstance(x, str) for x in s.image) else None)
    res["sample_prompt"] = rec["prompts"][0]
    # the image's own grid (any shape); batches checkpointed before it was recorded: the adapter's
    res["grid"] = (rec.get("grid") or grid_fn(fulls[0])) if not rec.get("views") else None
    if rec.get("views"):  # a tiled image: a panel per crop view (viz.draw_kept)
        res["views"] = rec["views"]
    res["schedule"] = rec.get("schedule", {})  # file, variable values (and their origin), sites
    res["signals"] = rec.get("signals", [])


def evaluate_run(adapter, run: EvalRun, tasks: list[Task], batch: int, max_new_tokens: int, seed: int | None,
                 grounding_prompt: str, vqa_prompt: str, progress, ckpt: Checkpoint, prompt_fn=None,
                 score_fn=None, raw: bool = False, neutral_prompt: str = "", turn_modes=MODES,
                 grid_fn=None) -> tuple[dict[str, Any], RunTally, dict[str, list]]:
    """(run result without the summary numbers, its tally, per-task scores)."""
    res: dict[str, Any] = {"label": run.label, "pipeline": run.pipeline.name, "file": run.file,
                           "variables": dict(run.variables), "budget": run.budget,
                           "question_agnostic": run.question_agnostic, "tasks": {}, "predictions": []}
    tally = RunTally()
    scores_of: dict[str, list] = {}
    for task in tasks:
        if task.kind.startswith("dialog"):
            for mode in turn_modes:
                _dialog_task(adapter, run, task, mode, batch, max_new_tokens, seed, progress, ckpt, res, tally,
                             scores_of, grid_fn)
            continue
        scores = []
        for i in range(0, len(task.samples), batch):
            chunk = task.samples[i:i + batch]
            key = Checkpoint.key(run, task, chunk)
            rec = ckpt.get(key)
            images = None
            if rec is None:
                images = [load_image(s) for s in chunk]
                prompts = [prompt_of(task, s, grounding_prompt, vqa_prompt) for s in chunk]
                if prompt_fn:
                    prompts = [prompt_fn(s, p) for s, p in zip(chunk, prompts)]
                prompts = [placed(adapter, p, im) for p, im in zip(prompts, images)]
                if run.question_agnostic:
                    neutral = [prompt_fn(s, neutral_prompt) if prompt_fn else neutral_prompt for s in chunk]
                    rep, nrep = generate_question_agnostic(adapter, run.pipeline, images, prompts, neutral,
                                                           max_new_tokens=max_new_tokens, seed=seed)
                else:
                    rep, nrep = adapter.generate(run.pipeline, images, prompts, max_new_tokens=max_new_tokens,
                                                 seed=seed), None
                rec = batch_record(key, rep, prompts)
                if nrep is not None:  # the neutral pass read the pipeline's signals; the answering run replayed
                    rec["neutral"] = batch_costs(nrep)
                    rec["signals"] = list(nrep.signals) + [x for x in rep.signals if x not in nrep.signals]
                ckpt.add(rec)
            tally.add_batch(rec)
            for b, s in enumerate(chunk):
                answer = rec["answers"][b]
                img = images[b] if images is not None else None
                if score_fn is not None:
                    sc = score_fn(s, answer, img if img is not None else load_image(s))
                else:
                    sc = score(s, answer, img)
                scores.append(sc)
                box = s.box if isinstance(s, GroundingSample) else None
                res["predictions"].append(_prediction(task.kind, s.id, rec["prompts"][b], answer, sc, box,
                                                      None if box is not None else s.answers))
            _first_sample(res, rec, chunk[0], grid_fn)
            if progress:
                progress(f"{run.label} [{task.kind}]", len(chunk))
        res["tasks"][task.kind] = summarize(task.kind.split("#")[0], scores)
        scores_of[task.kind] = scores
    return res, tally, scores_of


def _dialog_task(adapter, run: EvalRun, task: Task, mode: str, batch: int, max_new_tokens: int, seed, progress,
                 ckpt: Checkpoint, res: dict[str, Any], tally: RunTally, scores_of: dict[str, list], grid_fn) -> None:
    """Every dialog of `task` in `mode` (dialogs.py): predictions and scores per turn."""
    name = f"{task.kind}:{mode}"
    scores: list[dict[str, Any]] = []
    turn_prefill = tally.turn_prefill.setdefault(name, {})
    for chunk in turn_batches(task.samples, batch):
        key = Checkpoint.key(run, task, chunk) + f"#{mode}"
        rec = ckpt.get(key)
        images = None
        if rec is None:
            images = [load_image(s) for s in chunk]
            reps = run_dialogs(adapter, run.pipeline, chunk, images, mode, max_new_tokens, seed)
            rec = {"key": key, "turns": [batch_record(key, rep, [s.turns[t].question for s in chunk])
                                         for t, rep in enumerate(reps)]}
            ckpt.add(rec)
        for t, trec in enumerate(rec["turns"]):
            # the run's own tallies take the calls that prefilled (and pruned) the image; a turn that
            # continued the cache is reported per turn in the task's summary
            if mode == "prune" or t == 0:
                tally.add_batch(trec)
                _first_sample(res, trec, chunk[0], grid_fn)
            turn_prefill.setdefault(str(t + 1), []).append(trec["prefill_ms"])
        for b, s in enumerate(chunk):  # predictions dialog by dialog, turn by turn
            img = images[b] if images is not None else None
            for t, trec in enumerate(rec["turns"]):
                turn = s.turns[t]
                answer = trec["answers"][b]
                if turn.box is not None:
                    w, h = _size(s, img)
                    sc = grounding_score(answer, turn.box, w, h)
                else:
                    sc = vqa_score(answer, turn.answers)
                sc["turn"] = t + 1
                scores.append(sc)
                pred = _prediction(name, f"{s.id}#{t + 1}", trec["prompts"][b], answer, sc, turn.box,
                                   turn.answers if turn.box is None else None)
                pred["turn"] = t + 1
                res["predictions"].append(pred)
        if progress:
            progress(f"{run.label} [{name}]", len(chunk))
    summary = summarize(name, scores)
    summary["prefill_ms_per_turn"] = turn_medians(turn_prefill)
    res["tasks"][name] = summary
    scores_of[name] = scores


def full_mean(full_sum: float, n: int) -> float | int:
    """Image tokens of the unpruned prompt, mean over samples: an int when every sample had the
    same count (LLaVA), else rounded to 3 decimals (Qwen2.5-VL, image-size dependent)."""
    if not n:
        return 0
    v = full_sum / n
    return int(v) if v == int(v) else round(v, 3)


def turn_medians(per_turn: dict[str, list[float]]) -> dict[str, float]:
    """Turn ("1", "2", ...) -> the median prefill ms of its generate calls."""
    return {t: round(statistics.median(v), 3) for t, v in sorted(per_turn.items(), key=lambda kv: int(kv[0]))}


def finish_run(res: dict[str, Any], tally: RunTally, scores_of: dict[str, list], raw: bool) -> dict[str, Any]:
    """The run's summary numbers from its tally (and `raw`, for merging shards)."""
    accs = [t["accuracy"] for t in res["tasks"].values()]
    res["accuracy"] = sum(accs) / len(accs)
    n = tally.n
    res["visual_tokens_per_layer"] = [round(v / n, 3) for v in tally.per_layer_sum] if n else []
    res["visual_tokens_avg"] = round(tally.avg_sum / n, 3) if n else 0.0
    res["visual_tokens_full"] = full_mean(tally.full_sum, n)
    res["prefill_ms_median"] = round(statistics.median(tally.prefill), 3) if tally.prefill else 0.0
    res["flops"] = mean_flops(tally.flops)  # per sample, mean over the data (nuwa_graph/flops.py)
    res["efficiency"] = summarize_costs(tally.costs, res["flops"], tally.neutral)
    if raw:
        res["raw"] = {"scores": scores_of, "per_layer_sum": tally.per_layer_sum, "avg_sum": tally.avg_sum,
                      "full_sum": tally.full_sum, "n": n, "prefill_ms": tally.prefill, "flops": tally.flops,
                      "costs": tally.costs, "neutral": tally.neutral, "turn_prefill": tally.turn_prefill}
    return res
