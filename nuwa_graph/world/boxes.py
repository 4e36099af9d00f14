"""Boxes as coordinate tokens, and the parser that turns a model's answer into a pixel box.

Format: a box (x0, y0, x1, y1) in pixels of an image W x H is written as four tokens
`<xA> <yB> <xC> <yD>` with `bins` (16) bins per axis: A = floor(x0 / W * bins), C = floor(x1 / W * bins)
(clipped to 0..bins-1), likewise B, D for y. A token decodes to the centre of its bin,
(k + 0.5) * W / bins, so the quantisation error is at most half a bin (5.25 px at 168 px).

`parse_box` also reads the two plain-number forms real VLMs answer with: `[x0, y0, x1, y1]`
normalised to 0..1 (lmms-eval's RefCOCO prompt) or in pixels (Qwen2.5-VL). Anything else -> None.
"""

from __future__ import annotations

import re

BINS = 16
_TOKENS = re.compile(r"<x(\d+)>\s*<y(\d+)>\s*<x(\d+)>\s*<y(\d+)>")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_NUMBERS = re.compile(r"[\[(]" + ",".join([_NUM] * 4) + r"[\])]")


def coord_tokens(bins: int = BINS) -> list[str]:
    return [f"<x{k}>" for k in range(bins)] + [f"<y{k}>" for k in range(bins)]


def _bin(v: float, extent: float, bins: int) -> int:
    return min(bins - 1, max(0, int(v / extent * bins)))


def box_to_tokens(box, width: int, height: int, bins: int = BINS) -> str:
    x0, y0, x1, y1 = box
    return (f"<x{_bin(x0, width, bins)}> <y{_bin(y0, height, bins)}> "
            f"<x{_bin(x1, width, bins)}> <y{_bin(y1, height, bins)}>")


def tokens_to_box(a: int, b: int, c: int, d: int, width: int, height: int, bins: int = BINS):
    sx, sy = width / bins, height / bins
    x0, x1 = sorted(((a + 0.5) * sx, (c + 0.5) * sx))
    y0, y1 = sorted(((b + 0.5) * sy, (d + 0.5) * sy))
    return (x0, y0, x1, y1)


def parse_box(text: str, width: int, height: int, bins: int = BINS):
    """Pixel box (x0, y0, x1, y1) from an answer, or None if it holds no box.

    The first `<x.> <y.> <x.> <y.>` group wins (corners reordered if swapped; a bin outside
    0..bins-1 -> None). Without tokens, the first bracketed group of four numbers is read as
    normalised if all are <= 1, else as pixels.
    """
    if not isinstance(text, str):
        return None
    m = _TOKENS.search(text)
    if m:
        ks = [int(g) for g in m.groups()]
        if any(k >= bins for k in ks):
            return None
        return tokens_to_box(ks[0], ks[1], ks[2], ks[3], width, height, bins)
    m = _NUMBERS.search(text)
    if m:
        v = [float(g) for g in m.groups()]
        if all(0 <= x <= 1 for x in v):
            v = [v[0] * width, v[1] * height, v[2] * width, v[3] * height]
        x0, x1 = sorted((v[0], v[2]))
        y0, y1 = sorted((v[1], v[3]))
        return (x0, y0, x1, y1)
    return None


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 if either is None or empty."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
