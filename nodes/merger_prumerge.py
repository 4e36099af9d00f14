"""PruMerge+'s merge (ICCV'25; 42Shawn/LLaVA-PruMerge @ 097c0411).

For each kept token i (in selection order): among all other tokens (the other kept ones in
selection order, then the dropped ones ascending) take the `neighbours` whose keys are most
cosine-similar to i's key, and add their features weighted by their CLS attention:
x_i + sum_j a_j x_j (not normalised, as the official code). One extra token, the
CLS-attention-weighted sum of every dropped token, is appended last (id POOLED_ID = -2).

The per-token loop runs as blocks of kept tokens, bit-exact with it (see `_neighbours`).
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

# Elements of one block's candidate keys (B, n - 1, c): cache-sized on a CPU, where the
# block is memory-bound; larger elsewhere, where the count of kernel launches dominates.
_CPU_BLOCK_ELEMS = 1 << 20
_BLOCK_ELEMS_ELSEWHERE = 1 << 26


def _block_rows(n: int, k_all: torch.Tensor) -> int:
    budget = _CPU_BLOCK_ELEMS if k_all.device.type == "cpu" else _BLOCK_ELEMS_ELSEWHERE
    return max(1, budget // max(1, (n - 1) * k_all.shape[1]))


def _rest_index(start: int, stop: int, n: int, device: torch.device) -> torch.Tensor:
    """(stop - start, n - 1): for kept token i, every other row in candidate order (i skipped)."""
    cols = torch.arange(n - 1, device=device)
    rows = torch.arange(start, stop, device=device)
    return cols[None, :] + (cols[None, :] >= rows[:, None])


def _neighbours(k_rows: torch.Tensor, k_all: torch.Tensor, rest: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k cosine neighbours of each row of k_rows among its `rest` rows (indices into rest).

    Each row's candidate keys are materialised (B, n - 1, c) and multiplied as one
    (1, c) x (c, n - 1) product per row, as the official per-token bmm: the GEMM's rounding
    depends on the column count and layout (one product over all n keys, or k k^T, differs
    in the last bits, which flips near-ties), so this copy is what keeps the neighbours
    bit-exact; batching the rows is what saves the per-token loop."""
    cand = k_all.index_select(0, rest.reshape(-1)).view(rest.shape[0], rest.shape[1], k_all.shape[1])
    cos = torch.bmm(k_rows[:, None, :], cand.transpose(1, 2))
    return torch.topk(cos, k=k, dim=2).indices[:, 0, :]


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
        order = torch.cat([kept, dropped])  # row r of these: the official candidate order
        x_all, a_all = hidden[order], attn[order]
        k_all = F.normalize(key_rows[order], p=2, dim=-1)
        out = torch.empty_like(x_all[:L])
        step = _block_rows(n, k_all)
        for start in range(0, L, step):  # a block of kept tokens at a time (all at once on a GPU)
            stop = min(L, start + step)
            rest = _rest_index(start, stop, n, order.device)  # (B, n - 1) rows of *_all
            nb = rest.gather(1, _neighbours(k_all[start:stop], k_all, rest, p.neighbours))
            out[start:stop] = x_all[start:stop] + torch.sum(x_all[nb] * a_all[nb].unsqueeze(-1), dim=1)
        x_drop, a_drop = x_all[L:], a_all[L:]
        ids = kept.clone()
        if p.extra_token:
            extra = torch.sum(x_drop * a_drop.unsqueeze(-1), dim=0, keepdim=True)
            out = torch.cat([out, extra])
            ids = torch.cat([ids, torch.tensor([POOLED_ID], device=ids.device)])
        return {"tokens": Tokens(out, ids, "vision"), "selection": Selection(ids)}
