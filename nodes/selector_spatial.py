"""Spatial selectors: an evenly spread set of exactly k tokens (no score needed), and the
spatial neighbours of a set of anchor tokens (`selector.neighbours`, HiPrune's buffers).

`selector.uniform-grid` (nodes/selectors.py) takes every s-th row and column, which only
reaches square counts of the grid's divisors; `selector.uniform-count` spreads exactly k
tokens: r evenly spaced rows (r = round(sqrt(k * h / w))), each with floor or ceil of k / r
evenly spaced columns, cell centres taken. On 24x24, k = 64 gives the grid [1::3, 1::3] and
k = 144 the grid [1::2, 1::2]; other k give the closest near-uniform pattern.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Selection


def spread_ids(grid: tuple[int, int], k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Exactly k ids spread evenly over an h x w grid (raster order, ascending), on `device`."""
    h, w = grid
    if k > h * w:
        raise BudgetError(k, h * w, what="tokens of the grid", advice="lower the budget")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    r = max(1, min(h, round(math.sqrt(k * h / w))))
    while math.ceil(k / r) > w:  # too few rows to hold k
        r += 1
    base, extra = divmod(k, r)
    rows = [int((i + 0.5) * h / r) for i in range(r)]
    # rows that take one more token are spread evenly too
    more = {int((j + 0.5) * r / extra) for j in range(extra)} if extra else set()
    ids: list[int] = []
    for i, row in enumerate(rows):
        c = base + (1 if i in more else 0)
        cols = [int((j + 0.5) * w / c) for j in range(c)]
        ids.extend(row * w + col for col in cols)
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


class CountParams(NodeParams):
    k: int = Field(ge=1, description="number of tokens kept, spread evenly over the grid")


@register
class UniformCount(Node[CountParams]):
    """Exactly k tokens spread evenly over the grid (spatial downsampling baseline)."""

    type_name = "selector.uniform-count"
    spatial = True  # per part on a tiled image (nuwa_graph/part_views.py)
    outputs = {"selection": Port(Selection, "k grid tokens, ascending")}

    def run(self, ctx):
        return {"selection": Selection(spread_ids(ctx.geometry.grid, self.params.k, ctx.device))}


class NeighboursParams(NodeParams):
    mode: Literal["flat", "grid"] = Field(
        "flat", description="flat: the official flat-index offsets -1, +1, -W, +W clamped to [0, n-1] (no row-boundary "
        "check: +-1 wraps to the neighbouring row, ids past either end become the first or last token; HiPrune's "
        "LLaVA and Qwen code); grid: the 4 neighbours inside the grid (no wrap, no clamp)")
    include: bool = Field(True, description="keep the given tokens themselves too")


@register
class Neighbours(Node[NeighboursParams]):
    """Dilate a set of anchor tokens by their spatial neighbours (HiPrune's buffer tokens).

    Output: the anchors (with `include`) and their 4 neighbours, each once, ascending, as
    `torch.unique` gives them on a CPU (the official code takes `unique(sorted=False)`,
    which is ascending there; the set is what counts). Reads the grid from the geometry.
    Official: Danielement321/HiPrune @ 6e83a124, LLaVA/llava/model/llava_arch.py:157-164 and
    Qwen2_5_VL/qwen2_5_vl_HiPrune.py:1863-1871.
    """

    type_name = "selector.neighbours"
    paper = "https://arxiv.org/abs/2508.00553"
    spatial = True  # reads the grid: per part on a tiled image, never over a flat sequence
    outputs = {"selection": Port(Selection, "the anchors and their neighbours, ascending")}

    def run(self, ctx, selection: Annotated[Selection, "the anchor tokens"]):
        h, w = ctx.geometry.grid
        a = selection.ids
        if a.numel() and (int(a.min()) < 0 or int(a.max()) >= h * w):
            raise ValueError(f"anchors must be grid tokens 0..{h * w - 1}")
        if self.params.mode == "flat":
            parts = [a - 1, a + 1, a - w, a + w]
            out = torch.cat(([a] if self.params.include else []) + parts).clamp(0, h * w - 1)
        else:
            r, c = a // w, a % w
            parts = [a[c > 0] - 1, a[c < w - 1] + 1, a[r > 0] - w, a[r < h - 1] + w]
            out = torch.cat(([a] if self.params.include else []) + parts)
        return {"selection": Selection(torch.unique(out))}
