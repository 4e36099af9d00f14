"""merger.prumerge's blocked neighbour search equals the official per-token loop bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nuwa_graph.nodes.merger_prumerge as pm
from nuwa_graph.types import POOLED_ID, Scores, Selection, Tokens


def loop_reference(hidden, attn, keys, kept, neighbours):
    """The official loop restated: per kept token, cat the others, (1,1,c) x (1,c,m) bmm, topk."""
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool)
    mask[kept] = True
    dropped = torch.nonzero(~mask).reshape(-1)
    x_kept, a_kept, k_kept = hidden[kept], attn[kept], F.normalize(keys[kept], p=2, dim=-1)
    x_drop, a_drop, k_drop = hidden[dropped], attn[dropped], F.normalize(keys[dropped], p=2, dim=-1)
    out = torch.zeros_like(x_kept)
    for i in range(kept.numel()):
        rest_k = torch.cat([k_kept[:i], k_kept[i + 1:], k_drop])
        rest_x = torch.cat([x_kept[:i], x_kept[i + 1:], x_drop])
        rest_a = torch.cat([a_kept[:i], a_kept[i + 1:], a_drop])
        cos = torch.bmm(k_kept[None, i:i + 1], rest_k[None].transpose(1, 2))
        nb = torch.topk(cos, k=neighbours, dim=2).indices[0, 0]
        out[i] = x_kept[i] + torch.sum(rest_x[nb] * rest_a[nb].unsqueeze(-1), dim=0)
    extra = torch.sum(x_drop * a_drop.unsqueeze(-1), dim=0, keepdim=True)
    return torch.cat([out, extra])


def _inputs(seed, n, c, n_kept, tied):
    g = torch.Generator().manual_seed(seed)
    hidden, attn = torch.randn(n, c, generator=g), torch.rand(n, generator=g)
    if tied:  # six distinct keys: every similarity ties with many others
        keys = torch.randn(6, c, generator=g)[torch.randint(0, 6, (n,), generator=g)]
    else:
        keys = torch.randn(n, c, generator=g)
    return hidden, attn, keys, torch.randperm(n, generator=g)[:n_kept]


@pytest.mark.parametrize("seed,n,c,n_kept,tied,block", [
    (0, 576, 64, 576, False, None),  # PruMerge+ keeping everything (as on random weights)
    (1, 576, 64, 100, True, None),
    (2, 200, 32, 40, False, 1),  # one row per block
    (3, 200, 32, 199, True, 7),  # blocks that do not divide the kept count
    (4, 100, 96, 50, False, 10 ** 9),  # one block for all
])
def test_blocked_merge_equals_the_loop(monkeypatch, seed, n, c, n_kept, tied, block):
    hidden, attn, keys, kept = _inputs(seed, n, c, n_kept, tied)
    if block is not None:
        monkeypatch.setattr(pm, "_block_rows", lambda n, k_all: block)
    node = pm.PruMergePlusMerger("m", {"neighbours": 32})
    grid = torch.arange(n)
    out = node.run(None, selection=Selection(kept), scores=Scores(attn, grid),
                   features=Tokens(hidden, grid, "vision"), keys=Tokens(keys, grid, "vision"))
    want = loop_reference(hidden, attn, keys, kept, 32)
    assert torch.equal(out["tokens"].values, want)
    assert torch.equal(out["selection"].ids, torch.cat([kept, torch.tensor([POOLED_ID])]))
