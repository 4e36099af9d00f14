"""Inline SVG for the HTML report: line/scatter plots with a Pareto frontier, and kept-token
pictures (the image as a base64 PNG under a grid of kept / dropped patches). Pure text: no
plotting library, no fonts or files fetched, so the page is self-contained."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]]  # x, y, tooltip
    lines: bool = True
    dashed: bool = False
    color: str = ""
    horizontal: float | None = None  # a reference drawn as a dashed line across the plot (vanilla)
    extra: dict[str, Any] = field(default_factory=dict)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x, higher y), by increasing x."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return best


def plot(series: list[Series], title: str, x_label: str, y_label: str, frontier: bool = False,
         width: int = 560, height: int = 360, css_class: str = "plot") -> str:
    """An SVG plot of `series` (y in %, 0..100); `frontier` draws the Pareto frontier of all points."""
    left, right, top, bottom = 56, 170, 30, 46
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for s in series for p in s.points]
    if not xs:
        return f'<p class="empty">{escape(title)}: nothing to plot</p>'
    x0, x1 = min(xs), max(xs)
    pad = (x1 - x0) * 0.06 or max(abs(x0) * 0.1, 1.0)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = 0.0, 100.0

    def X(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg class="{css_class}" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'aria-label="{escape(title)}">', f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="18" class="ptitle">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        if x0 <= t <= x1:
            out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                       f'<text x="{X(t):.1f}" y="{top + ph + 16}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" class="axis" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" class="axis" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    if frontier:
        front = pareto([(p[0], p[1]) for s in series for p in s.points])
        pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in front)
        out.append(f'<polyline points="{pts}" class="frontier"><title>Pareto frontier</title></polyline>')
        out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="7" class="frontier-point"><title>on the Pareto frontier'
                f'</title></circle>' for x, y in front]
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        if s.horizontal is not None:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(s.horizontal):.1f}" y2="{Y(s.horizontal):.1f}" '
                       f'stroke="{color}" stroke-width="1.5" stroke-dasharray="6 4"><title>{escape(s.name)}: '
                       f'{s.horizontal:.1f} %</title></line>')
        ordered = sorted(s.points)
        if s.lines and len(ordered) > 1:
            line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y, _ in ordered)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y, tip in ordered:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4" fill="{color}" class="point">'
                       f'<title>{escape(tip)}</title></circle>')
        ly = top + 12 + 16 * i
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"{dash}/><text x="{left + pw + 34}" y="{ly}" class="legend">'
                   f'{escape(s.name[:26])}</text>')
    out.append("</svg>")
    return "".join(out)


def image_data_uri(path: str | None, max_side: int = 336) -> str | None:
    """The image at `path` as a PNG data URI (scaled to at most `max_side` px), or None."""
    if not path or not Path(path).is_file():
        return None
    from ..safe_io import open_image

    try:
        img = open_image(path, "image")
    except Exception:  # noqa: BLE001 - a picture that cannot be read is left out, the report still renders
        return None
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def kept_picture(uri: str | None, kept: dict[str, list[int]], grid: list[int] | tuple[int, int] | None, title: str,
                 size: int = 200, views: list | None = None) -> str:
    """One row of panels per site where tokens were dropped: the image (an <img> with a data
    URI, or a grey square when the image is not available) under a grid, dropped patches
    shaded. A tiled image passes `views` (label, rows x cols ids; RunReport.views: LLaVA-NeXT's
    base crop and tiles, InternVL's tiles and thumbnail), each spread over the whole picture:
    a panel per view in each row, so every crop of the run is shown (as viz.draw_kept)."""
    from .viz import kept_panels

    views, panels = kept_panels(kept, grid, views)
    out = [f'<figure class="kept"><figcaption>{escape(title)}</figcaption>']
    for site, ids in panels:
        wanted = {int(i) for i in ids}
        drawn: set[int] = set()
        out.append('<div class="panels">')
        for vi, (label, grid_ids) in enumerate(views):
            rows, cols = len(grid_ids), (len(grid_ids[0]) if grid_ids else 0)
            cw, ch = size / max(cols, 1), size / max(rows, 1)
            cells, inside = [], 0
            for r, row in enumerate(grid_ids):
                for c, t in enumerate(row):
                    keep = int(t) in wanted
                    inside += keep
                    if keep:
                        drawn.add(int(t))
                    cells.append(f'<rect x="{c * cw:.2f}" y="{r * ch:.2f}" width="{cw:.2f}" height="{ch:.2f}" '
                                 f'class="{"keep" if keep else "drop"}"/>')
            extra = len(wanted - drawn) if vi == len(views) - 1 else 0
            head = site + (f" {label}" if label else "")
            bg = (f'<img src="{uri}" width="{size}" height="{size}" alt="sample image">' if uri
                  else f'<div class="noimg" style="width:{size}px;height:{size}px">image not available</div>')
            out.append(f'<div class="panel"><div class="stack" style="width:{size}px;height:{size}px">{bg}'
                       f'<svg class="grid-overlay" width="{size}" height="{size}" viewBox="0 0 {size} {size}">'
                       f'{"".join(cells)}</svg></div><div class="site">{escape(head)}: {inside}/{rows * cols} kept'
                       f'{f" (+{extra} other)" if extra else ""}</div></div>')
        out.append("</div>")
    out.append("</figure>")
    return "".join(out)
