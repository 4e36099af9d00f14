"""Selectors: turn Scores (and Regions) into a Selection of original token ids."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Regions, Scores, Selection


def order_ids(ids: torch.Tensor, scores: torch.Tensor | None, order: str) -> torch.Tensor:
    """Put selected ids in the promised order: `score` keeps topk order, `index` sorts."""
    if order == "index":
        return torch.sort(ids).values
    return ids


class TopKParams(NodeParams):
    k: int = Field(ge=0, description="number of tokens to keep (an error if more than are present)")
    order: Literal["index", "score"] = Field("index", description="index: ascending original id; score: torch.topk order")


@register
class TopK(Node):
    """Keep the k highest-scoring tokens (FastV, PDrop, VisionZip's dominant set, ...)."""

    type_name = "selector.top-k"
    family = "selector"
    inputs = {"scores": Port(Scores, "one score per candidate token")}
    outputs = {"selection": Port(Selection, "the k kept tokens")}
    Params = TopKParams

    def run(self, ctx, scores: Scores):
        k = self.params.k
        n = scores.values.numel()
        if k > n:
            raise ValueError(f"k={k} is larger than the {n} tokens present; lower the budget (at most {n})")
        idx = torch.topk(scores.values, k).indices
        return {"selection": Selection(order_ids(scores.ids[idx], scores.values[idx], self.params.order))}


class TopKPerRegionParams(NodeParams):
    n: int = Field(ge=1, description="candidates kept per region")
    order: Literal["index", "score"] = Field("index", description="index: ascending original id; score: by score, descending")


@register
class TopKPerRegion(Node):
    """Keep the n best tokens of every region (Nüwa's region separation)."""

    type_name = "selector.top-k-per-region"
    family = "selector"
    paper = "https://arxiv.org/abs/2602.02951"
    inputs = {"scores": Port(Scores), "regions": Port(Regions)}
    outputs = {"selection": Port(Selection, "at most n tokens of every region")}
    Params = TopKPerRegionParams

    def run(self, ctx, scores: Scores, regions: Regions):
        reg = regions.region[scores.ids]
        n = self.params.n
        # rank each token within its region by descending score (stable: ties keep lower position)
        order = torch.argsort(scores.values, descending=True, stable=True)
        reg_sorted = reg[order]
        by_region = torch.argsort(reg_sorted, stable=True)
        reg_grouped = reg_sorted[by_region]
        starts = torch.ones_like(reg_grouped, dtype=torch.bool)
        starts[1:] = reg_grouped[1:] != reg_grouped[:-1]
        group_start = torch.cummax(torch.where(starts, torch.arange(len(reg_grouped)), 0), 0).values
        rank_grouped = torch.arange(len(reg_grouped)) - group_start
        rank = torch.empty_like(rank_grouped)
        rank[order[by_region]] = rank_grouped
        keep = rank < n
        ids = scores.ids[keep]
        if self.params.order == "score":
            ids = ids[torch.argsort(scores.values[keep], descending=True, stable=True)]
        else:
            ids = torch.sort(ids).values
        return {"selection": Selection(ids)}


class UnionParams(NodeParams):
    order: Literal["index", "first"] = Field("index", description="index: ascending ids; first: order of first appearance")


@register
class Union(Node):
    """Union of several selections (FEATHER: attention top-k with a uniform grid)."""

    type_name = "selector.union"
    family = "selector"
    inputs = {"selections": Port(Selection, "selections to join", many=True)}
    outputs = {"selection": Port(Selection)}
    Params = UnionParams

    def run(self, ctx, selections: list[Selection]):
        ids = torch.cat([s.ids for s in selections])
        if self.params.order == "index":
            return {"selection": Selection(torch.unique(ids))}
        seen, out = set(), []
        for i in ids.tolist():
            if i not in seen:
                seen.add(i)
                out.append(i)
        return {"selection": Selection(torch.tensor(out, dtype=torch.long))}


class GridParams(NodeParams):
    stride: int = Field(ge=1, description="take every stride-th row and column")
    offset: int = Field(0, ge=0, description="first row/column taken")


@register
class UniformGrid(Node):
    """A uniform grid of tokens, [offset::stride, offset::stride] (downsampling, FEATHER)."""

    type_name = "selector.uniform-grid"
    family = "selector"
    inputs = {}
    outputs = {"selection": Port(Selection, "grid tokens, ascending")}
    Params = GridParams

    def run(self, ctx):
        h, w = ctx.geometry.grid
        rows = torch.arange(self.params.offset, h, self.params.stride)
        cols = torch.arange(self.params.offset, w, self.params.stride)
        ids = (rows[:, None] * w + cols[None, :]).reshape(-1)
        return {"selection": Selection(ids)}
