"""Greedy MAP inference of a determinantal point process (CDPruner, NeurIPS'25, arXiv
2506.10967; Theia-4869/CDPruner @ 9541616c, llava/model/llava_arch.py:148-183).

The kernel is L = r_i * S_ij * r_j: S the cosine similarity of the given features (diversity),
r an optional per-token relevance (quality). The fast greedy MAP algorithm (Chen et al., 2018,
incremental Cholesky) picks, k times, the token with the largest residual gain d_j, then
orthogonalises every residual against it: e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j),
d -= e^2, d_j = -inf. O(n^2 d) for S plus O(k^2 n) for the loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Scores, Selection, Tokens

from .selectors import gather_scores


class DppParams(NodeParams):
    k: int = Field(ge=1, description="tokens picked (CDPruner: visual_token_num, exactly what enters the LLM)")
    order: Literal["index", "pick"] = Field("index", description="index: ascending ids (the official mask); "
                                            "pick: greedy order")


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
    """(n, n) float32: cosine similarity of the rows (normalised in their own dtype, then
    float32, as the official code) weighted by relevance on both sides."""
    xn = (features / features.norm(dim=-1, keepdim=True)).float()
    s = torch.matmul(xn[None], xn[None].transpose(1, 2))[0]
    if relevance is None:
        return s
    r = relevance.float()
    return r[:, None] * s * r[None, :]


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) picks in greedy order, as the official loop (a batch of one: the same einsum);
    argmax takes the lowest index on exact ties. A residual that reaches 0 or below (the kernel's
    rank is exhausted: duplicates) is clamped to the smallest positive float, so the loop keeps
    picking distinct tokens instead of the official NaN-driven picks. No host sync."""
    n = kernel.shape[0]
    kern = kernel[None]
    batch = torch.arange(1, device=kernel.device)
    d = torch.diagonal(kern, dim1=1, dim2=2).clone()  # (1, n)
    cis = torch.zeros((k, 1, n), dtype=kern.dtype, device=kernel.device)
    picks = torch.empty((k, 1), dtype=torch.long, device=kernel.device)
    tiny = torch.finfo(kern.dtype).tiny
    for i in range(k):
        j = torch.argmax(d, dim=-1)
        picks[i] = j
        gain = d[batch, j].clamp_min(tiny)
        e = (kern[batch, j] - torch.einsum("tb,tbn->bn", cis[:i, batch, j], cis[:i])) / torch.sqrt(gain).unsqueeze(-1)
        cis[i, :, :] = e
        d -= torch.square(e)
        d[batch, j] = -float("inf")
    return picks[:, 0]


@register
class DppMap(Node[DppParams]):
    """Keep k tokens by greedy MAP inference of a DPP whose kernel is the features' cosine
    similarity weighted by a relevance on both sides (CDPruner's conditional DPP): diverse
    tokens that matter to the instruction. Without `relevance`, a plain diversity DPP."""

    type_name = "selector.dpp-map"
    paper = "https://arxiv.org/abs/2506.10967"
    outputs = {"selection": Port(Selection, "the k picked tokens")}

    def run(self, ctx,
            features: Annotated[Tokens, "the similarity features (CDPruner: the projected visual tokens)"],
            relevance: Annotated[Scores | None, "per-token quality weights (scorer.instruction-relevance)"] = None):
        n = features.values.shape[0]
        k = self.params.k
        if k > n:
            raise BudgetError(k, n, what="candidate tokens", advice=f"lower the budget (at most {n})")
        r = None
        if relevance is not None:
            r = relevance.values[gather_scores(relevance, features.ids.to(relevance.ids.device))]
        picks = greedy_dpp(dpp_kernel(features.values, r), k)
        ids = features.ids[picks.to(features.ids.device)]
        if self.params.order == "index":
            ids = torch.sort(ids).values
        return {"selection": Selection(ids)}
