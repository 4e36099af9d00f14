"""`nuwa-graph run` and `sweep`: a pipeline on a model, once or over a grid of variable values."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import PipelineError, RunError
from .cli_common import (
    ATTN_OPTION,
    DEVICE_MAP_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    MODEL_OPTION,
    SET_HELP,
    _load_or_exit,
    _output_or_exit,
    _print_problems,
    _prompt_or_exit,
    _sweep_grid,
    app,
    err,
    out,
)


# --- run ------------------------------------------------------------------------------------
@app.command()
def run(
    file: Path = typer.Argument(..., help="A pipeline YAML file.", show_default=False),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help=SET_HELP, metavar="NAME=VALUE"),
    model: str | None = MODEL_OPTION,
    image: list[str] | None = typer.Option(None, "--image",
                                           help="Image file (default: a built-in sample); repeat it for a prompt of "
                                                "several images, placed where the prompt writes <image>, else before "
                                                "the question in order."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text (default: a built-in question)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Tokens to generate (default 32; 6 in the comparison)."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    attn_implementation: str = ATTN_OPTION,
    device_map: str | None = DEVICE_MAP_OPTION,
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: the pipeline's seed)."),
    batch: int | None = typer.Option(None, "--batch", "-b", min=1,
                                        help="Samples per generate call: the image and prompt repeated (default 1); "
                                             "the comparison's batch size (default 20)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    output: Path = typer.Option(Path("runs/run"), "--output", "-o",
                                help="Folder for the comparison's sample set and kept-token picture."),
) -> None:
    """Run a pipeline on a model and report the visual tokens per LLM layer.

    With no --model, --image or --prompt: the pipeline beside vanilla, VisionZip and FastV at its
    budget on the embedded model and the built-in shapes-world sample set (grounding and VQA
    accuracy with % of vanilla, tokens per layer, prefill time, each run's schedule) and a
    picture of the kept tokens. Otherwise one image and one prompt (default model: the
    embedded one); the report says which schedule and signals were used.

    Examples: nuwa-graph run pipelines/nuwa.yaml --set budget=128
              nuwa-graph run pipelines/nuwa.yaml --image photo.jpg --prompt "What is left of the red circle?"
              nuwa-graph run pipelines/fastv.yaml --image a.png --image b.png --prompt "Is <image> brighter than <image>?"
    """
    _prompt_or_exit(prompt, max(len(image or []), 1))
    image = image or None
    demo = model is None and image is None and prompt is None
    if demo:
        _output_or_exit(output, "folder", [file], "--output")
    pipeline = _load_or_exit(file, set_)
    from .runner import resolve_device, resolve_dtype, run_command

    try:
        if demo:
            from .demo import run_demo

            dev = resolve_device(device)
            code = run_demo(pipeline, out=output, max_new_tokens=max_new_tokens or 6, seed=seed,
                            dtype=resolve_dtype(dtype, dev), device=dev, as_json=as_json,
                            attn_implementation=attn_implementation, device_map=device_map,
                            **({"batch": batch} if batch else {}))
            raise typer.Exit(code)
        code = run_command(pipeline=pipeline, model=model, image=image[0] if image and len(image) == 1 else image,
                           prompt=prompt,
                           max_new_tokens=max_new_tokens or 32, dtype=dtype, device=device, seed=seed,
                           as_json=as_json, attn_implementation=attn_implementation, device_map=device_map,
                           batch=batch or 1)
    except (RunError, PipelineError) as exc:
        if isinstance(exc, PipelineError):
            _print_problems(exc)
        else:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    raise typer.Exit(int(code or 0))


# --- sweep ----------------------------------------------------------------------------------
@app.command()
def sweep(
    file: Path = typer.Argument(..., help="A pipeline YAML file.", show_default=False),
    set_: list[str] | None = typer.Option(None, "--set", "-s", metavar="NAME=V1,V2,...",
                                             help="Values of a variable to sweep (comma-separated); repeatable: "
                                                  "the cross product runs."),
    model: str | None = MODEL_OPTION,
    image: str | None = typer.Option(None, "--image", help="Image file (default: a built-in sample)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text (default: a built-in question)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Tokens to generate per run."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    attn_implementation: str = ATTN_OPTION,
    device_map: str | None = DEVICE_MAP_OPTION,
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: the pipeline's seed)."),
    batch: int = typer.Option(1, "--batch", "-b", min=1,
                              help="Samples per generate call (the image and prompt repeated; timings per call)."),
    output: Path = typer.Option(Path("runs/sweep"), "--output", "-o",
                                help="Results written as OUTPUT.json and OUTPUT.csv."),
) -> None:
    """Run a pipeline over the cross product of variable values and write one results table.

    Example: nuwa-graph sweep pipelines/ablations/nuwa_distance.yaml --set distance=18,148,280 --set budget=64,128
    """
    from rich.progress import Progress

    from .sweep import load_all, output_paths, write_rows

    _prompt_or_exit(prompt)
    for path in output_paths(output):
        _output_or_exit(path, "file", [file] + ([image] if image else []), "--output")
    grid = _sweep_grid(set_)
    try:
        loaded = load_all(file, grid)
    except PipelineError as exc:
        _print_problems(exc)
        raise typer.Exit(1) from None
    from ..adapters import load_adapter
    from ..preflight import check_context
    from .models import default_model
    from .runner import DEFAULT_PROMPT, load_image, resolve_device, resolve_dtype

    rows = []
    text = DEFAULT_PROMPT if prompt is None else prompt
    try:
        img = load_image(image)
        dev = resolve_device(device)
        adapter = load_adapter(model or default_model(), resolve_dtype(dtype, dev), dev,
                               attn_implementation=attn_implementation, device_map=device_map)
        check_context(adapter, img, text, max_new_tokens)
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("sweep", total=len(loaded))
            for combo, pipe in loaded:
                bar.update(task, description=", ".join(f"{k}={v}" for k, v in combo.items()))
                rep = adapter.generate(pipe, [img] * batch, [text] * batch, max_new_tokens=max_new_tokens, seed=seed)
                fl = rep.flops[0]
                rows.append({**combo, "avg_visual_tokens": round(rep.visual_tokens_avg[0], 3),
                             "tokens_per_layer": rep.visual_tokens_per_layer[0], "prefill_ms": round(rep.prefill_ms, 2),
                             "decode_ms_per_token": round(rep.decode_ms_per_token, 2),
                             "prefill_gflops": round(fl["prefill"] / 1e9, 4) if "prefill" in fl else None,
                             "batch": batch, "answer": rep.answers[0]})
                bar.advance(task)
    except RunError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    table = Table(title=f"sweep of {escape(str(file))} ({len(rows)} runs)")
    cols = [c for c in rows[0] if c != "tokens_per_layer"] if rows else []
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(r[c])) for c in cols))
    out.print(table)
    for path in write_rows(rows, output):
        out.print(f"wrote {escape(str(path))}")
