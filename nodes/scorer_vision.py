"""Vision-side scorers: one score per grid token, read from the vision tower.

All act at site `vision` and return `Scores` over the whole grid (ids 0..n-1, raster
order). Layer numbers follow LLaVA's indexing of Hugging Face outputs: for attention
kinds `layer` indexes `attentions` (-2 = CLIP-L encoder layer 22), for hidden states it
indexes `hidden_states` (-2 = output of layer 22).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.types import Scores


def _grid_scores(ctx, values: torch.Tensor, what: str) -> Scores:
    n = ctx.geometry.n_tokens
    values = values.reshape(-1)
    if values.numel() != n:
        raise ValueError(f"{what}: {values.numel()} scores for a {ctx.geometry.grid[0]}x{ctx.geometry.grid[1]} grid "
                         f"({n} tokens)")
    return Scores(values, torch.arange(n, device=values.device))


class ClsAttentionParams(NodeParams):
    layer: int = Field(-2, description="attention layer (index into `attentions`; -2 = CLIP-L layer 22)")
    heads: Literal["sum", "mean"] = Field("sum", description="how heads are reduced (VisionZip and Nüwa sum)")


@register
class ClsAttention(Node[ClsAttentionParams]):
    """CLS -> patch attention of one vision layer, reduced over heads (VisionZip's dominant
    score, Nüwa's salience m)."""

    type_name = "scorer.cls-attention"
    paper = "https://arxiv.org/abs/2412.04467"
    outputs = {"scores": Port(Scores, "CLS attention per patch")}

    def requests(self):
        return [SignalRequest.make("vision.cls_attention", "vision", layer=self.params.layer)]

    def run(self, ctx):
        attn = ctx.signal(self.requests()[0])
        if attn.dim() != 2:
            raise ValueError(f"vision.cls_attention must be (heads, n), got {tuple(attn.shape)}")
        vals = attn.sum(dim=0) if self.params.heads == "sum" else attn.mean(dim=0)
        return {"scores": _grid_scores(ctx, vals, self.type_name)}


class HiddenNormParams(NodeParams):
    layer: int = Field(-2, description="index into the vision tower's hidden_states (-2 = output of layer 22)")


@register
class HiddenNorm(Node[HiddenNormParams]):
    """L2 norm of each patch's hidden state (Nüwa's L2NORM pillar score).

    Computed in the model's dtype, as the official runs compute it (float16, the LLaVA default
    of `--dtype auto` on CUDA). In bfloat16 (8-bit mantissa) many norms tie and the kept set
    moves against float32 (Jaccard 0.60 on the embedded model, issue 20); ties then follow
    torch.topk on the device."""

    type_name = "scorer.hidden-norm"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"scores": Port(Scores, "hidden-state L2 norm per patch")}

    def requests(self):
        return [SignalRequest.make("vision.hidden", "vision", layer=self.params.layer)]

    def run(self, ctx):
        h = ctx.signal(self.requests()[0])
        return {"scores": _grid_scores(ctx, torch.linalg.norm(h, ord=2, dim=-1), self.type_name)}


class ReceivedParams(NodeParams):
    layer: int = Field(-1, description="vision block (-1 = the last ViT block, as Nüwa's Qwen code)")


@register
class AttentionReceived(Node[ReceivedParams]):
    """Attention each (merged) token receives at a vision block: mean over heads, sum over
    queries, averaged per merge unit (Nüwa's Qwen2.5-VL salience)."""

    type_name = "scorer.attention-received"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"scores": Port(Scores, "attention received per token")}

    def requests(self):
        return [SignalRequest.make("vision.attention_received", "vision", layer=self.params.layer)]

    def run(self, ctx):
        return {"scores": _grid_scores(ctx, ctx.signal(self.requests()[0]), self.type_name)}


class ClsQkParams(NodeParams):
    layer: int = Field(-1, description="layer whose q_proj/k_proj are read (PruMerge+: -1, the last CLIP layer)")


@register
class ClsAttentionSingleHead(Node[ClsQkParams]):
    """PruMerge+'s CLS attention: q and k of one layer as a single head over the full
    width, softmax(q_cls . K^T / sqrt(d)) over all keys (CLS included), patch columns.

    Computed as the official code does, bit for bit: the full (1, n+1, n+1) product
    `q @ k^T`, scaled, softmax over every row, then row 0. A CLS row alone (1 x (n+1))
    differs in the last bits, which reorders near-equal scores and, on a uniform image,
    manufactures a one-ulp outlier where the official code finds none. The full product
    costs (n+1)^2 floats: about 1.3 MB for CLIP-L/336 (577 tokens), vision side only.

    Like the official code, the product runs in the model's dtype (float16 in its runs) and is
    scaled after it: over the full width (1024 for CLIP-L) it can overflow to inf in float16
    sooner than the model's own per-head logits (then NaN after the softmax); bfloat16 does not
    overflow but rounds more.
    """

    type_name = "scorer.cls-attention-qk"
    paper = "https://arxiv.org/abs/2403.15388"
    outputs = {"scores": Port(Scores, "single-head CLS attention per patch")}

    def requests(self):
        return [SignalRequest.make("vision.qk_single_head", "vision", layer=self.params.layer)]

    def run(self, ctx):
        qk = ctx.signal(self.requests()[0])
        if qk.dim() != 3 or qk.shape[0] != 2:
            raise ValueError(f"vision.qk_single_head must be (2, n + 1, d), got {tuple(qk.shape)}")
        q, k = qk[0:1], qk[1:2]  # (1, n + 1, d): the official batch of one
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = torch.softmax(attn, dim=-1)
        return {"scores": _grid_scores(ctx, attn[0, 0, 1:], self.type_name)}
