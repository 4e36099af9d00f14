"""Selectors: turn Scores (and Regions) into a Selection of original token ids."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Regions, Scores, Selection


def order_ids(ids: torch.Tensor, scores: torch.Tensor | None, order: str) -> torch.Tensor:
    """Put selected ids in the promised order: `score` keeps topk order, `index` sorts."""
    if order == "index":
        return torch.sort(ids).values
    return ids


class TopKParams(NodeParams):
    k: int | None = Field(None, ge=0, description="number of tokens to keep (give k or ratio)")
    ratio: float | None = Field(None, ge=0, le=1, description="fraction kept instead of a count: of the candidates "
                                "(`of: input`) or of the image grid (`of: grid`), rounded by `rounding`")
    of: Literal["input", "grid"] = Field("input", description="what `ratio` is a fraction of: the tokens competing "
                                         "(input) or every token of the grid (grid)")
    rounding: Literal["floor", "ceil", "round"] = Field("floor", description="how ratio * count becomes a count "
                                                        "(floor = Python int())")
    clamp: bool = Field(False, description="when k exceeds the tokens competing keep them all (Nüwa's min(k, n)); "
                        "otherwise that is an error")
    order: Literal["index", "score"] = Field("index", description="index: ascending original id; score: torch.topk order")

    @model_validator(mode="after")
    def _one(self):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'k' or 'ratio'")
        return self


def count_from_ratio(ratio: float, n: int, rounding: str) -> int:
    """ratio * n as a token count: floor (Python int()), ceil or round."""
    x = ratio * n
    if rounding == "ceil":
        return int(math.ceil(x))
    if rounding == "round":
        return int(round(x))
    return int(x)


def gather_scores(scores: Scores, ids: torch.Tensor) -> torch.Tensor:
    """Positions in `scores` of the tokens `ids` (ValueError when one has no score)."""
    if ids.numel() == 0:
        return ids
    if (ids < 0).any():
        raise ValueError("a selected token has a negative id (CLS or pooled) and no score")
    size = max(int(scores.ids.max()) if scores.ids.numel() else 0, int(ids.max())) + 1
    lookup = torch.full((size,), -1, dtype=torch.long, device=scores.ids.device)
    lookup[scores.ids] = torch.arange(scores.ids.numel(), device=scores.ids.device)
    pos = lookup[ids]
    if (pos < 0).any():
        missing = ids[pos < 0][:5].tolist()
        raise ValueError(f"tokens {missing} have no score; connect scores over the same tokens")
    return pos


@register
class TopK(Node):
    """Keep the k highest-scoring tokens (FastV, PDrop, VisionZip's dominant set, ...).

    With `candidates`, only those tokens compete, in the candidates' order (ties follow
    torch.topk over that order): Nüwa's global alignment over the per-region candidates.
    """

    type_name = "selector.top-k"
    family = "selector"
    inputs = {
        "scores": Port(Scores, "one score per candidate token"),
        "candidates": Port(Selection, "only these tokens compete (default: every scored token)", optional=True),
    }
    outputs = {"selection": Port(Selection, "the k kept tokens")}
    Params = TopKParams

    def run(self, ctx, scores: Scores, candidates: Selection | None = None):
        values, ids = scores.values, scores.ids
        if candidates is not None:
            pos = gather_scores(scores, candidates.ids)
            values, ids = values[pos], ids[pos]
        n = values.numel()
        p = self.params
        if p.k is not None:
            k = p.k
        else:
            k = count_from_ratio(p.ratio, ctx.geometry.n_tokens if p.of == "grid" else n, p.rounding)
        if k > n:
            if not p.clamp:
                raise ValueError(f"k={k} is larger than the {n} tokens present; lower the budget (at most {n}) "
                                 "or set clamp: true")
            k = n
        idx = torch.topk(values, k).indices
        return {"selection": Selection(order_ids(ids[idx], values[idx], p.order))}


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
        slot = torch.arange(len(reg_grouped), device=reg_grouped.device)
        group_start = torch.cummax(torch.where(starts, slot, 0), 0).values
        rank_grouped = slot - group_start
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
        return {"selection": Selection(torch.tensor(out, dtype=torch.long, device=ids.device))}


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
        if self.params.offset >= min(h, w):
            raise ValueError(f"offset={self.params.offset} is outside the {h}x{w} token grid (at most {min(h, w) - 1})")
        rows = torch.arange(self.params.offset, h, self.params.stride, device=ctx.device)
        cols = torch.arange(self.params.offset, w, self.params.stride, device=ctx.device)
        ids = (rows[:, None] * w + cols[None, :]).reshape(-1)
        return {"selection": Selection(ids)}
