"""SparseVLM (ICML'25, Gumpest/SparseVLMs @ 26a5f488): text raters and token recycling.

Two nodes; the pruning itself is `selector.top-k-int` + `applier.keep`:

- `scorer.sparsevlm-raters`: raters are chosen ONCE from the layer-0 input embeddings,
  m = softmax(V T^T over text).mean(over visual), raters = text tokens with m > mean(m)
  (V: projected visual tokens, T: every token after the image). A visual token's score at
  a pruning layer is the attention of the rater rows to it, mean over heads then over
  raters. The v2 variant (SparseVLM+) adds two options: `rope_correction` divides the
  post-softmax rows by the RoPE pattern of all-ones q and k ("attention gravity
  correction"), and `top_heads` keeps only the heads with the largest rater->visual
  attention sum (14 in the code).
- `merger.sparsevlm-recycle`: the top 30% (int(0.3 n) + 1) of the pruned tokens by the same
  score are clustered with DPC-KNN on the hidden states the layer produced (k = number of
  clusters = int(n_recycled / 10) + 1), each cluster becomes its mean, and the merged tokens
  are inserted after the kept visual tokens. A merged token carries the original id of its
  cluster centre (the anchor), so it stays a visual token for later stages. The hidden
  states arrive on the `hidden` port from `signal.llm-hidden` at the same site.

Tie-break in DPC-KNN (a documented choice, docs/methods.md): the official code adds
unseeded `torch.rand(n) * 1e-6` to the densities. `tie_break` makes it explicit:
- `seeded-noise` (default): the same uniform noise, drawn from the pipeline seed (per node
  and sample), so runs are reproducible and distributed as in the official code;
- `signal`: the noise values (before the 1e-6 scaling) are read from the external signal
  named `noise_name` (the golden tests feed the recorded `cluster_noise`);
- `index`: no noise; among equal densities the token earlier in the recycled list (the one
  with the higher relation score) counts as the denser one.

Half precision follows the official code: DPC-KNN runs in the hidden states' dtype (float16
in the official runs, the LLaVA default of `--dtype auto` on CUDA) and the noise is added in
that dtype. 1e-6 is below the resolution of densities near 1 there (float16 steps by about
5e-4, bfloat16 by 4e-3), so in half precision `seeded-noise` breaks only ties between small
densities: the others follow torch.topk on the device (CUDA's tie order is not the CPU's), and
`index_add_` uses atomics on CUDA (merged rows are not bitwise reproducible between runs).
`index` is exact in every dtype.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import LLMSiteName, Site
from nuwa_graph.types import Mix, Scores, Selection, Tokens

from .scorer_llm import drop_heads, in_simd_body


# --------------------------------------------------------------------------------------
# raters and scores
# --------------------------------------------------------------------------------------
def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (into the tokens after the image) of SparseVLM's text raters."""
    m = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)  # (t,)
    return torch.where(m > m.mean())[0]


def rope_ones_pattern(q_pos: torch.Tensor, k_pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(q, k) matrix of RoPE(ones, q_pos) . RoPE(ones, k_pos) / sqrt(head_dim).

    With q = k = ones, LLaMA's rotate-half RoPE gives sum_f 2 cos((p_q - p_k) theta_f)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=q_pos.device) / head_dim))
    delta = (q_pos.double()[:, None] - k_pos.double()[None, :])[..., None] * inv_freq
    return (2.0 * torch.cos(delta)).sum(-1) / math.sqrt(head_dim)


class RopeCorrection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    head_dim: int = Field(128, ge=2, description="LLM head dimension (Vicuna-7B: 128)")
    base: float = Field(10000.0, gt=0, description="RoPE base (rope_theta)")


class RatersParams(NodeParams):
    layer: int = Field(ge=0, description="decoder layer whose attention rows are read (SparseVLM prunes its output)")
    site: LLMSiteName | None = Field(None, description="where the scores are used (an 'llm.K' site); default llm.<layer+1>")
    top_heads: int | None = Field(
        None, ge=1, description="v2: keep only this many heads, by rater->visual attention sum (code: 14)")
    exclude_heads: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="heads left out before anything else (robustness checks; default none)")
    rope_correction: RopeCorrection | None = Field(
        None, description="v2: divide the rows by the RoPE pattern of all-ones q/k at the tokens' positions "
        "(assumes PESP positions: visual id + image_start, text after the image unshifted)")


@register
class SparseVLMRaters(Node[RatersParams]):
    """SparseVLM's visual-token score: attention from the text raters, at one LLM layer."""

    type_name = "scorer.sparsevlm-raters"
    paper = "https://arxiv.org/abs/2410.04417"
    outputs = {"scores": Port(Scores, "rater attention per image token present (ids = ctx.present)")}

    def _site_name(self) -> str:
        return self.params.site if self.params.site is not None else f"llm.{self.params.layer + 1}"

    def site(self) -> Site:
        return Site(self._site_name())

    def check(self) -> list[str]:
        site_layer = self.site().layer
        assert site_layer is not None  # an llm.K site
        if self.params.layer > site_layer:
            return [f"layer={self.params.layer} is after the site {self._site_name()}"]
        return []

    def _requests(self):
        return (SignalRequest.make("pre_llm.visual", "pre_llm"),
                SignalRequest.make("pre_llm.text", "pre_llm"),
                SignalRequest.make("llm.attention", self._site_name(), layer=self.params.layer, queries="text",
                                   rope=True, softmax_over="all"))

    def requests(self):
        return list(self._requests())

    def run(self, ctx):
        rv, rt, ra = self._requests()
        raters = select_raters(ctx.signal(rv), ctx.signal(rt))
        rows = ctx.signal(ra).float()  # (heads, t, n_present)
        rows = drop_heads(rows, self.params.exclude_heads, f"node {self.name!r} ({self.type_name})")
        if rows.shape[-1] != ctx.present.numel():
            raise ValueError(f"llm.attention has {rows.shape[-1]} image columns for {ctx.present.numel()} tokens present")
        if self.params.rope_correction is not None:
            rc = self.params.rope_correction
            s, n_img, t = ctx.geometry.image_start, ctx.geometry.n_tokens, rows.shape[1]
            q_pos = torch.arange(t, device=rows.device) + s + n_img
            k_pos = ctx.present.clamp(min=0) + s
            rows = rows / rope_ones_pattern(q_pos, k_pos, rc.head_dim, rc.base).to(rows.dtype)
        rows = rows[:, raters, :]
        if self.params.top_heads is not None:
            heads = rows.sum(dim=(1, 2)).topk(min(self.params.top_heads, rows.shape[0])).indices
            rows = rows[heads]
        # as attn_postprocess_topk: mean over heads of the whole map (image columns in its
        # vectorised body), then the rater rows x image columns, mean over raters on that slice
        n = rows.shape[-1]
        by_head = in_simd_body(rows).mean(dim=0)[:, :n].contiguous()
        values = by_head.mean(dim=0)
        return {"scores": Scores(values, ctx.present.clone())}


# --------------------------------------------------------------------------------------
# recycling: DPC-KNN clustering of the best pruned tokens
# --------------------------------------------------------------------------------------
# Elements of one (rows, n, c) difference block. On a CPU a cache-sized block is several
# times faster than large ones (allocating and streaming a 40 MB temporary dominated), and
# only the upper triangle is computed: x_j - x_i is exactly -(x_i - x_j), so its norm is the
# same reduction over the same magnitudes and the mirror is bit-identical. Other devices
# keep the full 64-row blocks they were checked with.
_CPU_BLOCK_ELEMS = 1 << 20
_ROWS_ELSEWHERE = 64


def _pairwise_dist(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """||x_i - x_j||_2 computed as the official code does (difference, then norm), in row chunks."""
    n, c = x.shape
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    if x.device.type != "cpu":
        chunk = chunk or _ROWS_ELSEWHERE
        for i in range(0, n, chunk):
            out[i:i + chunk] = (x[i:i + chunk, None, :] - x[None, :, :]).norm(dim=-1, p=2)
        return out
    chunk = chunk or max(1, _CPU_BLOCK_ELEMS // max(1, n * c))
    for i in range(0, n, chunk):
        out[i:i + chunk, i:] = (x[i:i + chunk, None, :] - x[None, i:, :]).norm(dim=-1, p=2)
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    return torch.where(lower, out.T, out)


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, noise: torch.Tensor | None = None,
                  tie_break: str = "noise") -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of x (n, c) into n_clusters means.

    Returns (merged (n_clusters, c), centres (n_clusters,) indices into x, in the order of
    the merged rows). `noise` (n,) values are scaled by 1e-6 and added to the densities;
    tie_break='index' uses none and prefers the earlier token among equal densities."""
    merged, centres, _ = dpc_knn_clusters(x, n_clusters, noise, tie_break)
    return merged, centres


def dpc_knn_clusters(x: torch.Tensor, n_clusters: int, noise: torch.Tensor | None = None,
                     tie_break: str = "noise") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpc_knn_merge` plus the weights it averaged with: (merged, centres, weights), where
    weights (n_clusters, n) gives merged = weights @ x (each cluster's members at
    1 / (count + 1e-6), the official code's normalisation)."""
    n, c = x.shape
    dist = _pairwise_dist(x) / (c ** 0.5)
    nearest = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise.to(density.dtype) * 1e-6
    higher = density[None, :] > density[:, None]  # higher[i, j]: j is denser than i
    if tie_break == "index":
        idx = torch.arange(n, device=x.device)
        higher = higher | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    mask = higher.to(x.dtype)
    dist_max = dist.max()
    delta = (dist * mask + dist_max * (1 - mask)).min(dim=-1).values
    centres = torch.topk(delta * density, k=n_clusters).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    ones = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    counts = torch.zeros(n_clusters, 1, dtype=x.dtype, device=x.device).index_add_(0, assign, ones) + 1e-6
    merged = torch.zeros(n_clusters, c, dtype=x.dtype, device=x.device).index_add_(0, assign, x * (1.0 / counts[assign]))
    weights = torch.zeros(n_clusters, n, dtype=x.dtype, device=x.device)
    weights[assign, torch.arange(n, device=x.device)] = (1.0 / counts[assign])[:, 0]
    return merged, centres, weights


class RecycleParams(NodeParams):
    site: LLMSiteName = Field(description="the 'llm.K' site where the prune happens (connect signal.llm-hidden there)")
    fraction: float = Field(0.3, gt=0, le=1, description="recycled = int(fraction * n_pruned) + 1 best pruned tokens")
    cluster_divisor: int = Field(10, ge=1, description="clusters = int(n_recycled / divisor) + 1")
    tie_break: Literal["seeded-noise", "signal", "index"] = Field(
        "seeded-noise", description="DPC-KNN density tie-break (see the module doc)")
    noise_name: str = Field("sparsevlm_cluster_noise", description="external signal with the noise (tie_break: signal)")


@register
class SparseVLMRecycle(Node[RecycleParams]):
    """Keep the selected tokens and recycle the best pruned ones into cluster means.

    Output order (= sequence order at the site): kept tokens in stream order, then the
    merged tokens in cluster-centre order. Each merged token's id is its centre's id."""

    type_name = "merger.sparsevlm-recycle"
    paper = "https://arxiv.org/abs/2410.04417"
    outputs = {"tokens": Port(Tokens, "kept + merged token features (space llm)"),
               "selection": Port(Selection, "their ids, in sequence order")}

    def site(self) -> Site:
        return Site(self.params.site)

    def _noise(self) -> SignalRequest:
        return SignalRequest.make("external", self.params.site, name=self.params.noise_name)

    def requests(self):
        return [self._noise()] if self.params.tie_break == "signal" else []

    def run(self, ctx,
            scores: Annotated[Scores, "relation score of every token present (ranks the pruned ones)"],
            selection: Annotated[Selection, "the kept tokens"],
            hidden: Annotated[Tokens, "hidden states of the tokens present at the site (signal.llm-hidden)"]):
        if not torch.equal(scores.ids, ctx.present):
            raise ValueError("scores must cover the tokens present, in stream order")
        if not torch.equal(hidden.ids, ctx.present):
            raise ValueError(f"hidden must cover the {ctx.present.numel()} tokens present at {self.params.site}, in "
                             f"stream order; connect signal.llm-hidden at the same site")
        hidden_rows = hidden.values
        kept = torch.isin(ctx.present, selection.ids)
        kept_pos = torch.where(kept)[0]
        pruned_pos = torch.where(~kept)[0]
        ids = ctx.present[kept_pos]
        values = hidden_rows[kept_pos]
        n = ctx.present.numel()
        weights = torch.zeros(kept_pos.numel(), n, dtype=values.dtype, device=values.device)
        weights[torch.arange(kept_pos.numel(), device=values.device), kept_pos] = 1.0
        if pruned_pos.numel() > 0:
            n_rec = int(pruned_pos.numel() * self.params.fraction) + 1
            n_rec = min(n_rec, pruned_pos.numel())
            rec = pruned_pos[torch.topk(scores.values[pruned_pos], n_rec).indices]
            n_clusters = int(n_rec / self.params.cluster_divisor) + 1
            n_clusters = min(n_clusters, n_rec)
            noise = None
            if self.params.tie_break == "seeded-noise":
                # drawn on the CPU (same noise on every device for a seed), moved once per site
                noise = torch.rand(n_rec, generator=ctx.generator(), device="cpu").to(hidden_rows.device)
            elif self.params.tie_break == "signal":
                noise = ctx.signal(self._noise()).reshape(-1)
                if noise.numel() != n_rec:
                    raise ValueError(f"noise signal has {noise.numel()} values for {n_rec} recycled tokens")
            merged, centres, w = dpc_knn_clusters(hidden_rows[rec], n_clusters, noise, self.params.tie_break)
            ids = torch.cat([ids, ctx.present[rec[centres]]])
            values = torch.cat([values, merged.to(values.dtype)])
            weights = torch.cat([weights, torch.zeros(n_clusters, n, dtype=w.dtype, device=w.device)
                                 .index_copy_(1, rec, w)])
        # how every row was made from the tokens present: a replay on another prompt recomputes them
        return {"tokens": Tokens(values, ids, space="llm", mix=Mix(ctx.present.clone(), weights)),
                "selection": Selection(ids)}
