"""The baselines' nodes as general operations (issue 22): each on plain tensors, with inputs no
golden file covers (other grids, other features, degenerate cases, errors)."""

from __future__ import annotations

import pytest
import torch

from nuwa_graph import Executor, load_text
from nuwa_graph.context import SampleContext
from nuwa_graph.errors import BudgetError
from nuwa_graph.nodes.scorer_graph import GraphPropagation
from nuwa_graph.nodes.selector_diversity import BipartiteDedup, GreedyMaxMin
from nuwa_graph.nodes.selector_dpp import DppMap
from nuwa_graph.nodes.selector_pivots import PivotDissimilarity
from nuwa_graph.nodes.selector_spatial import Neighbours
from nuwa_graph.nodes.selectors import TopK
from nuwa_graph.types import TEXT_ID_BASE, Geometry, Scores, Selection, Tokens, text_ids


def ctx(grid=(4, 5), start=10):
    g = Geometry(grid, image_start=start)
    return SampleContext(sample=0, geometry=g, present=torch.arange(g.n_tokens))


def feats(n=20, d=6, seed=0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return Tokens(x, torch.arange(n), "llm")


def test_neighbours_flat_wraps_and_clamps_grid_does_not():
    c = ctx((4, 5))
    flat = Neighbours("n", {"mode": "flat"}).run(c, Selection(torch.tensor([0, 9])))["selection"].ids
    assert flat.tolist() == [0, 1, 4, 5, 8, 9, 10, 14]  # 9 - 1 = 8, 9 + 1 = 10 wraps; 0 - 1 clamps to 0
    grid = Neighbours("n", {"mode": "grid"}).run(c, Selection(torch.tensor([0, 9])))["selection"].ids
    assert grid.tolist() == [0, 1, 4, 5, 8, 9, 14]  # no wrap to 10, no clamp
    alone = Neighbours("n", {"mode": "grid", "include": False}).run(c, Selection(torch.tensor([6])))["selection"].ids
    assert alone.tolist() == [1, 5, 7, 11]


def test_top_k_exclude_fill_share_and_argsort():
    c = ctx((4, 5))
    s = Scores(torch.arange(20.0), torch.arange(20))
    ex = Selection(torch.tensor([19, 18]))
    assert TopK("t", {"k": 5, "fill": True, "order": "score"}).run(c, s, exclude=ex)["selection"].ids.tolist() == \
        [17, 16, 15]
    assert TopK("t", {"k": 3, "order": "score"}).run(c, s, exclude=ex)["selection"].ids.tolist() == [17, 16, 15]
    assert TopK("t", {"k": 64, "share": 0.02}).run(c, s)["selection"].ids.numel() == 1  # round(1.28)
    assert TopK("t", {"k": 25, "share": 0.02}).run(c, s)["selection"].ids.numel() == 0  # round(0.5) = 0
    ties = Scores(torch.zeros(20), torch.arange(20))
    a = TopK("t", {"k": 4, "method": "argsort", "order": "score"}).run(c, ties)["selection"].ids
    assert torch.equal(a, torch.argsort(torch.zeros(1, 20), dim=-1, descending=True)[0, :4])
    with pytest.raises(BudgetError):
        TopK("t", {"k": 19}).run(c, s, exclude=ex)


def test_greedy_max_min_is_diverse_and_any_features_work():
    x = feats(30, 8)
    sel = GreedyMaxMin("g", {"k": 6, "order": "pick"}).run(ctx((5, 6)), x)["selection"].ids
    assert sel.unique().numel() == 6
    dup = Tokens(torch.cat([x.values[:3]] * 4), torch.arange(12), "vision")
    picked = GreedyMaxMin("g", {"k": 3}).run(ctx((3, 4)), dup)["selection"].ids
    assert sorted(int(i) % 3 for i in picked) == [0, 1, 2]  # one of each distinct token
    with pytest.raises(BudgetError):
        GreedyMaxMin("g", {"k": 31}).run(ctx((5, 6)), x)


def test_bipartite_dedup_drops_duplicates_first():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    x = Tokens(torch.cat([base, base[:2] + 1e-4]), torch.arange(8), "vision")  # tokens 6, 7 near 0, 1
    scores = Scores(torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]), torch.arange(8))
    out = BipartiteDedup("d", {"k": 6, "step": 2, "order": "index"}).run(ctx((2, 4)), scores, x)["selection"].ids
    assert out.numel() == 6 and not ({0, 6} <= set(out.tolist()) and {1, 7} <= set(out.tolist()))
    odd = BipartiteDedup("d", {"k": 2, "step": 8}).run(ctx((2, 4)), scores, x, Selection(torch.tensor([0])))
    assert odd["selection"].ids.numel() == 2 and 0 not in odd["selection"].ids.tolist()


def test_dpp_without_relevance_is_a_diversity_selector():
    base = torch.eye(4)
    x = Tokens(torch.cat([base, base + 0.01]), torch.arange(8), "llm")
    out = DppMap("p", {"k": 4, "order": "index"}).run(ctx((2, 4)), x)["selection"].ids
    assert sorted(int(i) % 4 for i in out) == [0, 1, 2, 3]  # one of each direction, never both twins


def test_graph_propagation_scores_every_token():
    x = feats(24, 5)
    out = GraphPropagation("g", {}).run(ctx((4, 6)), x)["scores"]
    assert out.values.shape == (24,) and torch.isfinite(out.values).all() and torch.equal(out.ids, x.ids)


def test_pivot_dissimilarity_with_text_pivots_and_given_order():
    x = feats(20, 6, seed=4)
    text = Tokens(torch.randn(3, 6, generator=torch.Generator().manual_seed(5)), text_ids(3), "llm")
    node = PivotDissimilarity("p", {"per_pivot": 2, "visit": "given", "order": "pick"})
    out = node.run(ctx((4, 5)), x, Selection(torch.tensor([3, 7])), Selection(text_ids(1) + 2), text)["selection"]
    ids = out.ids.tolist()
    assert ids[:2] == [3, 7] and len(ids) == 2 + 3 * 2 and len(set(ids)) == len(ids)
    assert all(i >= 0 for i in ids)  # text pivots condition the picks but are never kept
    cos = torch.nn.functional.cosine_similarity(x.values[3], x.values, dim=-1)
    cos[[3, 7]] = float("inf")
    assert set(ids[2:4]) == set(torch.topk(-cos, 2).indices.tolist())  # the first pivot's least similar
    with pytest.raises(ValueError, match="not among the candidate"):
        node.run(ctx((4, 5)), x, Selection(torch.tensor([25])))
    assert TEXT_ID_BASE + 2 == int((text_ids(1) + 2)[0])


def test_withdraw_removes_every_visual_token_at_its_layer():
    pipe = load_text("name: w\nnodes:\n  - {name: w, type: applier.withdraw, params: {site: llm.3}}\n")
    state = Executor(pipe).run_all([Geometry((4, 4))])
    (keep,) = state.actions[0]
    assert keep.site == "llm.3" and keep.ids.numel() == 0
    with pytest.raises(Exception, match="llm"):
        load_text("name: w\nnodes:\n  - {name: w, type: applier.withdraw, params: {site: vision}}\n")
