"""Unit checks of the LLM-side nodes: scorer reductions, count rules, DPC-KNN, v2 correction."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from nuwa_graph.context import SampleContext
from nuwa_graph.errors import PipelineError
from nuwa_graph.nodes.scorer_llm import LLMAttentionScores
from nuwa_graph.nodes.selectors_llm import TopKInt, count_for
from nuwa_graph.nodes.sparsevlm import SparseVLMRaters, dpc_knn_merge, rope_ones_pattern, select_raters
from nuwa_graph.pipeline import load_text
from nuwa_graph.types import Geometry, Scores


def ctx_with(signals: dict, present=None, grid=(4, 4)):
    geo = Geometry(grid, image_start=5)
    pres = torch.arange(geo.n_tokens) if present is None else present

    def reader(req, b):
        return signals[req.kind]

    return SampleContext(sample=0, geometry=geo, present=pres, reader=reader, node_name="n")


def test_llm_attention_interface_and_defaults():
    node = LLMAttentionScores("a", {"layer": 1})
    assert str(node.site()) == "llm.2"
    req = node.requests()[0]
    assert req.kind == "llm.attention" and req.site == "llm.2"
    assert dict(req.args) == {"layer": 1, "queries": "last", "rope": True, "softmax_over": "all"}
    same = LLMAttentionScores("a", {"layer": 2, "site": "llm.2"})  # PDrop: layer == K
    assert same.check() == []
    assert LLMAttentionScores("a", {"layer": 3, "site": "llm.2"}).check()
    for q in ("last", "last:3", "text"):
        LLMAttentionScores("a", {"layer": 1, "queries": q})
    for bad in ("last:0", "first", "last:"):
        with pytest.raises(ValidationError, match="queries must be 'last'"):
            LLMAttentionScores("a", {"layer": 1, "queries": bad})
    with pytest.raises(ValidationError, match="site must be an LLM site"):
        LLMAttentionScores("a", {"layer": 1, "site": "vision"})


def test_llm_attention_reductions():
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(4, 3, 16, generator=g)
    present = torch.arange(16).flip(0)
    for heads, qr, order, want in [
        ("mean", "mean", "heads-first", rows.mean(0).mean(0)),
        ("sum", "sum", "heads-first", rows.sum(0).sum(0)),
        ("max", "mean", "heads-first", rows.max(0).values.mean(0)),
        ("max", "mean", "queries-first", rows.mean(1).max(0).values),
    ]:
        node = LLMAttentionScores("a", {"layer": 1, "queries": "last:3", "heads": heads, "query_reduce": qr,
                                        "reduce_order": order})
        out = node.run(ctx_with({"llm.attention": rows}, present))["scores"]
        assert torch.allclose(out.values, want) and torch.equal(out.ids, present)
    with pytest.raises(ValueError):
        LLMAttentionScores("a", {"layer": 1}).run(ctx_with({"llm.attention": rows[:, :, :5]}))


def test_top_k_int_count_rules():
    assert count_for(576, 576, None, 1 - 0.7, "present", False) == 172
    assert count_for(576, 576, None, 1 - 0.777, "present", False) == int(576 * (1 - 0.777)) == 128
    assert count_for(57, 576, None, 0.05, "grid", False) == 28  # PDrop: 576 * ratio at every stage
    assert count_for(10, 576, 30, None, "present", True) == 9  # SparseVLM: min(k, n - 1)
    sc = Scores(torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([7, 3, 9, 1]))
    for order, want in [("score", [3, 1]), ("index", [1, 3]), ("stream", [3, 1])]:
        node = TopKInt("s", {"k": 2, "order": order})
        assert node.run(ctx_with({}), scores=sc)["selection"].ids.tolist() == want
    with pytest.raises(ValidationError, match="exactly one of 'k' or 'ratio'"):
        TopKInt("s", {"k": 2, "ratio": 0.5})


def _official_style_dpc(x, k, noise):
    """Independent restatement of the official DPC-KNN steps (batch of one)."""
    n, c = x.shape
    d = torch.cdist(x.double(), x.double()) / c ** 0.5
    dens = (-(d.topk(k, largest=False).values ** 2).mean(-1)).exp() + noise.double() * 1e-6
    parent = torch.where(dens[None, :] > dens[:, None], d, d.max()).min(-1).values
    centres = (parent * dens).topk(k).indices
    assign = d[centres].argmin(0)
    assign[centres] = torch.arange(k)
    merged = torch.stack([x[assign == j].double().mean(0) for j in range(k)])
    return merged.float(), centres


def test_dpc_knn_matches_restatement():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    noise = torch.rand(40, generator=g)
    merged, centres = dpc_knn_merge(x, 5, noise)
    want, wc = _official_style_dpc(x, 5, noise)
    assert torch.equal(centres, wc)
    assert torch.allclose(merged, want, atol=1e-5)


def test_dpc_knn_index_tie_break_is_deterministic():
    x = torch.zeros(6, 4)
    x[3:] = 1.0  # two groups of identical tokens: every density ties within a group
    m1, c1 = dpc_knn_merge(x, 2, None, "index")
    m2, c2 = dpc_knn_merge(x, 2, None, "index")
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    assert sorted(c1.tolist()) == [0, 3]  # the earliest token of each group becomes the centre
    assert torch.allclose(torch.sort(m1[:, 0]).values, torch.tensor([0.0, 1.0]), atol=1e-5)


def test_rope_ones_pattern_equals_rotated_ones():
    hd, base = 8, 10000.0
    pos_q, pos_k = torch.tensor([40, 41, 45]), torch.tensor([5, 6, 9, 20])

    def rot(p):
        inv = 1.0 / (base ** (torch.arange(0, hd, 2).double() / hd))
        emb = torch.cat([torch.outer(p.double(), inv)] * 2, -1)
        x = torch.ones(len(p), hd, dtype=torch.float64)
        half = torch.cat([-x[:, hd // 2:], x[:, : hd // 2]], -1)
        return x * emb.cos() + half * emb.sin()

    want = rot(pos_q) @ rot(pos_k).T / math.sqrt(hd)
    assert torch.allclose(rope_ones_pattern(pos_q, pos_k, hd, base), want, atol=1e-12)


def test_sparsevlm_raters_v2_options():
    g = torch.Generator().manual_seed(2)
    vis, txt = torch.randn(16, 8, generator=g), torch.randn(6, 8, generator=g)
    rows = torch.rand(4, 6, 16, generator=g)
    raters = select_raters(vis, txt)
    sig = {"pre_llm.visual": vis, "pre_llm.text": txt, "llm.attention": rows}
    base = SparseVLMRaters("r", {"layer": 2}).run(ctx_with(sig))["scores"].values
    assert torch.allclose(base, rows[:, raters].mean(0).mean(0))
    top = SparseVLMRaters("r", {"layer": 2, "top_heads": 2}).run(ctx_with(sig))["scores"].values
    heads = rows[:, raters].sum((1, 2)).topk(2).indices
    assert torch.allclose(top, rows[heads][:, raters].mean(0).mean(0))
    node = SparseVLMRaters("r", {"layer": 2, "rope_correction": {"head_dim": 8, "base": 10000}})
    corr = node.run(ctx_with(sig))["scores"].values
    pat = rope_ones_pattern(torch.arange(6) + 5 + 16, torch.arange(16) + 5, 8, 10000.0).float()
    assert torch.allclose(corr, (rows / pat)[:, raters].mean(0).mean(0))


def test_sparsevlm_recycle_multistage_ids_unique():
    """Merged tokens carry a pruned token's id: ids stay unique over three stages."""
    from nuwa_graph.pipeline import load
    from tests.test_golden_llm import PIPES, random_reader, run_pipeline  # noqa: E402

    pipe = load(PIPES / "sparsevlm.yaml", {"budget": 128})
    _, state = run_pipeline(pipe, random_reader(3))
    for act in state.actions[0]:
        assert act.ids.unique().numel() == act.ids.numel()
        assert act.tokens is not None and act.tokens.values.shape[0] == act.ids.numel()
        assert act.positions.policy == "perc"


def test_sparsevlm_reject_bad_site():
    with pytest.raises(PipelineError):
        load_text("name: x\nnodes:\n  - {name: r, type: scorer.sparsevlm-raters, params: {layer: 4, site: llm.3}}\n")


@pytest.mark.parametrize("name,sets,counts", [
    ("fastv", ["budget=144"], "64 16 16 16"),  # K = scale32(2) = 1 on 4 layers
    ("fastv", ["budget=144", "K=2"], "64 64 16 16"),  # a --set layer is exact
    ("pdrop", [], "64 6 3 1"),  # layers = scale32([2, 10, 20]) = [1, 2, 3]
    ("sparsevlm", [], "64 9 4 2"),  # layers [0, 1, 2]; k 66/30/17 * 64 // 576 = 7/3/1, + recycled
    ("sparsevlm_v2", [], "64 7 3 2"),
    ("feather", [], "64 16 0 0"),  # K = scale32([8, 16]) = [1, 2]
    ("feather", ["K=[2,3]"], "64 64 16 0"),
])
def test_llm_pipelines_run_on_embedded_model(name, sets, counts):
    """End to end on the tiny 4-layer LLaVA (8x8 grid): the 32-layer schedules follow its depth."""
    from typer.testing import CliRunner

    from nuwa_graph.apps import cli
    from tests.test_golden_llm import PIPES

    args = ["run", str(PIPES / f"{name}.yaml"), "--model", "tiny-llava"]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert counts in " ".join(r.output.split())


@pytest.mark.parametrize("n,c", [(154, 1024), (37, 4096), (9, 8)])
def test_pairwise_dist_blocks_are_bit_identical(n, c):
    """Any row-block size gives the official difference-then-norm distances bit for bit."""
    from nuwa_graph.nodes.sparsevlm import _pairwise_dist

    x = torch.randn(n, c, generator=torch.Generator().manual_seed(n))
    full = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2)  # the official one-shot form
    for chunk in (None, 1, 3, 64, n):
        assert torch.equal(_pairwise_dist(x, chunk), full)
