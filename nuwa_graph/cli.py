"""The `nuwa-graph` command line: validate, list node types, draw and run pipelines.

Every user error (a bad file, a bad --set, an unknown node type, Graphviz missing) ends
with a message and a non-zero exit code, never a traceback: exit 1 for an error, 2 for a
usage error (a bad option), 130 when interrupted (Ctrl-C). `--debug` shows the traceback of
an unexpected error. Output paths are checked before any work (see safe_io.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from . import __version__, registry
from .errors import PipelineError, RunError
from .pipeline import Pipeline, load, parse_override
from .preflight import check_prompt_text, check_template
from .safe_io import atomic_write, check_output

try:  # typer >= 0.17 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc

_STATE = {"debug": False}


class _SafeGroup(TyperGroup):
    """Turns every error into one message and an exit code (1 error, 130 interrupted), never a
    traceback unless --debug (or NUWA_GRAPH_DEBUG=1) asks for it."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (_click_exc.ClickException, typer.Abort, typer.Exit, SystemExit):
            raise
        except PipelineError as exc:
            if _debug():
                raise
            _print_problems(exc)
            raise typer.Exit(1) from None
        except RunError as exc:
            if _debug():
                raise
            _error(str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - a bug or an input nobody foresaw: still one line, never a traceback
            if _debug():
                raise
            text = (str(exc).strip().splitlines() or [""])[0][:300]
            _error(f"{type(exc).__name__}: {text} (unexpected; run again with --debug for the traceback)")
            raise typer.Exit(1) from None


def _debug() -> bool:
    import os

    return _STATE["debug"] or os.environ.get("NUWA_GRAPH_DEBUG", "") not in ("", "0")


def _error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")


def _output_or_exit(path: Path | None, kind: str, inputs, option: str = "--output", extra_files=()) -> None:
    """Check an output path before any work; a bad one is a usage error (exit 2)."""
    if path is None:
        return
    try:
        check_output(path, kind, inputs, option, extra_files)  # type: ignore[arg-type]
    except RunError as exc:
        raise typer.BadParameter(str(exc).removeprefix(f"{option} "), param_hint=option) from None


def _prompt_or_exit(prompt: str | None) -> None:
    try:
        check_prompt_text(prompt)
    except RunError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--prompt "), param_hint="--prompt") from None


app = typer.Typer(
    cls=_SafeGroup,
    pretty_exceptions_show_locals=False,
    name="nuwa-graph",
    help=(
        "Visual-token pruning for vision-language models as YAML graphs of typed nodes.\n\n"
        "Example: nuwa-graph validate pipelines/*.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SET_HELP = "Override a pipeline variable, NAME=VALUE (value read as YAML); repeatable."


# --- helpers --------------------------------------------------------------------------------
def _overrides(sets: list[str] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for text in sets or []:
        try:
            name, value = parse_override(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--set") from None
        values[name] = value
    return values


def _sweep_grid(sets: list[str] | None) -> dict[str, list[Any]]:
    """`--set NAME=V1,V2` values of sweep and eval, or a clear --set error."""
    from .sweep import parse_sweep

    try:
        return parse_sweep(sets or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None


def _print_problems(exc: PipelineError, console: Console = err) -> None:
    n = len(exc.problems)
    source = exc.problems[0].file if exc.problems else "pipeline"
    console.print(f"[bold red]✗ {escape(source)}[/]: {n} problem{'s' if n != 1 else ''}")
    for p in exc.problems:
        console.print("  [red]-[/] " + escape(str(p)), soft_wrap=True)


def _load_or_exit(file: Path, sets: list[str] | None) -> Pipeline:
    overrides = _overrides(sets)
    try:
        return load(file, overrides)
    except PipelineError as exc:
        _print_problems(exc)
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nuwa-graph {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an unexpected error."),
) -> None:
    """Visual-token pruning for vision-language models as YAML graphs of typed nodes.

    Example: nuwa-graph validate pipelines/*.yaml
    """
    _STATE["debug"] = debug


# --- validate -------------------------------------------------------------------------------
@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Pipeline YAML files.", show_default=False),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help=SET_HELP, metavar="NAME=VALUE"),
) -> None:
    """Check pipeline files: every problem of every file is reported; exit 0 only if all are valid.

    Example: nuwa-graph validate pipelines/*.yaml --set budget=128
    """
    overrides = _overrides(set_)
    bad = 0
    for file in files:
        try:
            p = load(file, overrides)
        except PipelineError as exc:
            bad += 1
            _print_problems(exc, out)
            continue
        sites = ", ".join(s.name for s in p.site_order())
        out.print(f"[bold green]OK[/] {escape(str(file))} ({len(p.nodes)} nodes; sites: {escape(sites)})")
    if bad:
        out.print(f"[red]{bad} of {len(files)} file{'s' if len(files) != 1 else ''} invalid[/]")
        raise typer.Exit(1)


# --- nodes ----------------------------------------------------------------------------------
def _ports(ports) -> str:
    return "\n".join(f"{n}: {p.describe()}" for n, p in ports.items()) or "-"


def _param_fields(cls) -> str:
    parts = []
    for name, f in cls.Params.model_fields.items():
        parts.append(name if f.is_required() else f"{name}={f.get_default(call_default_factory=True)!r}")
    return "\n".join(parts) or "-"


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _node_details(cls) -> None:
    out.print(f"[bold]{escape(cls.type_name)}[/]  (family: {escape(cls.family)}; class {escape(cls.__module__)}.{escape(cls.__qualname__)})")
    doc = inspect.getdoc(cls)
    if doc:
        out.print()
        out.print(escape(doc))
    if cls.paper:
        out.print(f"\npaper: {escape(cls.paper)}")
    for title, ports in (("inputs", cls.inputs), ("outputs", cls.outputs)):
        t = Table(title=title, title_justify="left", show_lines=False)
        t.add_column("port", no_wrap=True)
        t.add_column("type", no_wrap=True)
        t.add_column("required")
        t.add_column("doc")
        for name, p in ports.items():
            t.add_row(escape(name), escape(p.describe()), "no" if p.optional else "yes",
                      escape(p.doc or p.type.doc))
        if not ports:
            t.add_row("-", "", "", "")
        out.print(t)
    t = Table(title="params", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("type")
    t.add_column("default")
    t.add_column("doc")
    for name, f in cls.Params.model_fields.items():
        default = "(required)" if f.is_required() else repr(f.get_default(call_default_factory=True))
        t.add_row(escape(name), escape(_type_text(f.annotation)), escape(default), escape(f.description or ""))
    if not cls.Params.model_fields:
        t.add_row("-", "", "", "")
    out.print(t)
    out.print("params JSON schema:")
    out.print_json(data=cls.Params.model_json_schema())


@app.command()
def nodes(
    type_name: str | None = typer.Argument(None, metavar="TYPE", help="A node type to describe in full.", show_default=False),
) -> None:
    """List every node type (built-in and from plug-ins), or describe one TYPE in full.

    Example: nuwa-graph nodes selector.top-k
    """
    types = registry.all_types()
    for msg in registry.load_errors():
        err.print(f"[yellow]warning:[/] plug-in not loaded: {escape(msg)}")
    if type_name is not None:
        try:
            cls = registry.get(type_name)
        except KeyError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc.args[0]))}")
            err.print("List the node types with: nuwa-graph nodes")
            raise typer.Exit(1) from None
        _node_details(cls)
        return
    t = Table(title=f"{len(types)} node types", title_justify="left", show_lines=True)
    t.add_column("type", no_wrap=True, style="bold")
    t.add_column("family", overflow="fold")
    t.add_column("inputs", overflow="fold")
    t.add_column("outputs", overflow="fold")
    t.add_column("params", overflow="fold")
    for name, cls in types.items():
        t.add_row(escape(name), escape(cls.family), escape(_ports(cls.inputs)), escape(_ports(cls.outputs)),
                  escape(_param_fields(cls)))
    # piped output (files, CI logs) gets a wide table instead of rich's 80-column default
    console = out if out.is_terminal else Console(highlight=False, width=max(out.width, 150))
    console.print(t)
    out.print("Details of one type: nuwa-graph nodes TYPE")


# --- draw -----------------------------------------------------------------------------------
class DrawFormat(str, Enum):
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    png = "png"


@app.command()
def draw(
    file: Path = typer.Argument(..., help="A pipeline YAML file.", show_default=False),
    fmt: DrawFormat = typer.Option(DrawFormat.mermaid, "--format", "-f", help="mermaid and dot need nothing; svg and png need Graphviz."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help=SET_HELP, metavar="NAME=VALUE"),
) -> None:
    """Draw a pipeline: boxes show name, type and key params; edges show ports and types; sites are clusters.

    Example: nuwa-graph draw pipelines/nuwa.yaml --format svg -o nuwa.svg
    """
    from .draw import DrawError
    from .draw import draw as make_drawing

    _output_or_exit(output, "file", [file], "--output")
    pipeline = _load_or_exit(file, set_)
    try:
        drawing = make_drawing(pipeline, fmt.value)
    except DrawError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if output is not None:
        atomic_write(output, drawing)
        err.print(f"wrote {escape(str(output))}")
    elif isinstance(drawing, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(drawing)
        sys.stdout.buffer.flush()
    else:
        typer.echo(drawing, nl=False)


# --- run ------------------------------------------------------------------------------------
@app.command()
def run(
    file: Path = typer.Argument(..., help="A pipeline YAML file.", show_default=False),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help=SET_HELP, metavar="NAME=VALUE"),
    model: str | None = typer.Option(None, "--model", "-m", help="Model id or local path (default: the embedded model)."),
    image: str | None = typer.Option(None, "--image", help="Image file (default: a built-in sample)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text (default: a built-in question)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Tokens to generate (default 32; 6 in the comparison)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    attn_implementation: str = typer.Option("sdpa", "--attn-implementation",
                                            help="Attention the model's layers run: sdpa, flash_attention_2 or eager."),
    device_map: str | None = typer.Option(None, "--device-map",
                                             help="Spread a checkpoint over devices (e.g. auto; needs accelerate)."),
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
    """
    _prompt_or_exit(prompt)
    demo = model is None and image is None and prompt is None
    if demo:
        _output_or_exit(output, "folder", [file], "--output")
    pipeline = _load_or_exit(file, set_)
    if importlib.util.find_spec("nuwa_graph.runner") is None:
        err.print(f"[yellow]{escape(str(file))} is valid, but running on models is not available yet "
                  "(nuwa_graph.runner is missing).[/]")
        raise typer.Exit(2)
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
        code = run_command(pipeline=pipeline, model=model, image=image, prompt=prompt,
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
    model: str | None = typer.Option(None, "--model", "-m", help="Model id or local path (default: the embedded model)."),
    image: str | None = typer.Option(None, "--image", help="Image file (default: a built-in sample)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt text (default: a built-in question)."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Tokens to generate per run."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    attn_implementation: str = typer.Option("sdpa", "--attn-implementation",
                                            help="Attention the model's layers run: sdpa, flash_attention_2 or eager."),
    device_map: str | None = typer.Option(None, "--device-map",
                                             help="Spread a checkpoint over devices (e.g. auto; needs accelerate)."),
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
    from .adapters import load_adapter
    from .evaluate import default_model
    from .preflight import check_context
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


# `eval` (accuracy over a data set) is added here as a further @app.command().

@app.command("eval")
def eval_(
    files: list[Path] = typer.Argument(..., metavar="PIPELINE...", help="Pipeline YAML files.", show_default=False),
    model: str | None = typer.Option(None, "--model", "-m", help="Model id or local path (default: the embedded model)."),
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
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    attn_implementation: str = typer.Option("sdpa", "--attn-implementation",
                                            help="Attention the model's layers run: sdpa, flash_attention_2 or eager."),
    device_map: str | None = typer.Option(None, "--device-map",
                                             help="Spread a checkpoint over devices (e.g. auto; needs accelerate)."),
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
                                          "lmms-eval's chat text (llava_hf / qwen2_5_vl), RefCOCO prompt and box "
                                          "parsing, so numbers compare with lmms-eval's."),
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
) -> None:
    """Accuracy of pipelines over a data set: grounding Acc@0.5, VQA exact match, tokens, prefill time.

    Every data record is checked before the model is loaded. An interrupted eval (Ctrl-C) keeps its
    finished batches in OUTPUT/predictions.partial.jsonl; the same command again resumes from them.

    Example: nuwa-graph eval pipelines/vanilla.yaml pipelines/fastv.yaml pipelines/nuwa.yaml --set budget=32,64 --limit 100
    Many GPUs: torchrun --nproc_per_node 8 -m nuwa_graph.cli eval ... (rank 0 writes the merged results)
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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
    )
    from .prompts import LMMS_REC_PROMPT, LMMS_VQA_PROMPT, STYLES, lmms_eval_style, unescape
    from .shards import Group, Shard, device_for, merge, parse_shard, read_shards, shard_payload, write_shard

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
    try:
        shard = parse_shard(shard_) if shard_ else Shard.from_env()
        runs = plan_runs(files, grid)
    except PipelineError as exc:
        _print_problems(exc)
        raise typer.Exit(1) from None
    except EvalError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    from .adapters import load_adapter
    from .runner import _explain, resolve_device, resolve_dtype

    # an interrupted eval resumes from here (a shard from its own file)
    partial = output / (PARTIAL_PREDICTIONS if shard is None else f"predictions.partial.{shard.index}-of-{shard.count}.jsonl")
    try:
        with Group(shard) as group:
            if not data and shard and shard.launched and shard.index != 0:
                group.barrier()  # rank 0 writes the built-in sample set first
            tasks = load_data(data if data else [str(p) for p in sample_data(output / "sample_data")], limit=limit,
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
            total = len(runs) * sum(len(t.samples) for t in part)
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
                                      checkpoint=partial)
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
    from .evaluate import EvalError
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
    from .evaluate import sweep_axis, tokens_runs, write_results
    from .viz import write_pictures

    names = [d["task"] for d in result["data"]]
    sizes = ", ".join(f"{d['task']}: {d['n']}" for d in result["data"])
    table = Table(title=f"eval on {escape(result['model'])} ({sizes}; relative to {escape(result['reference'])})")
    table.add_column("run", overflow="fold")
    for k in names:
        table.add_column(f"{k} acc", justify="right")
        if k.startswith("grounding"):
            table.add_column(f"{k} unparsed", justify="right")
    table.add_column("mean acc", justify="right")
    table.add_column("rel. %", justify="right")
    table.add_column("avg tokens", justify="right")
    table.add_column("tokens per layer", overflow="fold")
    table.add_column("prefill ms", justify="right")
    for r in result["results"]:
        cells = [escape(r["label"])]
        for k in names:
            t = r["tasks"][k]
            cells.append(f"{100 * t['accuracy']:.1f}%")
            if k.startswith("grounding"):
                cells.append(f"{t['parse_failures']}/{t['n']}")
        rel = r["relative_pct"]
        cells += [f"{100 * r['accuracy']:.1f}%", "-" if rel is None else f"{rel:.1f}",
                  f"{r['visual_tokens_avg']:.1f}/{r['visual_tokens_full']}",
                  tokens_runs(r["visual_tokens_per_layer"]), f"{r['prefill_ms_median']:.1f}"]
        table.add_row(*cells)
    # piped output (files, CI logs) gets a wide table instead of rich's 80-column default
    (out if out.is_terminal else Console(highlight=False, width=max(out.width, 160))).print(table)
    if result.get("resumed_batches"):
        err.print(f"resumed: {result['resumed_batches']} batches taken from {escape(str(partial))}")
    paths = list(write_results(result, output).values())
    if partial is not None:
        partial.unlink(missing_ok=True)  # the complete predictions.jsonl now holds them
    paths += write_pictures(result, output, sweep_axis(grid))
    for p in paths:
        out.print(f"wrote {escape(str(p))}")



# --- train ----------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train the embedded LLaVA on the shapes world; every option is passed on to the trainer
    (list them with `python scripts/train_embedded.py --help`; recipe in docs/embedded.md).

    Example: nuwa-graph train --out runs/embedded --seed 0   (then --resume runs/embedded)
    """
    from .embedded.train import main as train_main

    train_main(list(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    app()
