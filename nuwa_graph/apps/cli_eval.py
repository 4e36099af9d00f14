"""`nuwa-graph eval` and `merge`: accuracy of pipelines over a data set, sharded or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import PipelineError, RunError
from ..preflight import check_template
from .cli_common import (
    ATTN_OPTION,
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    MODEL_OPTION,
    _output_or_exit,
    _print_problems,
    _sweep_grid,
    app,
    err,
    out,
)


@app.command("eval")
def eval_(
    files: list[Path] = typer.Argument(..., metavar="PIPELINE...", help="Pipeline YAML files.", show_default=False),
    model: str | None = MODEL_OPTION,
    data: list[str] | None = typer.Option(None, "--data", "-d", metavar="FILE",
                                             help="RefCOCO-style JSON (grounding) or VQA JSONL; repeatable; prefix "
                                                  "grounding: or vqa: to force the kind (default: a built-in "
                                                  "shapes-world sample set)."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", metavar="NAME=V1,V2,...",
                                             help="Values of a variable to sweep (comma-separated); repeatable: the "
                                                  "cross product runs, for each pipeline that has the variable."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="At most N samples per data file."),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Samples per generate call."),
    output: Path = typer.Option(Path("runs/eval"), "--output", "-o",
                                help="Folder for results.json, results.csv, predictions.jsonl and the pictures."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: each pipeline's seed)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Tokens to generate per answer."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    attn_implementation: str = ATTN_OPTION,
    device_map: str | None = DEVICE_MAP_OPTION,
    grounding_prompt: str | None = typer.Option(None, "--grounding-prompt",
                                                   help="Prompt for grounding, with {expression}; \\n is a newline "
                                                        "(default: 'where is {expression} ?'; lmms-eval's RefCOCO "
                                                        "prompt with --prompt-style lmms-eval)."),
    vqa_prompt: str | None = typer.Option(None, "--vqa-prompt",
                                             help="Prompt for VQA, with {question}; \\n is a newline (default: "
                                                  "'{question}'; with --prompt-style lmms-eval, '{question}\\nAnswer "
                                                  "the question using a single word or phrase.')."),
    prompt_style: str = typer.Option("native", "--prompt-style",
                                     help="native: the adapter's chat format, boxes parsed by parse_box; lmms-eval: "
                                          "lmms-eval's chat text (llava_hf, qwen2_vl, qwen2_5_vl, qwen3_vl, "
                                          "internvl_hf), RefCOCO prompt and box parsing, so numbers compare with "
                                          "lmms-eval's."),
    image_root: Path | None = typer.Option(None, "--image-root",
                                              help="Folder relative image paths are read from (default: each data "
                                                   "file's folder)."),
    image_template: str | None = typer.Option(None, "--image-template",
                                                 help="Image file name from record fields where a record has no "
                                                      "image field, e.g. '{imageId}.jpg' (GQA) or "
                                                      "'COCO_val2014_{image_id:012d}.jpg' (VQAv2)."),
    bbox_format: str = typer.Option("xywh", "--bbox-format",
                                    help="How a grounding record's `bbox` is stored: xywh (COCO, lmms-eval) or xyxy "
                                         "(e.g. Qwen-VL's refcoco_*.jsonl)."),
    shard_: str | None = typer.Option(None, "--shard", metavar="I/N",
                                         help="Evaluate only part I of N (I from 0) and write OUTPUT/shards/; merge the "
                                              "N parts with `nuwa-graph merge OUTPUT`. Under torchrun/accelerate the "
                                              "ranks shard and merge by themselves."),
    skip_bad_records: bool = typer.Option(False, "--skip-bad-records",
                                          help="Leave out data records that fail the checks (their count is "
                                               "reported) instead of stopping with the list of them."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the partial predictions of an interrupted eval in "
                                                      "OUTPUT instead of resuming from them."),
    difficulty: str | None = typer.Option(None, "--difficulty", metavar="FILTER",
                                             help="Split the samples as VTC-Bench does: run FILTER (downsample) at "
                                                  "each evaluated budget and report every run's accuracy on the "
                                                  "samples it gets wrong (hard) and right (easy)."),
    question_agnostic: bool = typer.Option(False, "--question-agnostic",
                                           help="Also run every pipeline that reads the prompt's text "
                                                "question-agnostically: prune from a neutral prompt (the question "
                                                "removed), then answer the full prompt over the kept tokens."),
    neutral_prompt: str = typer.Option("", "--neutral-prompt",
                                       help="The neutral instruction of --question-agnostic (default: empty, i.e. "
                                            "the question removed and the chat template kept); \\n is a newline."),
    turns: int = typer.Option(0, "--turns", min=0,
                              help="With the built-in sample set: also a multi-turn set of up to N questions per "
                                   "image (dialog data given with --data is detected by its `turns`)."),
    turn_mode: str = typer.Option("reuse,prune", "--turn-mode",
                                  help="Multi-turn modes, comma-separated: reuse (the first turn's kept tokens and "
                                       "KV cache) and/or prune (pruned again every turn)."),
    no_vanilla: bool = typer.Option(False, "--no-vanilla",
                                    help="Do not add pipelines/vanilla.yaml as the reference when no evaluated "
                                         "pipeline is vanilla (loyalty and % of vanilla then have no reference)."),
) -> None:
    """Accuracy of pipelines over a data set: grounding Acc@0.5, VQA exact match, tokens, prefill time.

    Every data record is checked before the model is loaded. An interrupted eval (Ctrl-C) keeps its
    finished batches in OUTPUT/predictions.partial.jsonl; the same command again resumes from them.

    Every run reports its loyalty (agreement with vanilla on the same samples) and its costs; a
    vanilla run is added as the reference when none is given (--no-vanilla leaves it out).

    Example: nuwa-graph eval pipelines/vanilla.yaml pipelines/fastv.yaml pipelines/nuwa.yaml --set budget=32,64 --limit 100
    Hard samples: nuwa-graph eval pipelines/nuwa.yaml pipelines/random.yaml --difficulty downsample
    Many GPUs: torchrun --nproc_per_node 8 -m nuwa_graph.apps.cli eval ... (rank 0 writes the merged results)
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from .dialogs import MODES
    from .evaluate import (
        GROUNDING_PROMPT,
        OUTPUT_FILES,
        PARTIAL_PREDICTIONS,
        VQA_PROMPT,
        EvalError,
        default_model,
        evaluate,
        load_data,
        plan_runs,
        sample_data,
        with_difficulty_filter,
        with_question_agnostic,
        with_vanilla,
    )
    from .prompts import LMMS_REC_PROMPT, LMMS_VQA_PROMPT, STYLES, lmms_eval_style, unescape
    from .shards import Group, Shard, check_launch, device_for, merge, parse_shard, read_shards, shard_payload, write_shard

    for template, field, option in ((grounding_prompt, "expression", "--grounding-prompt"),
                                    (vqa_prompt, "question", "--vqa-prompt")):
        if template is not None:
            try:
                check_template(template, field, option)
            except RunError as exc:
                raise typer.BadParameter(str(exc).removeprefix(f"{option} "), param_hint=option) from None
    data_files = [d.split(":", 1)[1] if d.startswith(("grounding:", "vqa:")) else d for d in data or []]
    _output_or_exit(output, "folder", list(files) + data_files, "--output", OUTPUT_FILES)
    grid = _sweep_grid(set_)
    if prompt_style not in STYLES:
        raise typer.BadParameter(f"{prompt_style!r}: use one of {', '.join(STYLES)}", param_hint="--prompt-style")
    lmms = prompt_style == "lmms-eval"
    grounding_prompt = unescape(grounding_prompt) if grounding_prompt else (LMMS_REC_PROMPT if lmms else GROUNDING_PROMPT)
    vqa_prompt = unescape(vqa_prompt) if vqa_prompt else (LMMS_VQA_PROMPT if lmms else VQA_PROMPT)
    modes = tuple(m.strip() for m in turn_mode.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise typer.BadParameter(f"{turn_mode!r}: give reuse and/or prune, comma-separated", param_hint="--turn-mode")
    try:
        shard = parse_shard(shard_) if shard_ else Shard.from_env()
        check_launch(shard, device_map)
        runs = plan_runs(files, grid)
        added_vanilla = False
        if not no_vanilla:
            runs, added_vanilla = with_vanilla(runs)
        if difficulty:
            runs = with_difficulty_filter(runs, difficulty)
    except PipelineError as exc:
        _print_problems(exc)
        raise typer.Exit(1) from None
    except EvalError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    from ..adapters import load_adapter
    from .runner import _explain, resolve_device, resolve_dtype

    # an interrupted eval resumes from here (a shard from its own file)
    partial = output / (PARTIAL_PREDICTIONS if shard is None else f"predictions.partial.{shard.index}-of-{shard.count}.jsonl")
    try:
        with Group(shard) as group:
            if not data and shard and shard.launched and shard.index != 0:
                group.barrier()  # rank 0 writes the built-in sample set first
            tasks = load_data(data if data else [str(p) for p in sample_data(output / "sample_data", n_turns=turns)],
                              limit=limit,
                              bbox_format=bbox_format, image_root=image_root, image_template=image_template,
                              skip_bad=skip_bad_records)
            if not data and shard and shard.launched and shard.index == 0:
                group.barrier()
            for t in tasks:
                if t.skipped and (shard is None or shard.index == 0):
                    err.print(f"[yellow]skipped {t.skipped} bad record{'s' if t.skipped != 1 else ''} of "
                              f"{escape(t.source)} (--skip-bad-records)[/]")
            if fresh and partial.exists():
                partial.unlink()
            part = [t for t in (shard.take(tasks) if shard else tasks) if t.samples]
            dev = resolve_device(device_for(shard, device))
            adapter = load_adapter(model or default_model(), resolve_dtype(dtype, dev), dev,
                                   attn_implementation=attn_implementation, device_map=device_map)
            if question_agnostic:  # what each file reads on this model (its family file, where it names one)
                runs = with_question_agnostic(runs, adapter.model_variables())
            if added_vanilla and (shard is None or shard.index == 0):
                err.print("added pipelines/vanilla.yaml as the reference (loyalty, % of vanilla; --no-vanilla "
                          "leaves it out)")
            total = len(runs) * sum(len(t.samples) * (len(modes) if t.kind.startswith("dialog") else 1)
                                    for t in part)
            who = f"[{shard.index}/{shard.count}] " if shard else ""
            result = None
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err, transient=True) as bar:
                job = bar.add_task(escape(f"{who}eval"), total=total)
                prompt_fn, score_fn = lmms_eval_style(adapter) if lmms else (None, None)
                if part:
                    result = evaluate(adapter, runs, part, batch=batch, max_new_tokens=max_new_tokens, seed=seed,
                                      grounding_prompt=grounding_prompt, vqa_prompt=vqa_prompt,
                                      progress=lambda desc, n: bar.update(job, description=escape(who + desc),
                                                                          advance=n),
                                      prompt_fn=prompt_fn, score_fn=score_fn, raw=shard is not None,
                                      checkpoint=partial, neutral_prompt=unescape(neutral_prompt),
                                      turn_modes=modes, difficulty=difficulty)
                    result["settings"]["prompt_style"] = prompt_style
            if shard is not None:
                path = write_shard(shard_payload(result, tasks, shard.take(tasks), shard, grid,
                                                 [r.label for r in runs]), output)
                err.print(f"{escape(who)}wrote {escape(str(path))}")
                partial.unlink(missing_ok=True)  # the shard file now holds them
                if not shard.launched:
                    out.print(f"shard {shard.index}/{shard.count} done; when all {shard.count} are, merge them: "
                              f"nuwa-graph merge {escape(str(output))}")
                    return
                group.barrier()
                if shard.index != 0:
                    return
                result, grid = merge(read_shards([output / "shards" / Shard(i, shard.count).name
                                                  for i in range(shard.count)]))
    except KeyboardInterrupt:
        kept = f"finished batches are kept in {partial}; " if partial.exists() else ""
        err.print(f"[yellow]interrupted: {escape(kept)}run the same command again to resume "
                  f"(--fresh starts over)[/]")
        raise typer.Exit(130) from None
    except (RunError, PipelineError) as exc:
        if isinstance(exc, PipelineError):
            _print_problems(exc)
        else:
            err.print(f"[bold red]error:[/] {escape(_explain(exc))}")
        raise typer.Exit(1) from None
    assert result is not None
    _eval_report(result, output, grid, partial)


@app.command("merge")
def merge_(
    sources: list[Path] = typer.Argument(..., metavar="DIR_OR_FILE...",
                                         help="Output folders of `eval --shard I/N` runs (their shards/ files), or "
                                              "shard files.", show_default=False),
    output: Path | None = typer.Option(None, "--output", "-o",
                                          help="Where to write the merged results (default: the first folder)."),
) -> None:
    """Merge the shards of `nuwa-graph eval --shard I/N` into the files one process writes.

    Example: nuwa-graph merge runs/eval   (after eval --shard 0/4 ... --shard 3/4 -o runs/eval)
    """
    from .errors import EvalError
    from .shards import merge, read_shards

    try:
        result, grid = merge(read_shards(list(sources)))
    except EvalError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    first = sources[0]
    dest = output or (first.parent.parent if first.is_file() else first.parent if first.name == "shards" else first)
    _eval_report(result, dest, grid)


def _eval_report(result: dict[str, Any], output: Path, grid: dict[str, list[Any]], partial: Path | None = None) -> None:
    """The table of `eval` / `merge` and the files (results.json/csv, predictions, pictures)."""
    from .eval_tables import print_tables
    from .evaluate import sweep_axis, write_results
    from .viz import write_pictures

    # piped output (files, CI logs) gets a wide table instead of rich's 80-column default
    print_tables(result, out if out.is_terminal else Console(highlight=False, width=max(out.width, 160)))
    if result.get("resumed_batches"):
        err.print(f"resumed: {result['resumed_batches']} batches taken from {escape(str(partial))}")
    paths = list(write_results(result, output).values())
    if partial is not None:
        partial.unlink(missing_ok=True)  # the complete predictions.jsonl now holds them
    paths += write_pictures(result, output, sweep_axis(grid))
    for p in paths:
        out.print(f"wrote {escape(str(p))}")


@app.command("report")
def report_(
    results: Path = typer.Argument(..., metavar="RESULTS.json", help="The results.json of `nuwa-graph eval` (or its "
                                                                     "output folder).", show_default=False),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="The HTML page to write."),
) -> None:
    """One self-contained HTML page of an eval: accuracy vs budget and vs FLOPs (Pareto) per task,
    accuracy with % of vanilla and loyalty, hard samples, multi-turn, costs, kept tokens.

    The page fetches nothing (inline SVG, base64 images); open it in any browser.
    Example: nuwa-graph eval pipelines/fastv.yaml --set budget=64,128 -o runs/ev && nuwa-graph report runs/ev -o report.html
    """
    from ..safe_io import atomic_write
    from .errors import EvalError
    from .report_html import load_results, render

    src = results / "results.json" if results.is_dir() else results
    _output_or_exit(output, "file", [src], "--output")
    try:
        result = load_results(results)
    except EvalError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    atomic_write(output, render(result, str(src)))
    out.print(f"wrote {escape(str(output))}")
