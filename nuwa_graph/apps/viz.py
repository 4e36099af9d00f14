"""Pictures of an evaluation (matplotlib, Agg backend: no display needed).

- `plot_accuracy(result, axis, path)`: accuracy against a swept variable (the budget), one
  line per pipeline (and per value of any other swept variable); runs that do not have the
  variable (vanilla) are dashed horizontal lines.
- `draw_kept(image, kept, grid, path, views=...)`: the tokens a pipeline kept, over the image:
  dropped patches shaded, kept ones outlined; one panel per site where tokens were dropped
  (a tiled image: one row per site, a panel per crop view: base and tiles, tiles and thumbnail).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def safe_name(label: str) -> str:
    """A file-name-safe version of a run label."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "run"


def _site_key(site: str) -> tuple[int, int]:
    if site == "vision":
        return (0, 0)
    if site == "pre_llm":
        return (1, 0)
    m = re.match(r"llm\.(\d+)$", site)
    return (2, int(m.group(1))) if m else (3, 0)


def kept_panels(kept: dict[str, list[int]], grid, views: list | None) -> tuple[list, list]:
    """What a kept-token picture draws: the views (label, rows x cols ids; one grid view when
    the image has no parts) and the panels, (site, kept ids) in stream order ('all' with every
    id when nothing was dropped). Shared by draw_kept and the HTML report (report_svg)."""
    if not views:
        if grid is None:
            raise ValueError("a kept-token picture needs a grid or views")
        rows, cols = int(grid[0]), int(grid[1])
        views = [("", [list(range(r * cols, (r + 1) * cols)) for r in range(rows)])]
    every = sorted({int(i) for _, ids in views for row in ids for i in row})
    return views, sorted(kept.items(), key=lambda kv: _site_key(kv[0])) or [("all", every)]


def plot_accuracy(result: dict[str, Any], axis: str, path: str | Path, metric: str = "accuracy") -> Path:
    """Accuracy (%) against `axis` per pipeline; one line per task-mean (`metric`='accuracy') or
    per task when `metric` names one (e.g. 'grounding')."""
    plt = _plt()
    series: dict[str, list[tuple[float, float]]] = {}
    flat: list[tuple[str, float]] = []
    for r in result["results"]:
        acc = r["accuracy"] if metric == "accuracy" else r["tasks"][metric]["accuracy"]
        if axis in r["variables"]:
            others = " ".join(f"{k}={v}" for k, v in r["variables"].items() if k != axis)
            key = f"{r['pipeline']} {others}".strip()
            series.setdefault(key, []).append((float(r["variables"][axis]), 100.0 * acc))
        else:
            flat.append((r["label"], 100.0 * acc))
    n = len(series) + len(flat)
    many = n > 8  # the legend goes beside the axes, and colours and markers both tell lines apart
    colors = plt.get_cmap("tab20" if n > 10 else "tab10").colors
    markers = "osD^vPX*<>"
    fig, ax = plt.subplots(figsize=(9.2 if many else 6.4, 4.2 + 0.12 * max(0, n - 16)), dpi=110)
    for i, (key, pts) in enumerate(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                color=colors[i % len(colors)], label=key)
    for i, (label, acc) in enumerate(flat):
        ax.axhline(acc, linestyle="--", color=colors[(len(series) + i) % len(colors)], label=label)
    ax.set_xlabel(axis)
    ax.set_ylim(-2, 102)
    ax.set_ylabel(("accuracy" if metric == "accuracy" else f"{metric} accuracy") + " (%)")
    tasks = ", ".join(d["task"] for d in result.get("data", []))
    ax.set_title(f"{metric} vs {axis} ({tasks})" if tasks else f"{metric} vs {axis}", fontsize=10)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_kept(image, kept: dict[str, list[int]], grid: tuple[int, int] | list[int] | None, path: str | Path,
              title: str = "", views: list | None = None) -> Path:
    """Kept tokens over `image` (PIL or path): dropped patches shaded, kept ones outlined.

    `kept`: site -> kept original ids (RunReport.kept of one sample); ids outside the grid
    (CLS = -1, extra merged tokens) are not drawn but counted in the panel title. An empty
    `kept` (nothing dropped) gives one panel with every patch kept. A tiled image (LLaVA-NeXT's
    base crop and stitched tiles, InternVL's tiles and thumbnail) passes `views`: (label,
    rows x cols ids) each covering the whole picture (`Geometry.views()`, RunReport.views);
    every site then gets one row with a panel per view, so every crop of the run is shown. A
    prompt of several images passes a list of images (paths or PIL) and its views (labelled
    `image i ...`, prompt_geometry.py): each view is drawn over its own image."""
    from matplotlib.patches import Rectangle
    from PIL import Image

    plt = _plt()
    pictures = []
    for one in (image if isinstance(image, (list, tuple)) else [image]):
        if not isinstance(one, Image.Image):
            with Image.open(one) as im:
                one = im.convert("RGB")
        pictures.append(one)
    if len(pictures) > 1 and not views:
        raise ValueError("draw_kept of several images needs their views (RunReport.views)")
    views, panels = kept_panels(kept, grid, views)
    fig, axes = plt.subplots(len(panels), len(views), figsize=(3.4 * len(views), 3.8 * len(panels)), dpi=110,
                             squeeze=False)
    for pi, (site, ids) in enumerate(panels):
        wanted = {int(i) for i in ids}
        drawn = set()
        for vi, (label, grid_ids) in enumerate(views):
            image = pictures[_image_of(label, len(pictures))]
            W, H = image.size
            ax = axes[pi][vi]
            rows, cols = len(grid_ids), len(grid_ids[0]) if grid_ids else 0
            cw, ch = W / max(cols, 1), H / max(rows, 1)
            ax.imshow(image, extent=(0, W, H, 0))
            inside = 0
            for r, row in enumerate(grid_ids):
                for c, t in enumerate(row):
                    if t in wanted:
                        inside += 1
                        drawn.add(t)
                        ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, edgecolor="#ffe600",
                                               linewidth=0.8))
                    else:
                        ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, facecolor="black", alpha=0.6, linewidth=0))
            head = f"{site}" + (f" {label}" if label else "")
            text = f"{head}: {inside}/{rows * cols} kept"
            if vi == len(views) - 1:
                extra = len(wanted - drawn)
                text += f" (+{extra} other)" if extra else ""
            ax.set_title(text, fontsize=9)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _image_of(label: str, n: int) -> int:
    """Which image a view shows: `image i ...` on a prompt of several, else the only one."""
    parts = label.split()
    if n > 1 and len(parts) > 1 and parts[0] == "image" and parts[1].isdigit():
        return min(int(parts[1]) - 1, n - 1)
    return 0


def write_pictures(result: dict[str, Any], out_dir: str | Path, axis: str | None = None) -> list[Path]:
    """The accuracy plot (when `axis` is given) and one kept-token picture per run."""
    out = Path(out_dir)
    written = []
    if axis:
        written.append(plot_accuracy(result, axis, out / f"accuracy_vs_{safe_name(axis)}.png"))
    for r in result["results"]:
        img, grid, views = r.get("sample_image"), r.get("grid"), r.get("views")
        if img is None or (grid is None and not views):
            continue
        written.append(draw_kept(img, r.get("sample_kept") or {}, grid, out / "kept" / f"{safe_name(r['label'])}.png",
                                 title=r["label"], views=views))
    return written


__all__ = ["draw_kept", "plot_accuracy", "safe_name", "write_pictures"]
