"""FLOPs of a run, counted from the model config and the tokens each layer actually saw.

The convention is the one of the FastV and PDrop papers: one multiply-accumulate counts as
one FLOP, and only the matrix products of the transformer layers are counted (norms,
softmax, RoPE, embeddings and the LM head are left out). For a layer that sees n tokens:

    FLOPs(n) = n*d*(2*d_q + 2*d_kv)  +  2*n^2*d_q  +  f*n*d*m

- n*d*(2 d_q + 2 d_kv): the q, k, v and o projections (d_q = heads * head_dim, which is d
  unless the config sets a wider head_dim, as Qwen3-VL-4B does; d_kv = kv_heads * head_dim;
  with multi-head attention d_q = d_kv = d and this is FastV's 4*n*d^2);
- 2*n^2*d_q: attention scores (q k^T) and the weighted sum of values;
- f*n*d*m: the FFN with intermediate width m; f = 3 for a gated FFN (SwiGLU: gate, up,
  down; LLaMA, Qwen2, the Qwen2.5-VL vision blocks; what PDrop counts) and 2 for a plain
  two-matrix MLP (CLIP; FastV's 2*n*d*m). A config with hidden_act silu/swish is gated.

Vanilla prefill of the LLM is sum over layers of FLOPs(n_text + n_visual); a pruned run
uses the visual tokens per layer measured in the layer hooks. One decode step with a KV
cache of c_l keys at layer l costs  d*(2d + 2 d_kv) + 2*c_l*d + f*d*m  per layer; the report
gives the first decode step (c_l = the prompt tokens kept at layer l, plus the new one).

The vision tower is counted as it runs (pre-LLM pruning does not make it cheaper): CLIP
over n_patches + CLS tokens in every encoder layer; the Qwen-VL towers over every patch of
the image: Qwen2.5-VL's blocks with windowed attention (2 * sum over windows of w^2 * d)
except the full-attention blocks, Qwen2-VL's and Qwen3-VL's with full attention in every
block (Qwen2-VL's width is `embed_dim`, its MLP `mlp_ratio` x wider and plain; Qwen2.5-VL's
MLP gated; Qwen3-VL's plain); plus the patch embedding (n_patches * channels * patch_area
* d). The projector: LLaVA's 2-layer MLP (d_v*d + d*d per token) over every visual token;
the Qwen patch merger ((4 d_v)^2 + 4 d_v * d per merged token), and on Qwen3-VL one more
merger of that size per DeepStack level.

Multiply by 2 for hardware FLOPs (a multiply and an add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerShape:
    """What a transformer layer's FLOPs depend on."""

    d: int  # hidden width
    m: int  # FFN intermediate width
    d_kv: int  # kv_heads * head_dim
    gated: bool  # 3-matrix (SwiGLU) FFN
    d_q: int = 0  # heads * head_dim (0: d)

    @property
    def ffn_factor(self) -> int:
        return 3 if self.gated else 2

    @property
    def q_width(self) -> int:
        return self.d_q or self.d

    def linear(self, n: int) -> int:
        """Projections and FFN for n tokens."""
        return n * self.d * (2 * self.q_width + 2 * self.d_kv) + self.ffn_factor * n * self.d * self.m

    def prefill(self, n: int) -> int:
        """FLOPs(n): one layer over n tokens with causal/full attention among them."""
        return self.linear(n) + 2 * n * n * self.q_width

    def decode(self, cache: int) -> int:
        """One new token attending to `cache` keys (itself included)."""
        return self.linear(1) + 2 * cache * self.q_width


def _gated(cfg) -> bool:
    return str(getattr(cfg, "hidden_act", "") or "").lower() in ("silu", "swish", "swiglu")


def layer_shape(cfg) -> LayerShape:
    """The LayerShape of a text or vision config (LLaMA/Qwen2/Qwen3/CLIP; the Qwen-VL vision
    configs: Qwen2-VL's width is `embed_dim` and its MLP `mlp_ratio` x that)."""
    d = int(getattr(cfg, "embed_dim", None) or cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", None) or cfg.num_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    m = int(getattr(cfg, "intermediate_size", None) or d * int(cfg.mlp_ratio))
    return LayerShape(d=d, m=m, d_kv=kv * head_dim, gated=_gated(cfg), d_q=heads * head_dim)


def llm_prefill(cfg, n_text: int, visual_per_layer: list[int]) -> int:
    """Prefill FLOPs of the language model's layers for one sample."""
    s = layer_shape(cfg)
    return sum(s.prefill(n_text + v) for v in visual_per_layer)


def llm_decode_step(cfg, n_text: int, visual_per_layer: list[int]) -> int:
    """FLOPs of the first decode step: the cache of layer l holds the prompt tokens kept there."""
    s = layer_shape(cfg)
    return sum(s.decode(n_text + v + 1) for v in visual_per_layer)


# ---- vision towers ---------------------------------------------------------------------------
def _window_sizes(rows: int, cols: int, window: int) -> list[int]:
    """Merged units per attention window of a rows x cols merged grid cut into window x window tiles."""
    rs = [min(window, rows - i) for i in range(0, rows, window)]
    cs = [min(window, cols - j) for j in range(0, cols, window)]
    return [r * c for r in rs for c in cs]


def _first(x) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def vision_flops(config, grid: tuple[int, int] | None = None, crops: int = 1) -> dict[str, int]:
    """{'vision': tower FLOPs, 'projector': projector FLOPs} for one image.

    LLaVA (model_type llava): the CLIP grid from the config. The Qwen-VL line (qwen2_vl,
    qwen2_5_vl, qwen3_vl): `grid` is the merged-token grid (rows, cols) of the image. Tiled
    families (llava_next, llava_onevision, internvl): the tower and the projector run once per
    crop, `crops` of them (the base image or thumbnail and its tiles)."""
    vc = config.vision_config
    s = layer_shape(vc)
    d_llm = int(config.text_config.hidden_size)
    mt = str(getattr(config, "model_type", ""))
    if getattr(vc, "spatial_merge_size", None) and mt.startswith(("qwen2_vl", "qwen2_5_vl", "qwen3_vl")):
        if grid is None:
            raise ValueError(f"{mt} FLOPs need the merged grid of the image")
        merge = int(vc.spatial_merge_size)
        u = merge * merge
        rows, cols = grid
        n = rows * cols * u  # patches
        full = {int(i) for i in (getattr(vc, "fullatt_block_indexes", None) or [])}
        depth = int(getattr(vc, "depth", None) or vc.num_hidden_layers)
        if getattr(vc, "window_size", None):  # Qwen2.5-VL: windows, full attention at fullatt_block_indexes
            window = max(1, int(vc.window_size) // merge // int(vc.patch_size))
            win_sq = sum((w * u) ** 2 for w in _window_sizes(rows, cols, window))
        else:  # Qwen2-VL, Qwen3-VL: every block attends over the whole image
            full, win_sq = set(range(depth)), 0
        tower = sum(s.linear(n) + 2 * (n * n if i in full else win_sq) * s.q_width for i in range(depth))
        patch_in = int(getattr(vc, "in_channels", 3)) * int(getattr(vc, "temporal_patch_size", 1)) * int(vc.patch_size) ** 2
        tower += n * patch_in * s.d
        width = u * s.d
        # the merger's output: out_hidden_size (Qwen2.5-VL, Qwen3-VL); Qwen2-VL's vision hidden_size is that width
        out = int(getattr(vc, "out_hidden_size", None) or (vc.hidden_size if getattr(vc, "embed_dim", None) else d_llm))
        mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())  # Qwen3-VL: one per DeepStack level
        projector = mergers * (n // u) * (width * width + width * out)
        return {"vision": tower, "projector": projector}
    px, patch = _first(vc.image_size), _first(vc.patch_size)  # InternVL gives [h, w] pairs
    side = px // patch
    n_patches = side * side
    siglip = mt.startswith(("llava_onevision", "idefics3", "smolvlm"))
    n = n_patches + (0 if siglip else 1)  # CLS (SigLIP has none)
    tower = int(vc.num_hidden_layers) * s.prefill(n)
    tower += n_patches * int(getattr(vc, "num_channels", 3)) * patch ** 2 * s.d
    layer = getattr(config, "vision_feature_layer", -2)
    width = s.d * (len(layer) if isinstance(layer, (list, tuple)) else 1)
    rows = n_patches
    if mt.startswith("internvl"):  # the projector takes 2x2 patch units (pixel shuffle)
        u = int(round(1 / float(config.downsample_ratio) ** 2))
        rows, width = n_patches // u, width * u
    if mt.startswith(("idefics3", "smolvlm")):  # one linear layer on s x s patch units (pixel shuffle)
        u = int(config.scale_factor) ** 2
        return {"vision": tower * crops, "projector": (n_patches // u) * (width * u) * d_llm * crops}
    projector = rows * (width * d_llm + d_llm * d_llm)
    return {"vision": tower * crops, "projector": projector * crops}


def run_flops(config, n_text: int, visual_per_layer: list[int], n_visual_full: int,
              grid: tuple[int, int] | None = None, crops: int = 1,
              images: list[tuple[tuple[int, int] | None, int]] | None = None) -> dict[str, Any]:
    """The FLOPs of one sample's run and of the vanilla run of the same prompt. `images`: a
    prompt of several images, each one's (grid, crops); its vision FLOPs are their sum.

    Keys: vision, projector, llm_prefill, prefill (the three together), decode_step, their
    vanilla_* counterparts, prefill_tflops_saved, decode_step_tflops_saved and
    prefill_ratio (pruned / vanilla) and the convention."""
    tc = config.text_config
    full = [n_visual_full] * len(visual_per_layer)
    if images:
        each = [vision_flops(config, g, c) for g, c in images]
        vis = {k: sum(v[k] for v in each) for k in each[0]}
    else:
        vis = vision_flops(config, grid, crops)
    out: dict[str, Any] = dict(vis)
    out["llm_prefill"] = llm_prefill(tc, n_text, visual_per_layer)
    out["vanilla_llm_prefill"] = llm_prefill(tc, n_text, full)
    out["prefill"] = vis["vision"] + vis["projector"] + out["llm_prefill"]
    out["vanilla_prefill"] = vis["vision"] + vis["projector"] + out["vanilla_llm_prefill"]
    out["decode_step"] = llm_decode_step(tc, n_text, visual_per_layer)
    out["vanilla_decode_step"] = llm_decode_step(tc, n_text, full)
    out["prefill_tflops_saved"] = (out["vanilla_prefill"] - out["prefill"]) / 1e12
    out["decode_step_tflops_saved"] = (out["vanilla_decode_step"] - out["decode_step"]) / 1e12
    out["prefill_ratio"] = out["prefill"] / out["vanilla_prefill"] if out["vanilla_prefill"] else 1.0
    out["text_tokens"] = n_text
    out["convention"] = "FastV/PDrop: 1 multiply-accumulate = 1 FLOP, transformer-layer matmuls only"
    return out


def mean_flops(per_sample: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every numeric entry over samples (eval results), with the convention.

    `math.fsum` rounds the exact sum once, so the mean does not depend on the order of the
    samples: shards merged in any order give the single process's numbers bit for bit."""
    ok = [f for f in per_sample if "unavailable" not in f]
    if not ok:
        return per_sample[0] if per_sample else {}
    out: dict[str, Any] = {}
    for k, v in ok[0].items():
        if isinstance(v, (int, float)):
            out[k] = math.fsum(f[k] for f in ok) / len(ok)
    out["convention"] = ok[0]["convention"]
    return out


__all__ = ["LayerShape", "layer_shape", "llm_decode_step", "llm_prefill", "mean_flops", "run_flops",
           "vision_flops"]
