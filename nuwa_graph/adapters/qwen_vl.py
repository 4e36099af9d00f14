"""Qwen2-VL and Qwen3-VL: the rest of the Qwen-VL line, through the family hooks of qwen.py.

Both see the same stream as Qwen2.5-VL (qwen.py): one run of `<|image_pad|>` per image, the
merged 2x2 grid in raster order, M-RoPE ids from `get_rope_index`, no CLS token; so every
vision signal, position policy and pipeline file of Qwen2.5-VL carries over. What differs:

- Qwen2-VL (`Qwen2VLForConditionalGeneration`): no window attention in the vision tower (every
  block attends over the whole image), so `window_index` is the identity; the patch merger
  is `ln_q` + `mlp` on the tower's `embed_dim` (its config's `hidden_size` is the LLM width).
- Qwen3-VL (`Qwen3VLForConditionalGeneration`): no windows either; the merger is `norm` +
  `linear_fc1` / `linear_fc2` (reached through its forward: `merge_units`); patch 16 with
  learned position embeddings; interleaved M-RoPE (inside the text model's `rotary_emb`);
  QK-norm in the LLM (signal_rows.head_norm); and **DeepStack**: extra mergers over vision
  blocks `deepstack_visual_indexes` whose outputs the stock model adds to the visual
  positions after decoder layers 0 .. len(deepstack) - 1. Our prefill runs the text model
  without them, so the adapter adds them in the session's post-layer hook
  (`on_layer_output`), to the visual tokens still present there:

  **DeepStack rule.** After decoder layer i (i < len(deepstack)) every visual token present
  in that layer's segment gets the DeepStack row i of its id: a grid token its own row, a
  merged token the row of its anchor (the id it carries), a CLS or pooled token (id < 0)
  nothing. A token pruned before layer i gets nothing there (it is gone), so pruning inside
  the DeepStack layers (FastV at llm.1) stays one consistent forward pass: cached decoding
  equals a cache-free recompute of the same pruned sequence. Keep-everything equals the
  stock model bit for bit (the same additions, in the same dtype).
"""

from __future__ import annotations

import torch

from .base import AdapterRun, register_adapter
from .layout import Segment
from .qwen import QwenAdapter
from .qwen_geometry import VisionGeometry


@register_adapter
class Qwen2VLAdapter(QwenAdapter):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`): Qwen2.5-VL's stream without windows."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    display_name = "Qwen2-VL"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    official_dtype_source = "Qwen2-VL's checkpoints' torch_dtype (bfloat16)"

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """No window attention: the tower runs its merge units in raster order."""
        m = self.visual.spatial_merge_size
        n = int((grid_thw.prod(-1) // (m * m)).sum())
        return torch.arange(n, device=grid_thw.device)


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (`Qwen3VLForConditionalGeneration`): no windows, DeepStack, QK-norm."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    display_name = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    official_dtype_source = "Qwen3-VL's checkpoints' dtype (bfloat16)"
    system_prompt = None  # Qwen3-VL's chat template adds no default system message

    @property
    def deepstack_levels(self) -> int:
        return len(getattr(self.visual, "deepstack_visual_indexes", None) or ())

    def post_layers(self) -> frozenset[int]:
        return frozenset(range(min(self.deepstack_levels, self.n_layers)))

    def after_vision(self, run: AdapterRun, out, vg: VisionGeometry) -> None:
        """The DeepStack rows of every level, batch-concatenated in raster order with one zero
        row at the end (what a token without a row of its own adds), and where each sample's
        rows start."""
        feats = getattr(out, "deepstack_features", None) or []
        run.vision["deepstack"] = [torch.cat([vg.to_raster(f), f.new_zeros(1, f.shape[-1])]) for f in feats]
        run.vision["deepstack_start"] = [sum(vg.counts[:b]) for b in range(len(vg.counts))]
        run.vision["deepstack_count"] = list(vg.counts)
        run.vision["deepstack_where"] = {}

    def _deepstack_where(self, run: AdapterRun, seg: Segment, device: torch.device):
        """(batch index, sequence index, DeepStack row) of every visual token of `seg`; a token
        whose id has no row (CLS, pooled: id < 0) points at the zero row. Built on the device
        from the segment's own device copy (`Segment.on`: no further host copy, no sync), once
        per segment and device, not per layer."""
        key = (id(seg), device)
        cache = run.vision["deepstack_where"]
        if key not in cache:
            on = seg.on(device)
            zero_row = sum(run.vision["deepstack_count"])
            bs, ss, rows = [], [], []
            for b in range(run.B):
                ids, idx = on.img_ids[b].long(), on.img_idx[b].long()
                has = (ids >= 0) & (ids < run.vision["deepstack_count"][b])
                bs.append(torch.full_like(idx, b))
                ss.append(idx)
                rows.append(torch.where(has, ids + run.vision["deepstack_start"][b], torch.full_like(ids, zero_row)))
            cache[key] = tuple(torch.cat(t) for t in (bs, ss, rows))
        return cache[key]

    def on_layer_output(self, run: AdapterRun, layer: int, seg: Segment, hidden: torch.Tensor) -> torch.Tensor | None:
        """DeepStack: add level `layer`'s rows at the visual tokens present (module docstring)."""
        levels = run.vision.get("deepstack") or []
        if layer >= len(levels):
            return None
        b_idx, s_idx, rows = self._deepstack_where(run, seg, hidden.device)
        add = levels[layer].to(hidden.device, hidden.dtype)[rows]
        out = hidden.clone()
        out[b_idx, s_idx] = out[b_idx, s_idx] + add
        return out


__all__ = ["Qwen2VLAdapter", "Qwen3VLAdapter"]
