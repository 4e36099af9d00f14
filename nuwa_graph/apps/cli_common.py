"""The `nuwa-graph` command line's app: error handling, shared helpers and the top-level options.

The commands live in cli_inspect.py (validate, nodes, draw), cli_run.py (run, sweep) and
cli_eval.py (eval, merge); cli.py puts them together.

Every user error (a bad file, a bad --set, an unknown node type, Graphviz missing) ends
with a message and a non-zero exit code, never a traceback: exit 1 for an error, 2 for a
usage error (a bad option), 130 when interrupted (Ctrl-C). `--debug` shows the traceback of
an unexpected error. Output paths are checked before any work (see safe_io.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .. import __version__
from ..errors import PipelineError, RunError
from ..pipeline import Pipeline, load, parse_override
from ..preflight import check_prompt_text
from ..safe_io import check_output

try:  # typer >= 0.17 vendors click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc  # type: ignore[no-redef]

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

# Model options shared by run, sweep and eval (one declaration, one help text).
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Model id or local path (default: the embedded model).")
DTYPE_OPTION = typer.Option("auto", "--dtype", help=(
    "auto, float32, bfloat16 or float16. auto: float32 off CUDA; on CUDA the dtype the family's official code runs "
    "(float16: LLaVA, LLaVA-NeXT, LLaVA-OneVision; bfloat16: the Qwen-VL line, InternVL); the run report says "
    "which."))
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
ATTN_OPTION = typer.Option("sdpa", "--attn-implementation",
                           help="Attention the model's layers run: sdpa, flash_attention_2 or eager.")
DEVICE_MAP_OPTION = typer.Option(None, "--device-map", help="Spread a checkpoint over devices (e.g. auto; needs accelerate).")


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


