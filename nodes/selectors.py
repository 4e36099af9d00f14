"""Selectors: turn Scores (and Regions) into a Selection of original token ids."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Regions, Scores, Selection


def order_ids(ids: torch.Tensor, scores: torch.Tensor | None, order: str) -> torch.Tensor:
    """Put selected ids in the promised order: `score` keeps topk order, `index` sorts."""
    if order == "index":
        return torch.sort(ids).values
    return ids


class TopKParams(NodeParams):
    k: int | None = Field(None, ge=1, description="number of tokens to keep (give k or ratio)")
    ratio: float | None = Field(None, gt=0, le=1, description="fraction kept instead of a count: of the candidates "
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
    pos = lookup[ids.to(lookup.device)]
    if (pos < 0).any():
        missing = ids[pos < 0][:5].tolist()
        raise ValueError(f"tokens {missing} have no score; connect scores over the same tokens")
    return pos


PAD_ID = -3
"""Id of a zero-padded window cell with no token: `selector.top-k-per-region` lists such cells
among its candidates (order `region`) where the official code's padded grid has them, and
`selector.top-k` scores them 0 and drops them after its top-k (Nüwa's Qwen code)."""


def candidate_values(scores: Scores, candidates: torch.Tensor) -> torch.Tensor:
    """The score of every candidate in candidate order; PAD_ID cells score 0 (zero padding)."""
    values = torch.zeros(candidates.shape, dtype=scores.values.dtype, device=scores.values.device)
    real = candidates != PAD_ID
    values[real] = scores.values[gather_scores(scores, candidates[real])]
    return values


@register
class TopK(Node[TopKParams]):
    """Keep the k highest-scoring tokens (FastV, PDrop, VisionZip's dominant set, ...).

    With `candidates`, only those tokens compete, in the candidates' order (ties follow
    torch.topk over that order): Nüwa's global alignment over the per-region candidates.
    """

    type_name = "selector.top-k"
    outputs = {"selection": Port(Selection, "the k kept tokens")}

    def run(self, ctx,
            scores: Annotated[Scores, "one score per candidate token"],
            candidates: Annotated[Selection | None, "only these tokens compete (default: every scored token)"] = None):
        values, ids = scores.values, scores.ids
        if candidates is not None:
            # the official alignment: torch.topk over the candidate vector as given (padded
            # cells included), padded cells dropped afterwards
            values, ids = candidate_values(scores, candidates.ids), candidates.ids.to(values.device)
        n = values.numel()
        p = self.params
        if p.k is not None:
            k = p.k
        else:
            assert p.ratio is not None  # the params give exactly one of k and ratio
            k = count_from_ratio(p.ratio, ctx.geometry.n_tokens if p.of == "grid" else n, p.rounding)
        if k > n:
            if not p.clamp:
                raise BudgetError(k, n, advice=f"lower the budget (at most {n}) or set clamp: true")
            k = n
        idx = torch.topk(values[None], k, dim=1).indices[0]  # (1, n) as the official codes call it
        kept = ids[idx]
        kept = kept[kept != PAD_ID]
        return {"selection": Selection(order_ids(kept, None, p.order))}


class TopKPerRegionParams(NodeParams):
    n: int = Field(ge=1, description="candidates kept per region")
    order: Literal["region", "index", "score"] = Field(
        "region", description="region: the official candidate vector (regions in id order, each in its torch.topk "
        "order); index: ascending original id; score: by score, descending")
    pad: Literal["none", "zero"] = Field(
        "none", description="none: a region ranks only its own tokens; zero: window cells beyond the grid's edge "
        "(odd side) are zero-padded, as Nüwa's Qwen code: they compete at score 0 and, with order: region, travel "
        "as candidates (id -3) that selector.top-k drops after its top-k; connect them only to selector.top-k")


_ABSENT = -4  # a window cell inside the grid with no scored token of this region: never a candidate


def region_windows(scores: Scores, regions: Regions, pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's cells as one window row, in the official layout.

    Returns (values, ids), both (n_regions, cells): regions in ascending region id; a
    region's cells in raster order of its bounding window (a 2x2 cell: top-left, top-right,
    bottom-left, bottom-right, the order of `unfold(...).reshape(R, 4)`). Cells beyond the
    grid's edge hold 0 and PAD_ID with pad 'zero' (the official zero padding); other cells
    without a scored token of the region hold -inf and never become candidates. The window
    is as large as the largest region (a grid side shorter than the cell gives that side)."""
    device = scores.values.device
    h, w = regions.grid
    region = regions.region.to(device)
    if region.numel() != h * w:
        raise ValueError(f"regions cover {region.numel()} tokens, the grid {h}x{w} has {h * w}")
    cells = torch.arange(h * w, device=device)
    rows, cols = cells // w, cells % w
    labels, which = torch.unique(region, return_inverse=True)
    n_reg = labels.numel()
    r0 = torch.full((n_reg,), h, dtype=torch.long, device=device).scatter_reduce(0, which, rows, "amin")
    c0 = torch.full((n_reg,), w, dtype=torch.long, device=device).scatter_reduce(0, which, cols, "amin")
    r1 = torch.zeros(n_reg, dtype=torch.long, device=device).scatter_reduce(0, which, rows, "amax")
    c1 = torch.zeros(n_reg, dtype=torch.long, device=device).scatter_reduce(0, which, cols, "amax")
    ch, cw = int((r1 - r0).max()) + 1, int((c1 - c0).max()) + 1
    sid = scores.ids.to(device)
    if (sid < 0).any() or (sid >= h * w).any():
        raise ValueError(f"scores name tokens outside the {h}x{w} grid")
    values = torch.full((n_reg, ch * cw), float("-inf"), dtype=scores.values.dtype, device=device)
    ids = torch.full((n_reg, ch * cw), _ABSENT, dtype=torch.long, device=device)
    if pad == "zero":
        dy = torch.arange(ch * cw, device=device) // cw
        dx = torch.arange(ch * cw, device=device) % cw
        beyond = ((r0[:, None] + dy[None]) >= h) | ((c0[:, None] + dx[None]) >= w)
        values[beyond] = 0.0
        ids[beyond] = PAD_ID
    reg = which[sid]
    slot = (rows[sid] - r0[reg]) * cw + (cols[sid] - c0[reg])
    values[reg, slot] = scores.values
    ids[reg, slot] = sid
    return values, ids


@register
class TopKPerRegion(Node[TopKPerRegionParams]):
    """Keep the n best tokens of every region (Nüwa's region separation).

    As the official code: every region is one row of a window tensor (see
    `region_windows`), `torch.topk(k=n)` ranks each row, and the candidates come out
    region by region, each in its top-k order, so that `selector.top-k` (with these
    `candidates`) runs its top-k over the same vector and breaks ties the same way.
    """

    type_name = "selector.top-k-per-region"
    spatial = True  # per part on a tiled image (nuwa_graph/part_views.py)
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"selection": Port(Selection, "at most n tokens of every region")}

    def run(self, ctx, scores: Scores, regions: Regions):
        p = self.params
        values, ids = region_windows(scores, regions, p.pad)
        k = min(p.n, values.shape[1])
        local = torch.topk(values[None], k=k, dim=-1).indices[0]  # (1, regions, cells), as the official call
        cand = torch.gather(ids, 1, local).reshape(-1)
        cand = cand[cand != _ABSENT]
        if p.order != "region":
            cand = cand[cand != PAD_ID]
            if p.order == "score":
                cand = cand[torch.argsort(scores.values[gather_scores(scores, cand)], descending=True, stable=True)]
            else:
                cand = torch.sort(cand).values
        return {"selection": Selection(cand)}


class UnionParams(NodeParams):
    order: Literal["index", "first"] = Field("index", description="index: ascending ids; first: order of first appearance")


@register
class Union(Node[UnionParams]):
    """Union of several selections (FEATHER: attention top-k with a uniform grid)."""

    type_name = "selector.union"
    outputs = {"selection": Port(Selection)}

    def run(self, ctx, selections: Annotated[list[Selection], "selections to join"]):
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
class UniformGrid(Node[GridParams]):
    """A uniform grid of tokens, [offset::stride, offset::stride] (downsampling, FEATHER)."""

    type_name = "selector.uniform-grid"
    spatial = True  # per part on a tiled image (nuwa_graph/part_views.py)
    outputs = {"selection": Port(Selection, "grid tokens, ascending")}

    def run(self, ctx):
        h, w = ctx.geometry.grid
        if self.params.offset >= min(h, w):
            raise ValueError(f"offset={self.params.offset} is outside the {h}x{w} token grid (at most {min(h, w) - 1})")
        rows = torch.arange(self.params.offset, h, self.params.stride, device=ctx.device)
        cols = torch.arange(self.params.offset, w, self.params.stride, device=ctx.device)
        ids = (rows[:, None] * w + cols[None, :]).reshape(-1)
        return {"selection": Selection(ids)}
