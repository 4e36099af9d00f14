"""`nuwa-graph validate`, `nodes` and `draw`: check pipelines, list node types, draw a graph."""

from __future__ import annotations

import inspect
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import registry
from ..errors import PipelineError
from ..pipeline import load
from ..safe_io import atomic_write
from .cli_common import (
    SET_HELP,
    _load_or_exit,
    _output_or_exit,
    _overrides,
    _print_problems,
    app,
    err,
    out,
)


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
        out.print(f"  {escape(scopes_line(p))}")
        for name, expr in p.derived.items():  # defaults that depend on the model: what is in force, and how
            if name not in p.overrides:
                out.print(f"  {escape(name)} = {escape(repr(p.variables[name]))} without a model (LLaVA-1.5-7B "
                          f"values); on a model: {escape(expr)}")
    if bad:
        out.print(f"[red]{bad} of {len(files)} file{'s' if len(files) != 1 else ''} invalid[/]")
        raise typer.Exit(1)


def scopes_line(pipe) -> str:
    """How each node runs on a prompt of several images (and an image of several crops or parts):
    'each image: a, b; whole prompt: c, d' (part_views.scope_of: the file's `per`, else the node's
    default; a budget counts per what its node runs over)."""
    from ..part_views import scope_of

    groups: dict[str, list[str]] = {}
    for name in pipe.order():
        node = pipe.nodes[name]
        groups.setdefault(scope_of(node, node.per), []).append(name)
    label = {"image": "each image", "prompt": "whole prompt", "crop": "each crop", "part": "each spatial part"}
    return "on several images or crops, runs over " + "; ".join(f"{label[k]}: {', '.join(v)}" for k, v in groups.items())


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
    out.print(f"[bold]{escape(cls.type_name)}[/]  (family: {escape(cls.family)}; "
              f"class {escape(cls.__module__)}.{escape(cls.__qualname__)})")
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
    fmt: DrawFormat = typer.Option(DrawFormat.mermaid, "--format", "-f",
                                   help="mermaid and dot need nothing; svg and png need Graphviz."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help=SET_HELP, metavar="NAME=VALUE"),
) -> None:
    """Draw a pipeline: boxes show name, type and key params; edges show ports and types; sites are clusters.

    Example: nuwa-graph draw pipelines/nuwa.yaml --format svg -o nuwa.svg
    """
    from ..draw import DrawError
    from ..draw import draw as make_drawing

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
