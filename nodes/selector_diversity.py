"""Diversity selectors: keep tokens that differ from each other, from any features.

- `selector.greedy-max-min`: greedy max-min (farthest point) selection under cosine distance
  (DivPrune, CVPR'25; vbdi/divprune @ 799e2d95, LLaVA/llava/model/llava_arch.py:147-171).
- `selector.bipartite-dedup`: iterative bipartite de-duplication of a ranked list (VisPruner,
  ICCV'25; Theia-4869/VisPruner @ aefa01ad, llava/model/llava_arch.py:161-176).

Both take any `Tokens` (projected tokens, vision hidden states, ...) and work in float32 on
the features' device; the official runs are float16 on a GPU, where near-equal distances can
order differently.
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

_TINY = 1e-30  # a zero feature row is normalised to zero (no NaN), every other row exactly as x / ||x||


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (no eps, as the official codes; a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


class GreedyMaxMinParams(NodeParams):
    k: int = Field(ge=1, description="tokens to keep")
    repeat: bool = Field(False, description="the official loop: picked tokens stay candidates, so on duplicated or "
                         "constant features the same token can be picked again (duplicate rows reach the LLM); "
                         "false: a token is picked at most once (identical whenever the picks are distinct)")
    order: Literal["index", "pick"] = Field("index", description="index: ascending ids; pick: greedy order")


def greedy_max_min(dist: torch.Tensor, k: int, repeat: bool = False, inplace: bool = False) -> torch.Tensor:
    """Picks (k,) of DivPrune's greedy loop on a distance matrix (n, n): the seed is the
    column whose second-smallest entry is largest (the most isolated token); each later pick
    is the argmax (first index on ties) of the column-wise minimum over the picked rows. The
    running minimum equals the official `min(dist[picked], dim=0)` exactly. Without `repeat`
    the diagonal is set to -inf after the seed, so a picked token's running minimum is -inf
    and it is never picked again (the same picks whenever the official ones are distinct).
    `inplace` lets the loop overwrite `dist`. No host sync."""
    n = dist.shape[0]
    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    if n >= 2:
        seed = torch.argmax(torch.topk(dist, 2, dim=0, largest=False).values[1, :])
    else:
        seed = torch.zeros((), dtype=torch.long, device=dist.device)
    if not repeat:
        dist = dist if inplace else dist.clone()
        dist.fill_diagonal_(float("-inf"))
    picks[0] = seed
    cur = dist[seed].clone()
    for i in range(1, k):
        j = torch.argmax(cur)
        picks[i] = j
        torch.minimum(cur, dist[j], out=cur)
    return picks


@register
class GreedyMaxMin(Node[GreedyMaxMinParams]):
    """Keep k tokens that are as different from each other as possible (DivPrune's max-min
    diversity): distance = 1 - cosine of the given features (one `mm` of the L2-normalised
    rows, as the official code), seed = the most isolated token, then repeatedly the token
    farthest from the picked set."""

    type_name = "selector.greedy-max-min"
    paper = "https://arxiv.org/abs/2503.02175"
    outputs = {"selection": Port(Selection, "the k picked tokens")}

    def run(self, ctx, features: Annotated[Tokens, "one feature row per candidate token (DivPrune: the projected "
                                                   "visual tokens, signal.pre-llm-visual)"]):
        n = features.values.shape[0]
        k = self.params.k
        if k > n and not self.params.repeat:
            raise BudgetError(k, n, what="candidate tokens", advice=f"lower the budget (at most {n})")
        x = unit_rows(features.values.float())
        picks = greedy_max_min(1.0 - torch.mm(x, x.t()), k, self.params.repeat, inplace=True)
        ids = features.ids[picks.to(features.ids.device)]
        if self.params.order == "index":
            ids = torch.sort(ids).values
        return {"selection": Selection(ids)}


class BipartiteDedupParams(NodeParams):
    k: int = Field(ge=1, description="tokens left after de-duplication (VisPruner: T - int(T * important_ratio))")
    step: int = Field(8, ge=1, description="tokens removed per round at most (the official 8)")
    order: Literal["loop", "index"] = Field("loop", description="loop: the order the rounds leave the list in; "
                                            "index: ascending ids")
    similarity: Literal["per-round", "gram"] = Field(
        "per-round", description="per-round: each round's (R/2 x R/2) product, as the official code (O(rounds R^2 d)); "
        "gram: one n x n Gram matrix, gathered per round (O(n^2 d); the same cosines up to float rounding)")


def bipartite_dedup(x: torch.Tensor, order: torch.Tensor, k: int, step: int, gram: bool = False) -> torch.Tensor:
    """VisPruner's de-duplication of the ranked list `order` (positions into x's unit rows):
    while it is longer than k, split it by position (even entries a, odd entries b), score
    each a by its largest cosine to any b, drop the min(step, R - k) highest-scoring a (the
    most duplicated) and continue with [surviving a in descending-score order] + [b]. An odd
    list gives a one more entry (the official code crashes there: shape mismatch). `gram`: the
    cosines come from one Gram matrix of x instead of each round's product."""
    g = x @ x.t() if gram else None
    cur = order
    while cur.numel() > k:
        r = min(step, cur.numel() - k, (cur.numel() + 1) // 2)
        a, b = cur[0::2], cur[1::2]
        if b.numel() == 0:
            return cur[:k]
        if g is not None:
            sim = g[a[:, None], b[None, :]]
        else:  # (R//2, R//2) as the official batched product
            sim = torch.bmm(x[a][None], x[b][None].transpose(1, 2))[0]
        distinct = torch.argsort(sim.max(dim=-1).values[None], dim=-1, descending=True)[0, r:]
        cur = torch.cat([a[distinct], b])
    return cur


@register
class BipartiteDedup(Node[BipartiteDedupParams]):
    """Remove near-duplicate tokens from a ranked list until k remain (VisPruner's diverse
    tokens): the list starts as the tokens in descending score order (a descending
    torch.argsort, as the official code) without the `exclude` tokens; each round removes up
    to `step` tokens of the even positions whose best cosine to an odd-position token is the
    highest (ToMe-style bipartite matching, by list position, not space)."""

    type_name = "selector.bipartite-dedup"
    paper = "https://arxiv.org/abs/2412.01818"
    outputs = {"selection": Port(Selection, "the k tokens left")}

    def run(self, ctx,
            scores: Annotated[Scores, "ranks the candidates (VisPruner: the CLS attention averaged over heads)"],
            features: Annotated[Tokens, "features compared (VisPruner: hidden_states[-2], before the projector)"],
            exclude: Annotated[Selection | None, "tokens not in the list (VisPruner: the important tokens)"] = None):
        p = self.params
        ranked = scores.ids[torch.argsort(scores.values[None], dim=-1, descending=True)[0]]
        if exclude is not None:
            ranked = ranked[~torch.isin(ranked, exclude.ids.to(ranked.device))]
        if p.k > ranked.numel():
            raise BudgetError(p.k, int(ranked.numel()), param="k", what="candidate tokens",
                              advice="lower the budget or the important share")
        rows = gather_scores(Scores(torch.zeros(features.ids.shape, device=features.ids.device), features.ids), ranked)
        x = unit_rows(features.values.float())
        kept = bipartite_dedup(x, rows.to(x.device), p.k, p.step, gram=p.similarity == "gram")
        ids = features.ids[kept.to(features.ids.device)]
        if p.order == "index":
            ids = torch.sort(ids).values
        return {"selection": Selection(ids)}
