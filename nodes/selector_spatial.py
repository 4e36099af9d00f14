"""Spatial selectors that need no score: an evenly spread set of exactly k tokens.

`selector.uniform-grid` (nodes/selectors.py) takes every s-th row and column, which only
reaches square counts of the grid's divisors; `selector.uniform-count` spreads exactly k
tokens: r evenly spaced rows (r = round(sqrt(k * h / w))), each with floor or ceil of k / r
evenly spaced columns, cell centres taken. On 24x24, k = 64 gives the grid [1::3, 1::3] and
k = 144 the grid [1::2, 1::2]; other k give the closest near-uniform pattern.
"""

from __future__ import annotations

import math

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
