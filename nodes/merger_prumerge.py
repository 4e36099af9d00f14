"""PruMerge+'s merge (ICCV'25; 42Shawn/LLaVA-PruMerge @ 097c0411).

For each kept token i (in selection order): among all other tokens (the other kept ones in
selection order, then the dropped ones ascending) take the `neighbours` whose keys are most
cosine-similar to i's key, and add their features weighted by their CLS attention:
x_i + sum_j a_j x_j (not normalised, as the official code). One extra token, the
CLS-attention-weighted sum of every dropped token, is appended last (id POOLED_ID = -2).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import POOLED_ID, Scores, Selection, Tokens

from .selectors import gather_scores
from .signal_vision import grid_rows


class PruMergeParams(NodeParams):
    neighbours: int = Field(32, ge=1, description="most key-similar tokens merged into each kept token (official: 32)")
    extra_token: bool = Field(True, description="append the attention-weighted sum of the dropped tokens")


@register
class PruMergePlusMerger(Node[PruMergeParams]):
    """PruMerge(+): kept tokens absorb their key-nearest neighbours, weighted by CLS attention."""

    type_name = "merger.prumerge"
    paper = "https://arxiv.org/abs/2403.15388"
    outputs = {
        "tokens": Port(Tokens, "merged kept tokens, then the extra token; space vision"),
        "selection": Port(Selection, "their ids in the same order (extra token: -2)"),
    }

    def run(self, ctx,
            selection: Annotated[Selection, "kept tokens, in the order they will sit (official: topk, then supplement)"],
            scores: Annotated[Scores, "CLS attention per token (the merge weights)"],
            features: Annotated[Tokens, "features merged, whole grid (LLaVA: signal.vision-hidden, -2)"],
            keys: Annotated[Tokens, "key per patch, whole grid (signal.vision-key-single-head, -1)"]):
        p = self.params
        n = features.values.shape[0]
        hidden = grid_rows(features, n, "features")  # (n, d)
        key_rows = grid_rows(keys, n, "keys")
        attn = scores.values[gather_scores(scores, torch.arange(n, device=scores.ids.device))]
        kept = selection.ids
        if torch.unique(kept).numel() != kept.numel():
            raise ValueError("PruMerge: the selection names a token twice")
        mask = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        mask[kept] = True
        dropped = torch.nonzero(~mask).reshape(-1)  # ascending, as complement_idx
        L = kept.numel()
        if L - 1 + dropped.numel() < p.neighbours:
            raise ValueError(f"PruMerge: {L - 1 + dropped.numel()} other tokens for {p.neighbours} neighbours "
                             "(the official topk fails here); lower `neighbours`")
        x_kept, a_kept = hidden[kept], attn[kept]
        k_kept = F.normalize(key_rows[kept], p=2, dim=-1)
        x_drop, a_drop = hidden[dropped], attn[dropped]
        k_drop = F.normalize(key_rows[dropped], p=2, dim=-1)
        out = torch.zeros_like(x_kept)
        for i in range(L):
            rest_k = torch.cat([k_kept[:i], k_kept[i + 1:], k_drop])
            rest_x = torch.cat([x_kept[:i], x_kept[i + 1:], x_drop])
            rest_a = torch.cat([a_kept[:i], a_kept[i + 1:], a_drop])
            # (1, 1, c) x (1, c, m) as the official bmm, so near-equal similarities tie alike
            cos = torch.bmm(k_kept[None, i:i + 1], rest_k[None].transpose(1, 2))
            nb = torch.topk(cos, k=p.neighbours, dim=2).indices[0, 0]
            out[i] = x_kept[i] + torch.sum(rest_x[nb] * rest_a[nb].unsqueeze(-1), dim=0)
        ids = kept.clone()
        if p.extra_token:
            extra = torch.sum(x_drop * a_drop.unsqueeze(-1), dim=0, keepdim=True)
            out = torch.cat([out, extra])
            ids = torch.cat([ids, torch.tensor([POOLED_ID], device=ids.device)])
        return {"tokens": Tokens(out, ids, "vision"), "selection": Selection(ids)}
