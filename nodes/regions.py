"""Regions: partitions of the token grid that selectors and mergers can respect."""

from __future__ import annotations

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Regions


class GridCellsParams(NodeParams):
    cell: int = Field(2, ge=1, description="cell side in tokens (Nüwa: 2 -> 2x2 regions)")


@register
class GridCells(Node[GridCellsParams]):
    """Split the grid into non-overlapping cell x cell regions, raster-numbered.

    On a side that is not a multiple of `cell` the last cells are smaller: the same
    regions as zero-padding the grid to a multiple (Nüwa's Qwen code), since padded
    positions never hold a token.
    """

    type_name = "region.grid-cells"
    spatial = True  # per part on a tiled image (nuwa_graph/part_views.py)
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"regions": Port(Regions, "region id of every grid token")}

    def run(self, ctx):
        h, w = ctx.geometry.grid
        c = self.params.cell
        rows = torch.arange(h, device=ctx.device)[:, None] // c
        cols = torch.arange(w, device=ctx.device)[None, :] // c
        per_row = -(-w // c)
        return {"regions": Regions((rows * per_row + cols).reshape(-1), (h, w))}
