"""Ties fall as in the official code: tied, uniform and near-tied inputs for every method.

Every expected value here comes from the official code's own sequence of operations
(same tensors, shapes, dtype and calls: torch.topk on CPU breaks ties by its own rule),
reimplemented in this file from reading the official repositories at the commits of
shared/golden/README.md, never from our nodes:

- Nüwa stage 1 (nuwa/clip_encoder.py; Vscan/qwen/model/qwen2_5vl_nuwa.py): unfold the
  salience map into 2x2 windows, topk per window, candidates region by region, topk over
  the candidate vector (zero-padded cells included on Qwen, dropped after), sort.
- LLM side (FastV, PDrop, Nüwa stage 2 LLaVA/Qwen, FEATHER, SparseVLM): the head mean of a
  map over all keys (the image columns followed by text), image columns, topk, sort.
- VisionZip (visionzip/clip_encoder.py), PruMerge+ (clip_encoder.py,
  token_prune_merge_advanced_plus).

"Tied" inputs take few distinct values (exact ties); "uniform" inputs are constant;
"near-tied" inputs differ in the last bits, where the arithmetic of the score decides.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nuwa_graph.errors import RunError
from nuwa_graph.executor import Executor
from nuwa_graph.pipeline import load, load_text
from nuwa_graph.types import CLS_ID, Geometry

PIPES = Path(__file__).resolve().parents[1] / "pipelines"
S = 35  # image start
N = 576
GRID = (24, 24)
QWEN_7B = {"llm_layers": 28, "vision_layers": 32}


def tied(shape, levels=3, seed=0, scale=1 / 64):
    """Values on a coarse lattice: many exact ties, sums of a few of them stay exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, levels + 1, shape, generator=g).float() * scale


def near_tied(shape, seed=0):
    """Values that differ only in their last bits around 0.01."""
    g = torch.Generator().manual_seed(seed)
    base = torch.full(shape, 0.01)
    ulps = torch.randint(0, 3, shape, generator=g)
    out = base.clone()
    for _ in range(2):
        out = torch.where(ulps > _, torch.nextafter(out, torch.tensor(1.0)), out)
    return out


def run_reader(pipe, reader, grid=GRID, image_start=S):
    """Executor over every site in order; `reader(req, state)` sees the live state."""
    ex = Executor(pipe)
    state = ex.start([Geometry(grid, image_start=image_start)])
    for site in ex.sites():
        ex.run_site(state, site, lambda req, b: reader(req, state))
    return state


def sel(state, node):
    return state.values[(node, "selection")][0].ids


# ---------------------------------------------------------------------------------------
# Nüwa stage 1: the official region separation and alignment
# ---------------------------------------------------------------------------------------
def official_nuwa_llava(metric_map: torch.Tensor, top_n: int, k1: int):
    """metric_map (1, H*W) -> (candidate vector, kept ids sorted), as CLIPVisionTower_Nuwa.forward."""
    B, H, W = 1, 24, 24
    regions = metric_map.view(B, H, W).unfold(1, 2, 2).unfold(2, 2, 2).reshape(B, (H // 2) * (W // 2), 4)
    _, local = regions.topk(k=top_n, dim=-1)
    region_ids = torch.arange((H // 2) * (W // 2)).unsqueeze(0)
    gy = (region_ids // (W // 2)).unsqueeze(-1) * 2 + local // 2
    gx = (region_ids % (W // 2)).unsqueeze(-1) * 2 + local % 2
    cand = (gy * W + gx).view(B, -1)
    cand_scores = torch.gather(metric_map, 1, cand)
    num = min(k1, 144 * top_n)
    _, top = torch.topk(cand_scores, num, dim=1)
    return cand[0], torch.gather(cand, 1, top).sort().values[0]


def nuwa_llava_signals(cls_rows: torch.Tensor, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"vision.cls_attention": cls_rows, "vision.hidden": torch.randn(N, 8, generator=g),
            "vision.hidden_mean": torch.randn(N, 8, generator=g)}


def cls_rows_from(metric: torch.Tensor) -> torch.Tensor:
    """(16, 576) head rows whose sum over heads is exactly `metric` (1/16 of it per head)."""
    return (metric / 16).expand(16, -1).contiguous()


@pytest.mark.parametrize("budget,top_n,k1", [(64, 1, 112), (128, 2, 224), (192, 3, 336)])
@pytest.mark.parametrize("kind", ["uniform", "tied", "near-tied"])
def test_nuwa_llava_stage1_ties(budget, top_n, k1, kind):
    if kind == "uniform":
        rows = torch.full((16, N), 1 / 577)
    elif kind == "tied":
        rows = tied((16, N), levels=2, seed=budget)
    else:
        rows = near_tied((16, N), seed=budget)
    # the official salience: attentions[:, :, 0, 1:].sum(dim=1) of a (1, 16, 577, 577) map
    attn = torch.zeros(1, 16, 2, N + 1)
    attn[0, :, 0, 1:] = rows
    metric = attn[:, :, 0, 1:].sum(dim=1)
    want_cand, want = official_nuwa_llava(metric, top_n, k1)

    def reader(req, state):
        sig = nuwa_llava_signals(rows)
        if req.kind == "llm.attention":
            return torch.rand(32, 1, state.present[0].numel(), generator=torch.Generator().manual_seed(1))
        return sig[req.kind]

    state = run_reader(load(PIPES / "nuwa.yaml", {"budget": budget}), reader)
    assert torch.equal(state.values[("salience", "scores")][0].values, metric[0])
    assert torch.equal(sel(state, "candidates"), want_cand)  # region order, torch.topk order inside
    assert torch.equal(sel(state, "align"), want)


def test_four_equal_values_follow_torch_topk():
    """The issue's example: one 2x2 window of equal values, k = 2 -> local [2, 3] (CPU topk)."""
    from nuwa_graph.context import SampleContext
    from nuwa_graph.registry import get

    ctx = SampleContext(sample=0, geometry=Geometry((2, 2)), present=torch.arange(4))
    regions = get("region.grid-cells")("cells", {"cell": 2}).run(ctx)["regions"]
    from nuwa_graph.types import Scores

    scores = Scores(torch.ones(4), torch.arange(4))
    out = get("selector.top-k-per-region")("c", {"n": 2}).run(ctx, scores=scores, regions=regions)["selection"]
    assert out.ids.tolist() == torch.ones(1, 1, 4).topk(2, dim=-1).indices.reshape(-1).tolist()


def official_nuwa_qwen(attn_logits: torch.Tensor, h: int, w: int, keep_ratio: float, top_n: int):
    """Qwen2.5-VL stage-1 selection: zero padding to even sides, padded cells dropped last."""
    pad_h, pad_w = (2 - h % 2) % 2, (2 - w % 2) % 2
    ph, pw = h + pad_h, w + pad_w
    metric_2d = attn_logits.view(h, w)
    if pad_h or pad_w:
        metric_2d = F.pad(metric_2d, (0, pad_w, 0, pad_h), mode="constant", value=0)
    padded = metric_2d.flatten().unsqueeze(0)
    rh, rw = ph // 2, pw // 2
    regions = metric_2d.unfold(0, 2, 2).unfold(1, 2, 2).reshape(rh * rw, 4)
    _, local = regions.topk(k=top_n, dim=-1)
    rid = torch.arange(rh * rw)
    gy = ((rid // rw) * 2).unsqueeze(-1) + local // 2
    gx = ((rid % rw) * 2).unsqueeze(-1) + local % 2
    cand = (gy * pw + gx).view(1, -1)
    num = min(math.ceil(h * w * keep_ratio), cand.shape[1])
    _, top = torch.topk(torch.gather(padded, 1, cand), num, dim=1)
    bench = torch.gather(cand, 1, top).sort().values
    y, x = bench // pw, bench % pw
    bench = bench[(y < h) & (x < w)]
    return (bench // pw) * w + bench % pw  # back to unpadded raster ids


@pytest.mark.parametrize("keep,s1,top_n", [(25, 0.35, 3), (50, 0.6, 3), (75, 0.85, 4)])
@pytest.mark.parametrize("kind", ["zero", "uniform", "tied", "near-tied"])
def test_nuwa_qwen_stage1_ties(keep, s1, top_n, kind):
    h, w = 15, 21
    n = h * w
    if kind == "zero":  # the padded cells tie with every token: some are chosen, then dropped
        logits = torch.zeros(n)
    elif kind == "uniform":
        logits = torch.full((n,), 0.25)
    elif kind == "tied":
        logits = tied((n,), levels=3, seed=keep)
    else:
        logits = near_tied((n,), seed=keep)
    want = official_nuwa_qwen(logits, h, w, s1, top_n)
    g = torch.Generator().manual_seed(0)
    sig = {"vision.attention_received": logits, "pre_llm.visual": torch.randn(n, 8, generator=g),
           "vision.merged_hidden_mean": torch.randn(n, 8, generator=g)}

    def reader(req, state):
        if req.kind == "llm.attention":
            return tied((28, 3, state.present[0].numel()), seed=5)
        return sig[req.kind]

    state = run_reader(load(PIPES / "nuwa_qwen.yaml", {"keep": keep}, QWEN_7B), reader, grid=(h, w), image_start=15)
    assert torch.equal(sel(state, "align"), want)
    if kind == "zero":
        assert want.numel() < math.ceil(n * s1)  # the official count, padded picks dropped


# ---------------------------------------------------------------------------------------
# LLM side: head mean over a map of all keys, image columns, topk
# ---------------------------------------------------------------------------------------
def full_map(img_rows: torch.Tensor, n_text: int = 64, seed: int = 3) -> torch.Tensor:
    """(heads, q, n) image columns inside rows over [prefix S | image | text] keys."""
    hds, q, n = img_rows.shape
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(hds, q, S + n + n_text, generator=g) * 1e-3
    full[:, :, S:S + n] = img_rows
    return full


def official_fastv(full: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """FastV in-place: torch.mean(attn, dim=1)[0] over (1, H, q, L), last row, image slice, topk."""
    avg = torch.mean(full[None], dim=1)[0][-1]
    return (avg[S:S + n].topk(k).indices + S).sort().values - S


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("kind", ["uniform", "tied", "near-tied"])
def test_fastv_ties(budget, kind):
    if kind == "uniform":
        img = torch.full((32, 1, N), 1 / 651)
    elif kind == "tied":
        img = tied((32, 1, N), seed=budget)
    else:
        img = near_tied((32, 1, N), seed=budget)
    full = full_map(img)
    sig = {"llm.attention": full[:, :, S:S + N]}
    state = Executor(load(PIPES / "fastv.yaml", {"budget": budget})).run_all([Geometry(GRID, S)], signals=sig)
    assert torch.equal(state.values[("attn", "scores")][0].values, torch.mean(full[None], dim=1)[0][-1][S:S + N])
    assert torch.equal(state.actions[0][0].ids, official_fastv(full, N, budget))


@pytest.mark.parametrize("n_text", [64, 100, 200])
def test_head_mean_is_bit_exact_for_near_ties(n_text):
    """Random rows of a map over all keys: the node's head mean is the official one, bit for
    bit, whatever the image length, when at least 64 text columns follow the image (then the
    image columns sit in the vectorised body of the official map too; with fewer, the last
    image columns can fall in its tail and differ by one ulp: see docs/methods.md)."""
    from nuwa_graph.nodes.scorer_llm import reduce_rows

    for n in (112, 147, 224, 333, 576):
        img = torch.rand(32, 1, n, generator=torch.Generator().manual_seed(n))
        full = full_map(img, n_text=n_text)
        want = torch.mean(full[None], dim=1)[0][-1][S:S + n]
        assert torch.equal(reduce_rows(img, "mean", "mean"), want)


def official_pdrop_stage(img_rows: torch.Tensor, keep_length: int) -> torch.Tensor:
    """pdrop_rank_drop: mean over heads of (H, 1, L), mean over the query rows, image columns, topk, sort."""
    full = full_map(img_rows)
    avg = torch.mean(torch.mean(full, dim=0), dim=0)[S:S + img_rows.shape[-1]]
    return avg.topk(keep_length).indices.sort().values


@pytest.mark.parametrize("budget,ratios", [(64, [0.1, 0.05, 0.025]), (128, [0.32, 0.16, 0.08])])
@pytest.mark.parametrize("kind", ["uniform", "tied"])
def test_pdrop_every_stage_ties(budget, ratios, kind):
    stage_rows = {}

    def reader(req, state):
        n = state.present[0].numel()
        rows = torch.full((32, 1, n), 1 / 700) if kind == "uniform" else tied((32, 1, n), seed=n)
        stage_rows[req.arg("layer")] = (rows, state.present[0].clone())
        return rows

    state = run_reader(load(PIPES / "pdrop.yaml", {"budget": budget}), reader)
    acts = state.actions[0]
    assert [a.site for a in acts] == ["llm.2", "llm.10", "llm.20"]
    for act, layer, r in zip(acts, (2, 10, 20), ratios):
        rows, present = stage_rows[layer]
        local = official_pdrop_stage(rows, int(N * r))
        assert torch.equal(act.ids, present[local])


def official_nuwa_qwen_stage2(img_rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """attn[:, :, -3:, :].mean(dim=2).max(dim=1).values, image columns, topk(sorted=False), mask."""
    full = full_map(img_rows)[None]
    scores = full[:, :, -3:, :].mean(dim=2).max(dim=1).values[0, S:S + img_rows.shape[-1]]
    n = scores.numel()
    _, top = torch.topk(scores, k=max(1, int(n * ratio)), sorted=False)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[top] = True
    return torch.where(keep)[0]


@pytest.mark.parametrize("keep,s2", [(25, 0.42), (75, 0.7)])
@pytest.mark.parametrize("kind", ["uniform", "tied"])
def test_nuwa_qwen_stage2_ties(keep, s2, kind):
    h, w = 15, 21
    n = h * w
    seen = {}
    g = torch.Generator().manual_seed(0)
    sig = {"vision.attention_received": torch.rand(n, generator=g), "pre_llm.visual": torch.randn(n, 8, generator=g),
           "vision.merged_hidden_mean": torch.randn(n, 8, generator=g)}

    def reader(req, state):
        if req.kind != "llm.attention":
            return sig[req.kind]
        m = state.present[0].numel()
        rows = torch.full((28, 3, m), 0.125) if kind == "uniform" else tied((28, 3, m), levels=2, seed=m)
        seen["rows"], seen["present"] = rows, state.present[0].clone()
        return rows

    state = run_reader(load(PIPES / "nuwa_qwen.yaml", {"keep": keep}, QWEN_7B), reader, grid=(h, w), image_start=15)
    local = official_nuwa_qwen_stage2(seen["rows"], s2)
    assert torch.equal(state.actions[0][1].ids, seen["present"][local])


@pytest.mark.parametrize("budget,r", [(64, 0.888), (192, 0.666)])
@pytest.mark.parametrize("kind", ["uniform", "tied"])
def test_feather_ties(budget, r, kind):
    """FEATHER: softmax over the image keys only, so the map ends at the image columns."""
    seen = {}

    def reader(req, state):
        n = state.present[0].numel()
        rows = torch.full((32, 1, n), 1 / n) if kind == "uniform" else tied((32, 1, n), seed=n)
        seen[req.arg("layer")] = (rows, state.present[0].clone())
        return rows

    state = run_reader(load(PIPES / "feather.yaml", {"budget": budget}), reader)
    a1, a2 = state.actions[0]
    rows, _ = seen[7]
    score = rows[None].mean(dim=1)[0][0]
    top = score.topk(int(N * (1 - r))).indices
    strided = torch.from_numpy(np.arange(N).reshape(24, 24)[::3, ::3].flatten())
    stage1 = torch.unique(torch.cat((top, strided)), sorted=True)
    assert torch.equal(a1.ids, stage1)
    rows2, present2 = seen[15]
    score2 = rows2[None].mean(dim=1)[0][0]
    top2 = score2.topk(int(present2.numel() * ((1 - r) * (1 - r)))).indices
    assert torch.equal(a2.ids, present2[top2.sort().values])


# ---------------------------------------------------------------------------------------
# SparseVLM: every stage's kept set and the anchors of the recycled clusters
# ---------------------------------------------------------------------------------------
def official_dpc_centres(x: torch.Tensor, cluster_num: int, noise: torch.Tensor) -> torch.Tensor:
    """cluster_and_merge's centres (index_down), with the recorded noise."""
    x = x[None]
    c = x.shape[-1]
    dist = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)
    nearest, _ = torch.topk(dist, k=cluster_num, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise[None] * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dmax = dist.flatten(1).max(dim=-1)[0][:, None, None]
    d, _ = (dist * mask + dmax * (1 - mask)).min(dim=-1)
    return torch.topk(d * density, k=cluster_num, dim=-1)[1][0]


@pytest.mark.parametrize("budget,sched", [(64, [66, 30, 17]), (128, [303, 110, 36])])
def test_sparsevlm_every_stage_ties(budget, sched):
    n_text = 24
    g = torch.Generator().manual_seed(budget)
    emb_v, emb_t = torch.randn(N, 8, generator=g), torch.randn(n_text, 8, generator=g)
    hidden_by_id = tied((N, 8), levels=2, seed=7)  # few distinct vectors: density ties
    from nuwa_graph.nodes.sparsevlm import select_raters

    raters = select_raters(emb_v, emb_t)
    log = []

    def noise_for(n_present, k):
        n_rec = int((n_present - k) * 0.3) + 1
        return torch.rand(n_rec, generator=torch.Generator().manual_seed(n_present))

    def reader(req, state):
        present = state.present[0]
        n = present.numel()
        if req.kind == "pre_llm.visual":
            return emb_v
        if req.kind == "pre_llm.text":
            return emb_t
        if req.kind == "llm.attention":
            rows = tied((32, n_text, n), levels=2, seed=n)
            log.append((rows, present.clone()))
            return rows
        if req.kind == "llm.hidden":
            return hidden_by_id[present.clamp(min=0)]
        if req.kind == "external":
            return noise_for(n, min(sched[len(log) - 1], n - 1))
        raise AssertionError(req)

    text = (PIPES / "sparsevlm.yaml").read_text().replace("tie_break: seeded-noise", "tie_break: signal")
    state = run_reader(load_text(text, "sparsevlm.yaml", {"budget": budget}), reader)
    acts = state.actions[0]
    assert len(acts) == 3
    for act, (rows, present), k in zip(acts, log, sched):
        n = present.numel()
        full = full_map(rows)  # (H, T, L): a map over all keys
        relation = torch.mean(full[None], dim=1)[:, raters][:, :, S:S + n].mean(1)  # (1, n)
        k = min(k, n - 1)
        _, idx = torch.topk(relation, k, dim=1)
        mask = torch.zeros_like(relation, dtype=torch.bool)
        mask[0][idx] = True
        kept = torch.where(mask[0])[0]
        pruned = torch.where(~mask[0])[0]
        n_rec = int(pruned.numel() * 0.3) + 1
        rec = relation[0][pruned].topk(n_rec)[1]
        centres = official_dpc_centres(hidden_by_id[present[pruned[rec]].clamp(min=0)], int(n_rec / 10) + 1,
                                       noise_for(n, k))
        want = torch.cat([present[kept], present[pruned[rec[centres]]]])
        assert torch.equal(act.ids, want)  # kept in sequence order, then the anchors in centre order


# ---------------------------------------------------------------------------------------
# VisionZip: dominant top-k order and multi-head keys
# ---------------------------------------------------------------------------------------
def official_visionzip(attn_cls: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int):
    """CLIPVisionTower_VisionZip.forward on (16, 577) CLS rows, (16, 577, d) keys, (577, c) hidden."""
    attn = attn_cls[None, :, None, :]  # (1, 16, 1, 577): the CLS query row
    metric = keys[None].contiguous().mean(1)  # raw_key_states.mean(1)
    hs = hidden[None]
    topk = attn[:, :, 0, 1:].sum(dim=1).topk(dominant, dim=1).indices + 1
    all_idx = torch.cat([torch.zeros((1, 1), dtype=topk.dtype), topk], dim=1)
    mask = torch.ones_like(hs[:, :, 0], dtype=torch.bool).scatter_(1, all_idx, False)
    dom = hs.masked_select(~mask.unsqueeze(-1)).view(1, dominant + 1, hs.shape[2])
    mf = metric[mask].view(1, hs.shape[1] - (dominant + 1), metric.shape[2])
    hf = hs.masked_select(mask.unsqueeze(-1)).view(1, hs.shape[1] - (dominant + 1), hs.shape[2])
    mn = mf / mf.norm(dim=-1, keepdim=True)
    step = max(1, mn.shape[1] // contextual)
    targets = torch.arange(0, mn.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(mn.shape[1]), targets)
    sim = torch.bmm(mn[:, others, :], mn[:, targets, :].transpose(1, 2))
    onehot = torch.zeros(1, int(others.sum()), contextual, dtype=hf.dtype)
    onehot.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    counts = onehot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    agg = torch.bmm(onehot.transpose(1, 2), hf[:, others, :]) / counts
    ctx_tokens = hf[:, targets, :] + agg
    rest_ids = torch.nonzero(mask[0]).reshape(-1)  # token ids 0..576 of the remaining tokens
    return all_idx[0], torch.cat([dom, ctx_tokens], dim=1)[0], rest_ids[targets]


@pytest.mark.parametrize("budget", [64, 128])
@pytest.mark.parametrize("kind", ["uniform", "tied", "near-tied"])
def test_visionzip_ties_multihead_keys(budget, kind):
    if kind == "uniform":
        attn = torch.full((16, N + 1), 1 / 577)
    elif kind == "tied":
        attn = tied((16, N + 1), levels=2, seed=budget)
    else:
        attn = near_tied((16, N + 1), seed=budget)
    g = torch.Generator().manual_seed(budget)
    keys = tied((16, N + 1, 64), levels=3, seed=budget + 1) + torch.randn(16, N + 1, 64, generator=g) * 1e-3
    keys[:, 100:140] = keys[:, 99:100]  # duplicated keys: exactly tied similarities
    hidden = torch.randn(N + 1, 32, generator=g)
    dominant = budget * 27 // 32 - 1
    contextual = budget - budget * 27 // 32
    all_idx, tokens, targets = official_visionzip(attn, keys, hidden, dominant, contextual)
    sig = {"vision.cls_attention": attn[:, 1:], "vision.hidden": hidden[1:], "vision.cls_hidden": hidden[0],
           "vision.keys": keys}
    ex = Executor(load(PIPES / "visionzip.yaml", {"budget": budget}))
    state = ex.run_all([Geometry(GRID, S)], signals={r.key: sig[r.kind] for r in ex.requests()})
    assert torch.equal(sel(state, "dominant"), all_idx[1:] - 1)  # torch.topk order
    (keep,) = state.actions[0]
    want_ids = torch.cat([torch.tensor([CLS_ID]), torch.sort(all_idx[1:]).values - 1, targets - 1])
    assert torch.equal(keep.ids, want_ids)
    assert (keep.tokens.values - tokens).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------
# PruMerge+: the full q k^T product; no outlier is a clear error
# ---------------------------------------------------------------------------------------
def official_prumerge_idx(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """token_prune_merge_advanced_plus up to the kept indices (adaptive, PruMerge+ supplement)."""
    c = q.shape[-1]
    attn = F.softmax((q[None] @ k[None].transpose(-2, -1)) * c ** -0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    arr = cls_attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(arr, 25), np.percentile(arr, 75)
    ratio = len(np.where(arr > q3 + 1.5 * (q3 - q1))[0]) / len(arr)
    _, idx = torch.topk(cls_attn, int(N * ratio), dim=1, largest=True)
    seq = torch.arange(0, 575, int(int(1 / ratio) / 3))
    extra = torch.tensor([int(x) for x in seq if x not in idx.flatten()])
    return torch.cat((idx, extra.unsqueeze(0)), dim=1)[0]


def uniform_image_qk(d=64, seed=0):
    """Every patch has the same q and k (a flat image); the CLS token differs."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(N + 1, d, generator=g), torch.randn(N + 1, d, generator=g)
    q[1:], k[1:] = q[1], k[1]
    return q, k


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_prumerge_uniform_image_is_a_clear_error(seed):
    """The official code finds no outlier on a flat image (int(1/0) fails); the row-only
    product found a one-ulp one here and kept 5 tokens silently."""
    q, k = uniform_image_qk(seed=seed)
    attn = F.softmax((q[None] @ k[None].transpose(-2, -1)) * 64 ** -0.5, dim=-1)[0, 0, 1:]
    assert attn.unique().numel() == 1  # the official scores are exactly uniform
    g = torch.Generator().manual_seed(0)
    sig = {"vision.qk_single_head": torch.stack([q, k]), "vision.hidden": torch.randn(N, 64, generator=g)}
    ex = Executor(load(PIPES / "prumerge_plus.yaml"))
    with pytest.raises(RunError, match=r"'adaptive'.*no score is an outlier.*lower `whisker`"):
        ex.run_all([Geometry(GRID, S)], signals={r.key: sig[r.kind] for r in ex.requests()})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_tied_keys(seed):
    """Groups of patches share a key (tied attention); a few stand out as outliers."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    q, k = torch.randn(N + 1, d, generator=g), torch.randn(6, d, generator=g)[torch.randint(0, 6, (N + 1,), generator=g)]
    k[1 + torch.randperm(N, generator=g)[:12]] = q[0] * 0.5  # outliers, all tied
    hidden = torch.randn(N, d, generator=g)
    want = official_prumerge_idx(q, k)
    sig = {"vision.qk_single_head": torch.stack([q, k]), "vision.hidden": hidden}
    ex = Executor(load(PIPES / "prumerge_plus.yaml"))
    state = ex.run_all([Geometry(GRID, S)], signals={r.key: sig[r.kind] for r in ex.requests()})
    assert torch.equal(sel(state, "adaptive"), want)
