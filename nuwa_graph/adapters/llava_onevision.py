"""The LLaVA-OneVision adapter (`LlavaOnevisionForConditionalGeneration`: SigLIP, AnyRes, Qwen2).

As LLaVA-NeXT (llava_next.py): the base crop's grid, the tiles stitched and cut to the unpad
window, a newline slot per row. Two differences:

- SigLIP has no CLS token (`vision_feature_select_strategy='full'`): every CLS signal is
  refused before the forward pass (VisionZip, PruMerge+, Nüwa's LLaVA recipe); per-crop
  hidden states (`vision.hidden`, `vision.hidden_mean`) are the crop's whole patch grid;
- `anyres_max_N`: when the cut canvas is larger than N crops' worth of tokens the stock model
  interpolates it (bilinear, in LLM space), so its stream tokens are mixtures of patches. The
  tiles part is then a grid with no crop (nuwa_graph/geometry.py `anyres_geometry(resized=)`):
  LLM-side and spatial methods run on it, the tiles' vision signals have no stream ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import RunError
from ..part_views import CropSignals
from ..signals import SignalRequest
from .base import LLM_SIGNALS, AdapterRun, load_checkpoint, register_adapter
from .llava_next import LlavaNextAdapter
from .processors import checkpoint_chat_template


def onevision_processor_class():
    """The stock LlavaOnevisionProcessor with `video_processor=None` accepted (no torchvision needed)."""
    from transformers import LlavaOnevisionProcessor

    from .processors import without_video

    return without_video(LlavaOnevisionProcessor)


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (`llava_onevision`): AnyRes parts, no CLS, interpolated large canvases."""

    family = "llava_onevision"
    family_group = ""  # its own group: the `llava` group's recipes read a CLS token, which SigLIP has not
    has_cls = False
    model_types = ("llava_onevision",)
    official_dtype = "float16"
    official_dtype_source = ("LLaVA-OneVision's official code (LLaVA-VL/LLaVA-NeXT load_pretrained_model, "
                             "torch_dtype float16 by default)")
    supported_signals = frozenset({"vision.hidden", "vision.hidden_mean"}) | LLM_SIGNALS
    feature_strategy = "full"  # SigLIP: no CLS row

    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> LlavaOnevisionAdapter:
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        model, device = load_checkpoint(LlavaOnevisionForConditionalGeneration, id_or_path, dtype, device, device_map,
                                        attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        tok.padding_side = "left"
        ip = LlavaOnevisionImageProcessorPil.from_pretrained(id_or_path)  # PIL: no torchvision needed
        vc = model.config.vision_config
        proc = onevision_processor_class()(image_processor=ip, tokenizer=tok, video_processor=None,
                                           num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
                                           vision_feature_select_strategy="full",
                                           vision_aspect_ratio=model.config.vision_aspect_ratio,
                                           chat_template=checkpoint_chat_template(id_or_path, tok))
        return cls(model, proc, name=str(id_or_path), dtype=dtype, device=device,
                   attn_implementation=attn_implementation)

    def unavailable_signal(self, req: SignalRequest) -> str | None:
        if req.kind == "vision.attention_received":
            return (f"signal {req.kind!r} (read at {req.site}) is not available for LLaVA-OneVision: the adapter does "
                    f"not capture SigLIP's attention maps (only hidden states); HiPrune has no OneVision code")
        if req.kind.startswith("vision.") and req.kind not in self.supported_signals:
            return (f"signal {req.kind!r} (read at {req.site}) is not available for LLaVA-OneVision: its SigLIP tower "
                    f"has no CLS token")
        return super().unavailable_signal(req)

    def tiled(self, enc, image: int) -> bool:
        """The stock model tiles an image only when it is alone in its prompt (a prompt of several
        images gets each one's base crop and a newline: `batch_num_images`)."""
        counts = enc.extras.get("images_per_sample")
        if counts is None:
            return True
        at = 0
        for n in counts:
            if image < at + n:
                return n == 1
            at += n
        return True

    def encode(self, images: list, prompts: list[str]):
        enc = super().encode(images, prompts)
        counts = enc.extras.get("images_per_sample")
        if counts is not None:  # the stock model's own argument for this (its forward takes it too)
            enc.vision_inputs["batch_num_images"] = torch.tensor(counts)
        return enc

    def pack(self, per_image: list[torch.Tensor], sizes: torch.Tensor) -> list[torch.Tensor]:
        rows, _ = self.model.model.pack_image_features(per_image, sizes, image_newline=self.model.model.image_newline,
                                                       vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return rows

    def resized(self, size_hw: list[int]) -> tuple[int, int] | None:
        """anyres_max_N: the cut canvas is interpolated when it holds over 1.1^2 x N crops of tokens."""
        from ..family_geometries import unpad_window

        th, tw = self.tiles_of(size_hw)
        h, w = self.grid
        if th * tw == 0:
            return None
        _, _, rows, cols = unpad_window((size_hw[0], size_hw[1]), (th * h, tw * w))
        most = int(str(self.model.config.vision_aspect_ratio).removeprefix("anyres_max_"))  # the stock strip()s it
        ratio = math.sqrt(rows * cols / (most * h * h))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else None

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> Any:
        start, n = run.vision["crop_rows"][b]
        hs = run.vision["hidden_states"]
        if req.kind == "vision.hidden":
            return CropSignals([hs[self._vision_layer(req)][start + c] for c in range(n)])
        if req.kind == "vision.hidden_mean":
            sel = hs[slice(req.arg("start"), req.arg("stop"))]
            mean = torch.stack([h[start:start + n] for h in sel]).float().mean(0).to(sel[0].dtype)
            return CropSignals(list(mean))
        raise RunError(f"the llava_onevision adapter cannot give signal {req.kind}")
