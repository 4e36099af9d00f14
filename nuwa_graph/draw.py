"""Offline drawings of a loaded pipeline: mermaid and Graphviz dot text, svg/png via `dot`.

Every box shows the node's name, type, how it runs over an image of several crops or parts or a
prompt of several images when that is not once per image (`per crop`, `per part`, `per prompt`:
part_views.scope_of, the file's `per:` or the node's default; appliers always run once over the
prompt and say nothing), and key params (`Node.summary()`); every edge is labelled
`out_port -> in_port : Type`; nodes are grouped by the site where they act, the
groups in stream order (vision, pre_llm, llm.0, llm.1, ...). Mermaid and dot text are made
here without any binary or network; svg and png hand the dot text to Graphviz's `dot`.
"""

from __future__ import annotations

import shutil
import subprocess

from .part_views import scope_of
from .pipeline import Pipeline

TEXT_FORMATS = ("mermaid", "dot")
IMAGE_FORMATS = ("svg", "png")
FORMATS = TEXT_FORMATS + IMAGE_FORMATS

INSTALL_HINT = (
    "Graphviz's 'dot' program is needed for svg and png drawings but was not found on PATH. "
    "Install it with `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) "
    "or `conda install graphviz`; the 'mermaid' and 'dot' formats need nothing installed."
)


class DrawError(RuntimeError):
    """A drawing could not be made (unknown format, Graphviz missing or failing)."""


def _groups(pipeline: Pipeline) -> list[tuple[str, list[str]]]:
    """(site name, node names in run order) for every site that has nodes, in stream order."""
    order = pipeline.order()
    out = []
    for site in pipeline.site_order():
        names = [n for n in order if pipeline.sites[n] == site]
        if names:
            out.append((site.name, names))
    return out


def _ids(pipeline: Pipeline) -> dict[str, str]:
    """Safe identifiers for the drawing languages (node names may hold '-' and the like)."""
    return {name: f"n{i}" for i, name in enumerate(pipeline.order())}


def _port_type(pipeline: Pipeline, src: str, out: str) -> str:
    return pipeline.nodes[src].outputs[out].type.type_name()


def edge_label(pipeline: Pipeline, src: str, out: str, dst: str, port: str) -> str:
    """`out_port -> in_port : Type` for one edge."""
    return f"{out} -> {port} : {_port_type(pipeline, src, out)}"


def box_lines(pipeline: Pipeline, name: str) -> list[str]:
    """The lines of a node's box: name, type (with `per X` when it does not run once per image,
    or the file says how it runs; appliers, always once over the prompt, say nothing), key
    params (if any)."""
    node = pipeline.nodes[name]
    per = getattr(node, "per", None)
    scope = scope_of(node, per)
    shown = node.family != "applier" and (per is not None or scope != "image")
    lines = [name, node.type_name + (f" · per {scope}" if shown else "")]
    summary = node.summary()
    if summary:
        lines.append(summary)
    return lines


# --- mermaid ------------------------------------------------------------------------------
def _mermaid_text(text: str) -> str:
    # inside a quoted mermaid label '"' must be an entity, and '<' could open an HTML tag
    return text.replace('"', "#quot;").replace("<", "#lt;")


def to_mermaid(pipeline: Pipeline) -> str:
    """A mermaid `flowchart` with one subgraph per site."""
    ids = _ids(pipeline)
    title = _mermaid_text(pipeline.name)
    lines = ["---", f"title: \"{title}\"", "---", "flowchart LR"]
    for i, (site, names) in enumerate(_groups(pipeline)):
        lines.append(f"    subgraph site{i}[\"site {_mermaid_text(site)}\"]")
        for name in names:
            label = "<br/>".join(
                f"<b>{_mermaid_text(t)}</b>" if j == 0 else _mermaid_text(t)
                for j, t in enumerate(box_lines(pipeline, name))
            )
            lines.append(f"        {ids[name]}[\"{label}\"]")
        lines.append("    end")
    for src, out, dst, port in pipeline.edges:
        label = _mermaid_text(edge_label(pipeline, src, out, dst, port))
        lines.append(f"    {ids[src]} -->|\"{label}\"| {ids[dst]}")
    return "\n".join(lines) + "\n"


# --- Graphviz dot ---------------------------------------------------------------------------
def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(pipeline: Pipeline) -> str:
    """A Graphviz digraph with one `cluster_*` subgraph per site."""
    ids = _ids(pipeline)
    lines = [
        f"digraph \"{_dot_text(pipeline.name)}\" {{",
        "    rankdir=LR;",
        f"    label=\"{_dot_text(pipeline.name)}\"; labelloc=t; fontname=\"Helvetica\";",
        "    node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", fontname=\"Helvetica\", fontsize=11];",
        "    edge [fontname=\"Helvetica\", fontsize=9];",
    ]
    for i, (site, names) in enumerate(_groups(pipeline)):
        lines.append(f"    subgraph cluster_{i} {{")
        lines.append(f"        label=\"site {_dot_text(site)}\"; style=\"dashed\"; color=\"#888888\";")
        for name in names:
            label = "\\n".join(_dot_text(t) for t in box_lines(pipeline, name))
            lines.append(f"        {ids[name]} [label=\"{label}\", tooltip=\"{_dot_text(name)}\"];")
        lines.append("    }")
    for src, out, dst, port in pipeline.edges:
        label = _dot_text(edge_label(pipeline, src, out, dst, port))
        lines.append(f"    {ids[src]} -> {ids[dst]} [label=\"{label}\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- images through Graphviz ----------------------------------------------------------------
def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def render_image(dot_text: str, fmt: str) -> bytes:
    """Run `dot -T<fmt>` on dot text; DrawError with install advice if `dot` is missing."""
    if fmt not in IMAGE_FORMATS:
        raise DrawError(f"unknown image format {fmt!r}; valid: {', '.join(IMAGE_FORMATS)}")
    exe = shutil.which("dot")
    if exe is None:
        raise DrawError(INSTALL_HINT)
    try:
        proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrawError(f"running Graphviz 'dot' failed: {exc}") from None
    if proc.returncode != 0:
        raise DrawError(f"Graphviz 'dot' failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def draw(pipeline: Pipeline, fmt: str = "mermaid") -> str | bytes:
    """The drawing in `fmt`: text for mermaid/dot/svg, bytes for png."""
    if fmt == "mermaid":
        return to_mermaid(pipeline)
    if fmt == "dot":
        return to_dot(pipeline)
    if fmt == "svg":
        return render_image(to_dot(pipeline), "svg").decode("utf-8")
    if fmt == "png":
        return render_image(to_dot(pipeline), "png")
    raise DrawError(f"unknown drawing format {fmt!r}; valid: {', '.join(FORMATS)}")
