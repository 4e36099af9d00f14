"""Region cohesion: Nüwa's aggregation of every token into the kept ones (arXiv 2602.02951;
code Man-PaperRejected/Nuwa @ 175b7d57).

For the kept tokens I (in selection order) and every grid token j:
  A = ReLU(cos(s_i, s_j))        s = similarity features (e.g. mean of CLIP layers 16..24)
  P = 1 - min(1, dist(p_i, p_j) / r)   p = integer (row, col) grid coordinates
  W = A * P; pillar rows keep only their own entry;
  W_hat = W / (row_sum + 1e-8); self entry then set to 1.0 (LLaVA code) or left (Qwen code)
  T = W_hat @ X                   X = the features handed on (LLaVA: hidden_states[-2])
The radius r is either a squared grid distance (`distance`, the paper's DIST, 280 by
default: r = sqrt(280)), optionally defined on a reference grid and scaled by the grids'
diagonals so one file fits any grid, or a fraction of the grid's diagonal
(`distance_fraction`, Qwen code: 0.8, measured on the grid zero-padded to even sides).
A radius of 0 means each token only sees itself (the official code yields NaN there).
Only the K1 kept rows are computed: no n x n matrix beyond the rows needed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Roles, Selection, Tokens


def grid_diagonal(grid: tuple[int, int], pad_to: int = 1) -> float:
    """Largest linear distance between two cells of the grid padded to multiples of pad_to."""
    h = -(-grid[0] // pad_to) * pad_to
    w = -(-grid[1] // pad_to) * pad_to
    return math.sqrt((h - 1) ** 2 + (w - 1) ** 2)


def cohesion_radius(grid: tuple[int, int], distance: float | None, distance_grid: tuple[int, int] | None,
                    distance_fraction: float | None, pad_to: int = 1) -> float:
    """The linear radius r of the distance penalty on `grid` (see the module doc)."""
    if distance_fraction is not None:
        diag = grid_diagonal(grid, pad_to)
        return diag * distance_fraction if diag > 0 else 1.0
    assert distance is not None  # the params give distance or distance_fraction
    r = math.sqrt(distance)
    if distance_grid is not None and tuple(distance_grid) != tuple(grid):
        ref = grid_diagonal((distance_grid[0], distance_grid[1]), pad_to)
        if ref > 0:
            r = r * grid_diagonal(grid, pad_to) / ref
    return r


def distance_penalty(rows: torch.Tensor, grid: tuple[int, int], radius: float) -> torch.Tensor:
    """P[i, j] = 1 - min(1, ||p_rows[i] - p_j|| / radius) over all grid tokens j (float32),
    on the device of `rows`."""
    h, w = grid
    dev = rows.device
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"),
                         dim=-1).float().view(-1, 2)
    d = torch.cdist(coords[rows], coords, p=2.0)
    if radius <= 0:
        return (d == 0).to(torch.float32)
    return 1.0 - torch.clamp(d / radius, max=1.0)


class CohesionParams(NodeParams):
    distance: float | None = Field(None, ge=0, description="squared grid distance DIST (paper: 280 -> radius "
                                   "sqrt(280)); default 280 unless distance_fraction is given")
    distance_grid: tuple[int, int] | None = Field(None, description="grid on which `distance` is defined (e.g. "
                                                  "[24, 24]); on another grid the radius scales with the diagonal")
    distance_fraction: float | None = Field(None, ge=0, description="radius as a fraction of the grid's largest "
                                            "linear distance (Nüwa Qwen code: 0.8)")
    pad_to: int = Field(1, ge=1, description="grid sides padded to a multiple of this before measuring the diagonal "
                        "(Qwen code: 2)")
    self_weight: Literal["one", "normalised"] = Field(
        "one", description="one: self entry set to 1.0 after row normalisation (LLaVA code); normalised: plain "
        "row normalisation (Qwen code)")
    relu: bool = Field(True, description="clip negative cosine similarities to 0")
    eps: float = Field(1e-8, ge=0, description="added to each row sum before normalising")

    @model_validator(mode="after")
    def _one(self):
        if self.distance is not None and self.distance_fraction is not None:
            raise ValueError("give either 'distance' (squared grid distance) or 'distance_fraction', not both")
        if self.distance is None and self.distance_fraction is None:
            object.__setattr__(self, "distance", 280.0)
        return self


@register
class RegionCohesion(Node[CohesionParams]):
    """Nüwa aggregation: each kept collector absorbs similar nearby tokens; pillars stay."""

    type_name = "region-cohesion.nuwa"
    spatial = True  # per part on a tiled image (nuwa_graph/part_views.py)
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {
        "tokens": Port(Tokens, "aggregated kept tokens, in selection order, space of `features`"),
        "selection": Port(Selection, "their ids (unchanged)"),
    }

    def run(self, ctx,
            selection: Annotated[Selection, "kept tokens (Nüwa: K1, ascending)"],
            features: Annotated[Tokens, "features aggregated, over the whole grid (LLaVA: hidden_states[-2])"],
            similarity: Annotated[Tokens, "features whose cosine similarity weighs the aggregation, whole grid"],
            roles: Annotated[Roles | None, "pillars (kept as themselves) and collectors; absent = all collect"] = None):
        p = self.params
        grid = ctx.geometry.grid
        n = ctx.geometry.n_tokens
        grid_vals = {}
        for name, t in (("features", features), ("similarity", similarity)):
            vals = t.grid_values(n)
            if vals is None:
                raise ValueError(f"{name} must cover the whole {grid[0]}x{grid[1]} grid (one row per token)")
            grid_vals[name] = vals
        ids = selection.ids
        if (ids < 0).any() or (ids >= n).any():
            raise ValueError("the selection names tokens outside the grid")
        pillar = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        if roles is not None:
            if not torch.equal(roles.ids, ids):
                raise ValueError("roles were made for a different kept set (or order) than the selection")
            pillar = roles.pillar
        radius = cohesion_radius(grid, p.distance, p.distance_grid, p.distance_fraction, p.pad_to)
        s = F.normalize(grid_vals['similarity'], p=2, dim=-1)
        sim = s[ids] @ s.transpose(0, 1)
        if p.relu:
            sim = F.relu(sim)
        w = sim * distance_penalty(ids, grid, radius)
        rows = torch.arange(ids.numel(), device=ids.device)
        own = w[rows, ids].clone()
        w[pillar] = 0.0
        w[rows[pillar], ids[pillar]] = own[pillar]
        w = w / (w.sum(dim=-1, keepdim=True) + p.eps)
        if p.self_weight == "one":
            w[rows, ids] = 1.0
        x = grid_vals['features']
        out = w.to(x.dtype) @ x
        return {"tokens": Tokens(out, ids.clone(), features.space), "selection": Selection(ids.clone())}
