"""Property tests of the pure (model-free) nodes."""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from nuwa_graph import Executor, RunError, load_text, registry
from nuwa_graph.context import SampleContext
from nuwa_graph.types import Geometry, Scores, Selection
from tests._golden import GOLDEN, MISSING  # noqa: E402

FAST = settings(max_examples=60, deadline=None)


def make(type_name: str, name: str = "node", **params):
    return registry.get(type_name)(name, params)


def ctx(grid=(6, 6), present=None, seed=0, name="node", sample=0, image_start=0) -> SampleContext:
    geo = Geometry(grid, image_start=image_start)
    if present is None:
        present = torch.arange(geo.n_tokens)
    return SampleContext(sample=sample, geometry=geo, present=present, seed=seed, node_name=name)


@st.composite
def scored_subset(draw, max_side=8):
    """A grid, a random subset of its tokens (in random order) and a score per token."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    n = h * w
    ids = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=len(ids), max_size=len(ids)))
    return (h, w), Scores(torch.tensor(values, dtype=torch.float32), torch.tensor(ids, dtype=torch.long))


# --- selector.top-k -------------------------------------------------------------------------
@FAST
@given(scored_subset(), st.data())
def test_top_k(case, data):
    grid, scores = case
    n = scores.ids.numel()
    k = data.draw(st.integers(1, n))  # k=0 is refused: a budget keeps at least one token
    order = data.draw(st.sampled_from(["index", "score"]))
    sel = make("selector.top-k", k=k, order=order).run(ctx(grid), scores=scores)["selection"]
    ids = sel.ids.tolist()
    assert len(ids) == k
    assert len(set(ids)) == k and set(ids) <= set(scores.ids.tolist())
    value = dict(zip(scores.ids.tolist(), scores.values.tolist()))
    if order == "index":
        assert ids == sorted(ids)
    else:
        assert [value[i] for i in ids] == sorted((value[i] for i in ids), reverse=True)
    dropped = set(scores.ids.tolist()) - set(ids)
    if ids and dropped:  # every kept token scores at least as high as every dropped one
        assert min(value[i] for i in ids) >= max(value[i] for i in dropped)


def test_top_k_larger_than_tokens_is_a_clear_error():
    scores = Scores(torch.rand(5), torch.arange(5))
    with pytest.raises(ValueError, match=r"k=6 is larger than the 5 tokens present"):
        make("selector.top-k", k=6).run(ctx(), scores=scores)
    # and through the executor, the error names the node
    p = load_text("""
name: big
nodes:
  - {name: s, type: scorer.external, params: {name: s}}
  - {name: greedy, type: selector.top-k, params: {k: 50}, inputs: {scores: s.scores}}
""")
    with pytest.raises(RunError, match=r"'greedy'.*k=50 is larger than the 36 tokens"):
        Executor(p).run_all([Geometry((6, 6))], {"external(name=s)": torch.rand(36)})


# --- region.grid-cells + selector.top-k-per-region ----------------------------------------------
def official_candidates(grid, scores, cell, n, pad):
    """The candidate vector as Nüwa's code builds it, one region at a time: the region's
    cell x cell window in raster order ([top-left, top-right, bottom-left, bottom-right] for
    2x2), cells beyond the grid zero-padded (pad 'zero', id -3) or absent, torch.topk(k=n)
    of the window, regions in raster order."""
    h, w = grid
    ch, cw = min(cell, h), min(cell, w)  # a side shorter than the cell: the window is that side
    value = dict(zip(scores.ids.tolist(), scores.values.tolist()))
    out = []
    for r0 in range(0, h, cell):
        for c0 in range(0, w, cell):
            vals, ids = [], []
            for dy in range(ch):
                for dx in range(cw):
                    y, x = r0 + dy, c0 + dx
                    if y >= h or x >= w:
                        vals.append(0.0 if pad == "zero" else -math.inf)
                        ids.append(-3 if pad == "zero" else None)
                    elif y * w + x in value:
                        vals.append(value[y * w + x])
                        ids.append(y * w + x)
                    else:
                        vals.append(-math.inf)
                        ids.append(None)
            top = torch.topk(torch.tensor(vals, dtype=torch.float32), min(n, len(vals))).indices.tolist()
            out += [ids[i] for i in top if ids[i] is not None]
    return out


@FAST
@given(scored_subset(), st.integers(1, 4), st.integers(1, 4), st.sampled_from(["region", "index", "score"]),
       st.sampled_from(["none", "zero"]), st.booleans())
def test_top_k_per_region(case, cell, n, order, pad, ties):
    grid, scores = case
    if ties:  # few distinct values: the tie order is torch.topk's, per window
        scores = type(scores)(torch.round(scores.values / 5), scores.ids)
    regions = make("region.grid-cells", cell=cell).run(ctx(grid))["regions"]
    sel = make("selector.top-k-per-region", n=n, order=order, pad=pad).run(ctx(grid), scores=scores, regions=regions)
    ids = sel["selection"].ids.tolist()
    official = official_candidates(grid, scores, cell, n, pad)
    if order == "region":
        assert ids == official  # the official candidate vector, order included
        ids = [i for i in ids if i != -3]
    official = [i for i in official if i != -3]
    assert sorted(ids) == sorted(official)
    assert len(set(ids)) == len(ids) and set(ids) <= set(scores.ids.tolist())
    region_of = regions.region.tolist()
    per_region_kept = Counter(region_of[i] for i in ids)
    region_size = Counter(region_of[i] for i in scores.ids.tolist())
    assert all(c <= n for c in per_region_kept.values())  # never more than n from one region
    if pad == "none":
        assert len(ids) == sum(min(n, size) for size in region_size.values())
    value = dict(zip(scores.ids.tolist(), scores.values.tolist()))
    for r in region_size:  # inside a region, the kept beat the dropped
        kept = [value[i] for i in ids if region_of[i] == r]
        lost = [value[i] for i in scores.ids.tolist() if region_of[i] == r and i not in ids]
        if kept and lost:
            assert min(kept) >= max(lost)
    if order == "index":
        assert ids == sorted(ids)
    elif order == "score":
        assert [value[i] for i in ids] == sorted((value[i] for i in ids), reverse=True)


def test_top_k_drops_padded_candidates_after_its_top_k():
    """Nüwa's Qwen alignment: padded cells (score 0) compete in the global top-k, then go."""
    grid = (3, 3)
    scores = Scores(torch.zeros(9), torch.arange(9))
    regions = make("region.grid-cells", cell=2).run(ctx(grid))["regions"]
    cand = make("selector.top-k-per-region", n=4, pad="zero").run(ctx(grid), scores=scores, regions=regions)
    assert (cand["selection"].ids == -3).sum() == 7  # 4 regions x 4 cells - 9 tokens
    out = make("selector.top-k", k=9, clamp=True).run(ctx(grid), scores=scores, candidates=cand["selection"])
    vec = torch.zeros(16)
    keep = cand["selection"].ids[torch.topk(vec[None], 9, dim=1).indices[0]]
    assert torch.equal(out["selection"].ids, torch.sort(keep[keep != -3]).values)
    assert len(out["selection"]) < 9


@FAST
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4))
def test_grid_cells(h, w, cell):
    regions = make("region.grid-cells", cell=cell).run(ctx((h, w)))["regions"]
    assert regions.grid == (h, w) and regions.region.numel() == h * w
    for i, r in enumerate(regions.region.tolist()):
        row, col = divmod(i, w)
        assert r == (row // cell) * math.ceil(w / cell) + col // cell
    sizes = Counter(regions.region.tolist())
    assert len(sizes) == math.ceil(h / cell) * math.ceil(w / cell)
    assert max(sizes.values()) <= cell * cell


# --- selector.union / selector.uniform-grid -------------------------------------------------
@FAST
@given(st.lists(st.lists(st.integers(0, 40), max_size=15), min_size=1, max_size=4))
def test_union(lists):
    sels = [Selection(torch.tensor(x, dtype=torch.long)) for x in lists]
    by_index = make("selector.union").run(ctx(), selections=sels)["selection"].ids.tolist()
    assert by_index == sorted(set().union(*map(set, lists)))
    first = make("selector.union", order="first").run(ctx(), selections=sels)["selection"].ids.tolist()
    expected = list(dict.fromkeys(i for x in lists for i in x))
    assert first == expected


@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(0, 4))
def test_uniform_grid(h, w, stride, offset):
    node = make("selector.uniform-grid", stride=stride, offset=offset)
    if offset >= min(h, w):
        with pytest.raises(ValueError, match=f"offset={offset} is outside the {h}x{w} token grid"):
            node.run(ctx((h, w)))
        return
    ids = make("selector.uniform-grid", stride=stride, offset=offset).run(ctx((h, w)))["selection"].ids.tolist()
    expected = [r * w + c for r in range(offset, h, stride) for c in range(offset, w, stride)]
    assert ids == expected == sorted(expected)


# --- pillar-selector.quantile ----------------------------------------------------------------
def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), written out."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@FAST
@given(scored_subset(), st.floats(0, 1), st.data())
def test_quantile_split(case, q, data):
    grid, scores = case
    scores = Scores(scores.values.double(), scores.ids)
    all_ids = scores.ids.tolist()
    chosen = data.draw(st.lists(st.sampled_from(all_ids), min_size=1, unique=True))
    sel = Selection(torch.tensor(chosen, dtype=torch.long))
    roles = make("pillar-selector.quantile", quantile=q).run(ctx(grid), selection=sel, scores=scores)["roles"]
    assert roles.ids.tolist() == chosen
    value = dict(zip(all_ids, scores.values.tolist()))
    vals = [value[i] for i in chosen]
    thr = _quantile(vals, q)
    eps = 1e-9 * (1 + abs(thr))
    for v, pillar in zip(vals, roles.pillar.tolist()):
        if v >= thr + eps:
            assert pillar
        elif v < thr - eps:
            assert not pillar
    assert roles.pillar.any()  # the maximum always reaches any quantile


# --- position-reencoder.policy ----------------------------------------------------------------
def rpme_reference(index: list[int], s: int, e: int) -> list[int]:
    """Nüwa Algorithm 3 with exact fractions: new[0] = s; new[j] = ceil(I[j](e-s)/I[k-1]) + s."""
    index = sorted(index)
    out = [s]
    for j in range(1, len(index)):
        out.append(math.ceil(Fraction(index[j] * (e - s), index[-1])) + s)
    return out


@st.composite
def kept_set(draw):
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 24))
    ids = draw(st.lists(st.integers(0, h * w - 1), min_size=1, max_size=min(h * w, 80), unique=True))
    return (h, w), ids


@FAST
@given(kept_set(), st.integers(0, 50))
def test_rpme_formula(case, start):
    grid, ids = case
    n = grid[0] * grid[1]
    sel = Selection(torch.tensor(ids, dtype=torch.long))  # any order: offsets follow the ids' order
    plan = make("position-reencoder.policy", policy="rpme").run(ctx(grid, image_start=start), selection=sel)["positions"]
    assert plan.policy == "rpme" and plan.text_follows == "original"
    assert plan.ids.tolist() == ids
    s, e = start, start + n - 1  # the full image spans [s, e]
    expected = dict(zip(sorted(ids), rpme_reference(ids, s, e)))
    assert [start + o for o in plan.offsets.tolist()] == [expected[i] for i in ids]
    got = sorted(plan.offsets.tolist())
    assert got[0] == 0 and got[-1] == (n - 1 if len(ids) > 1 and max(ids) > 0 else 0)
    assert got == sorted(set(got)) or len(ids) > n // 2  # strictly increasing unless crowded


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("rpme_*.safetensors")), ids=lambda p: p.name)
def test_rpme_golden(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        index = f.get_tensor("kept_relative_indices")
        expected = f.get_tensor("expected_rpme_position_ids")
    params = json.loads(meta["params"])
    s, e, k = params["s"], params["e"], params["k"]
    assert index.numel() == k == expected.numel()
    # the reference formula agrees with the golden file ...
    assert rpme_reference(index.tolist(), s, e) == expected.tolist()
    # ... and so does the node, on a 24x24 grid (576 tokens: e - s = 575), given the ids shuffled
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    sel = Selection(index[perm].long())
    plan = make("position-reencoder.policy", policy="rpme").run(ctx((24, 24), image_start=s), selection=sel)["positions"]
    assert e - s == 24 * 24 - 1
    assert (plan.offsets + s).tolist() == expected[perm].tolist()



def test_rpme_golden_files_exist():
    assert not MISSING, MISSING
    assert list(GOLDEN.glob("rpme_*.safetensors")), f"no rpme_*.safetensors in {GOLDEN}"


@FAST
@given(kept_set())
def test_pesp_and_perc(case):
    grid, ids = case
    sel = Selection(torch.tensor(ids, dtype=torch.long))
    pesp = make("position-reencoder.policy", policy="pesp").run(ctx(grid), selection=sel)["positions"]
    assert pesp.offsets.tolist() == ids and pesp.text_follows == "original" and pesp.policy == "pesp"
    perc = make("position-reencoder.policy", policy="perc").run(ctx(grid), selection=sel)["positions"]
    assert perc.offsets.tolist() == list(range(len(ids))) and perc.text_follows == "compact"
    assert perc.ids.tolist() == pesp.ids.tolist() == ids


def test_cls_token_counts_as_index_zero():
    sel = Selection(torch.tensor([-1, 3, 10]))
    plan = make("position-reencoder.policy", policy="pesp").run(ctx(), selection=sel)["positions"]
    assert plan.offsets.tolist() == [0, 3, 10]


# --- random-dropper.uniform -------------------------------------------------------------------
@FAST
@given(st.integers(1, 120), st.data())
def test_random_dropper_properties(n, data):
    keep = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31))
    present = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    node = make("random-dropper.uniform", "drop", keep=keep)
    a = node.run(ctx((1, n), present=present, seed=seed, name="drop"))["selection"].ids.tolist()
    b = node.run(ctx((1, n), present=present, seed=seed, name="drop"))["selection"].ids.tolist()
    assert a == b  # reproducible by seed
    assert len(a) == keep and len(set(a)) == keep and set(a) <= set(present.tolist())
    assert a == sorted(a)
    ratio = make("random-dropper.uniform", "drop", ratio=0.5).run(ctx((1, n), present=present, seed=seed))
    assert len(ratio["selection"]) == int(n * 0.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 2))
def test_random_dropper_differs_across_seeds(seed):
    node = make("random-dropper.uniform", "drop", keep=50)
    a = node.run(ctx((10, 10), seed=seed, name="drop"))["selection"].ids.tolist()
    b = node.run(ctx((10, 10), seed=seed + 1, name="drop"))["selection"].ids.tolist()
    assert a != b  # C(100, 50) subsets: equal only by a bug


def test_random_dropper_input_order_and_errors():
    sel = Selection(torch.tensor([9, 2, 7, 4, 0, 5]))
    out = make("random-dropper.uniform", keep=3, order="input").run(ctx(), selection=sel)["selection"].ids.tolist()
    pos = [sel.ids.tolist().index(i) for i in out]
    assert pos == sorted(pos)  # kept in the input's order
    with pytest.raises(ValueError, match="keep=7 is larger than the 6 candidates"):
        make("random-dropper.uniform", keep=7).run(ctx(), selection=sel)
    with pytest.raises(ValueError, match="exactly one of 'keep' or 'ratio'"):
        make("random-dropper.uniform", keep=3, ratio=0.5)
