"""LLM-side scorers: how much the prompt attends to each image token inside the language model.

`scorer.llm-key-norm` (DART's pivots) ranks tokens by the norm of their keys in one layer.

`scorer.llm-attention` is the one criterion behind FastV, PDrop, FEATHER, Nüwa stage 2 and
(with rater rows) SparseVLM: post-softmax attention rows of one decoder layer, restricted
to the image keys present at the node's site, reduced over heads and query rows.

Which rows (signal `llm.attention`, docs/CONTRACTS.md), for a node at site `llm.K`:
- `layer == K`: computed at the input of layer K with layer K's own input_layernorm, q_proj
  and k_proj on the current hidden states (PDrop's rank-and-drop);
- `layer < K`: the rows of layer `layer` during its forward (FastV: layer K-1; Nüwa
  stage 2: layer 15 for a drop before layer 16; FEATHER: layer K-1 with `rope: false` and
  `softmax_over: image`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from nuwa_graph.node import Node, NodeParams, P, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import Queries, SignalRequest
from nuwa_graph.sites import LLMSiteName, Site
from nuwa_graph.types import Scores, text_ids


def drop_heads(rows: torch.Tensor, exclude: list[int], node: str) -> torch.Tensor:
    """rows without the listed heads (dim 0). Used to check that a ranking does not hinge on
    one head, e.g. the attention-supervised head of the embedded model (docs/results.md)."""
    if not exclude:
        return rows
    n = rows.shape[0]
    bad = [h for h in exclude if h >= n]
    if bad or len(set(exclude)) >= n:
        raise ValueError(f"{node}: exclude_heads={exclude} but the layer has {n} heads (valid: 0..{n - 1}, "
                         f"at least one head must remain)")
    keep = [h for h in range(n) if h not in set(exclude)]
    return rows[keep]


def in_simd_body(rows: torch.Tensor) -> torch.Tensor:
    """rows with 64 + (-n mod 64) zero columns appended (sliced off after the reduction).

    On CPU a float reduction over heads or query rows can round a column differently when
    the column falls in the vectorised body of the tensor (whole blocks of 64 floats with
    AVX-512, 32 with AVX2) than when it falls in the columns after the last whole block. The
    official codes reduce whole attention maps whose image columns are followed by the text
    columns, i.e. in the body when the text is long enough; padding puts every image column
    in the body here too, so ties and near-ties come out bit for bit (docs/methods.md, Ties)."""
    extra = 64 + (-rows.shape[-1]) % 64
    return torch.cat([rows, rows.new_zeros(*rows.shape[:-1], extra)], dim=-1).contiguous()


def reduce_rows(rows: torch.Tensor, heads: str, query_reduce: str, order: str = "heads-first",
                full_keys: bool = True) -> torch.Tensor:
    """(heads, q, n) attention rows -> (n,) scores.

    `order` says which axis is reduced first; it matters only when one reduction is `max`.
    Every reduction is done in float32, as the official codes do (mean over heads, then mean
    over query rows: FastV/PDrop/Nüwa with a single row). `full_keys`: the official code
    reduced maps over all keys (image columns followed by text: `in_simd_body`); False for
    maps over the image keys only (FEATHER), reduced as they are."""
    if rows.dim() != 3:
        raise ValueError(f"llm.attention rows must be (heads, q, n), got {tuple(rows.shape)}")
    n = rows.shape[-1]
    rows = rows.float()
    rows = in_simd_body(rows) if full_keys else rows.contiguous()

    def by_heads(x: torch.Tensor) -> torch.Tensor:
        if heads == "mean":
            return x.mean(dim=0)
        if heads == "sum":
            return x.sum(dim=0)
        return x.max(dim=0).values

    def by_queries(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.mean(dim=dim) if query_reduce == "mean" else x.sum(dim=dim)

    if order == "heads-first":
        out = by_queries(by_heads(rows), 0)
    else:
        out = by_heads(by_queries(rows, 1))
    return out[:n]


class LLMAttentionParams(NodeParams):
    layer: int = Field(ge=0, description="decoder layer whose attention rows are used (<= the site's layer K)")
    queries: str = Field("last", description="query rows: 'last' (last prompt token), 'last:N' (last N), "
                         "'text' (every token after the image)")
    rope: bool = Field(True, description="apply RoPE to q and k (FEATHER's criterion has none)")
    softmax_over: Literal["all", "image"] = Field(
        "all", description="softmax over all keys (causal) or over the image keys only (FEATHER)")
    heads: Literal["mean", "max", "sum"] = Field("mean", description="reduction over attention heads")
    query_reduce: Literal["mean", "sum"] = Field("mean", description="reduction over query rows")
    reduce_order: Literal["heads-first", "queries-first"] = Field(
        "heads-first", description="which axis is reduced first (only matters with heads: max)")
    site: LLMSiteName | None = Field(None, description="where the scores are read (an 'llm.K' site); default llm.<layer+1>")
    exclude_heads: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="heads left out before the reduction (robustness checks; default none)")

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: str) -> str:
        Queries.parse(v)  # the one rule for `queries` (signals.py); its error names the valid forms
        return v


class LayerSite(Node[P]):
    """Base of nodes with a `layer` param and an optional `site` read at llm.K (default
    llm.<layer+1>): the site, and the check that the layer is not after it."""

    def _site_name(self) -> str:
        p: Any = self.params
        return p.site if p.site is not None else f"llm.{p.layer + 1}"

    def site(self) -> Site:
        return Site(self._site_name())

    def check(self) -> list[str]:
        k = self.site().layer
        layer = int(self.params.layer)  # type: ignore[attr-defined]
        assert k is not None  # an llm.K site
        if layer > k:
            return [f"layer={layer} is after the site {self._site_name()}: a signal of layer L can be read at llm.K "
                    f"only when L <= K"]
        return []


@register
class LLMAttentionScores(LayerSite[LLMAttentionParams]):
    """Attention the chosen prompt rows pay to each image token present, at one LLM layer.

    Output ids are `ctx.present` (the survivors of earlier stages, in sequence order). The
    rows come from q and k of one layer (no N x N map); the adapter computes them.
    FastV: layer K-1, last row, RoPE, softmax over all keys, mean over heads. PDrop: layer K
    at site llm.K (the layer's own norm/q/k on the current hidden states). FEATHER: layer
    K-1, no RoPE, softmax over the image keys. Nüwa stage 2: layer 15 at llm.16.
    """

    type_name = "scorer.llm-attention"
    paper = "https://arxiv.org/abs/2403.06764"
    outputs = {"scores": Port(Scores, "one score per image token present (ids = ctx.present)")}

    def request(self) -> SignalRequest:
        p = self.params
        return SignalRequest.make("llm.attention", self._site_name(), layer=p.layer, queries=p.queries,
                                  rope=p.rope, softmax_over=p.softmax_over)

    def requests(self):
        return [self.request()]

    def run(self, ctx):
        rows = ctx.signal(self.request())
        if rows.dim() == 2:  # a single query row given as (heads, n)
            rows = rows[:, None, :]
        n = ctx.present.numel()
        if rows.shape[-1] != n:
            raise ValueError(f"llm.attention has {rows.shape[-1]} image columns for {n} image tokens present")
        rows = drop_heads(rows, self.params.exclude_heads, f"node {self.name!r} ({self.type_name})")
        values = reduce_rows(rows, self.params.heads, self.params.query_reduce, self.params.reduce_order,
                             full_keys=self.params.softmax_over == "all")
        return {"scores": Scores(values, ctx.present.clone())}


class KeyNormParams(NodeParams):
    layer: int = Field(ge=0, description="decoder layer whose keys are read (<= the site's layer K; DART: K-1)")
    site: LLMSiteName | None = Field(None, description="where the scores are read (an 'llm.K' site); default llm.<layer+1>")
    p: float = Field(1.0, gt=0, description="the norm's order (DART: 1, hard-coded in every model path)")
    rope: bool = Field(True, description="keys after RoPE (DART) or before")
    tokens: Literal["image", "text"] = Field("image", description="score the image tokens present, or the prompt "
                                             "tokens after the image (ids TEXT_ID_BASE + j)")


@register
class LLMKeyNorm(LayerSite[KeyNormParams]):
    """The norm of each token's key row in one decoder layer, flattened over heads x head_dim
    (heads first, GQA groups repeated), as DART ranks its pivots: `torch.norm(p=1)` of layer
    K-1's post-RoPE keys (ZichenWen1/DART @ 5a19452f,
    llava/model/language_model/modeling_llama_self.py:419-428). Scores float32."""

    type_name = "scorer.llm-key-norm"
    paper = "https://arxiv.org/abs/2502.11494"
    outputs = {"scores": Port(Scores, "key norm per token (ids: ctx.present, or text ids)")}

    def requests(self):
        p = self.params
        return [SignalRequest.make("llm.keys", self._site_name(), layer=p.layer, rope=p.rope, tokens=p.tokens)]

    def run(self, ctx):
        keys = ctx.signal(self.requests()[0])  # (heads, n, head_dim)
        if keys.dim() != 3:
            raise ValueError(f"llm.keys must be (heads, n, head_dim), got {tuple(keys.shape)}")
        flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)  # per token: heads then head_dim, contiguous
        values = torch.norm(flat, p=self.params.p, dim=-1).float()
        if self.params.tokens == "image":
            if values.numel() != ctx.present.numel():
                raise ValueError(f"llm.keys has {values.numel()} image rows for {ctx.present.numel()} tokens present")
            return {"scores": Scores(values, ctx.present.clone())}
        return {"scores": Scores(values, text_ids(values.numel(), values.device))}
