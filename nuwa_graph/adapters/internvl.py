"""The InternVL 3 / 3.5 adapter (`InternVLForConditionalGeneration`: InternViT + pixel shuffle + Qwen2/Qwen3).

An image is 1-12 tiles of the vision tower's input size plus, when there are several, a
thumbnail (the whole image at one tile's size) LAST (GotOcr2 image processing). Each crop is
one CLIP-like pass with a CLS token; its patch grid goes through a 0.5 pixel shuffle, so one
stream token = one 2x2 patch unit (the 4 patch rows concatenated: (2r, 2c), (2r, 2c+1),
(2r+1, 2c), (2r+1, 2c+1), the stock `pixel_shuffle`; the same layout as Qwen's merge unit),
and the stream is the tiles' tokens tile by tile, then the thumbnail's, with no newline.
Geometry: one `tile` part per tile and a `thumbnail` part (nuwa_graph/geometry.py:
`tiled_geometry`); an image of one tile is one grid.

Vision signals come per crop (`CropSignals`), over the crop's stream tokens (its units):
`vision.hidden(layer)` / `vision.hidden_mean` = unit rows (n, 4 x d_vision), the vision space
the projector takes (LayerNorm + MLP on the unit); `vision.cls_attention(layer)` = the CLS
row of that layer's attention (post-softmax over every key), summed over the 4 patches of a
unit (still a distribution over the units), (heads, n); `vision.keys(layer)` = the layer's
keys of the 4 patches concatenated per unit, (heads, n, 4 x head_dim), no CLS row. Not given:
`vision.cls_hidden` and `vision.qk_single_head` (a CLS row cannot go through the unit
projector): VisionZip's and PruMerge+'s files are refused with a hint.

Layer indexing as LLaVA's (`hidden_states` has depth + 1 entries; attention layers 0..depth-1);
the vision layers are `vision_tower.encoder.layer[i].attention`. The LLM (Qwen2.5 for
InternVL3, Qwen3 with QK-norm for InternVL3.5) numbers the sequence 1-D.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..family_geometries import tiled_geometry
from ..part_views import CropSignals
from ..signals import SignalRequest
from ..types import Geometry
from .base import LLM_SIGNALS, AdapterRun, Encoded, VisionOut, load_checkpoint, register_adapter
from .conversation import CHATML_END, CHATML_TURN, token_id
from .image_runs import flatten_images
from .llava import LlavaAdapter
from .processors import checkpoint_chat_template

NO_UNIT_SIGNALS = frozenset({"vision.cls_hidden", "vision.qk_single_head"})


def internvl_processor_class():
    """The stock InternVLProcessor with `video_processor=None` accepted (no torchvision needed)."""
    from transformers import InternVLProcessor

    from .processors import without_video

    return without_video(InternVLProcessor)


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """InternVL 3 / 3.5: tiles and a thumbnail as parts; a CLS per crop; 2x2 patch units."""

    family = "internvl"
    family_group = ""  # its own group (InternVL3 and 3.5 are one family): InternViT units, a CLS per tile
    model_types = ("internvl",)
    official_dtype = "bfloat16"
    official_dtype_source = ("InternVL's official code (OpenGVLab/InternVL internvl_chat load_model_and_tokenizer, "
                             "bfloat16)")
    supported_signals = frozenset({"vision.hidden", "vision.hidden_mean", "vision.cls_attention",
                                   "vision.keys"}) | LLM_SIGNALS
    prompt_template = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> InternVLAdapter:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        model, device = load_checkpoint(InternVLForConditionalGeneration, id_or_path, dtype, device, device_map,
                                        attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        tok.padding_side = "left"
        ip = GotOcr2ImageProcessorPil.from_pretrained(id_or_path)  # PIL: no torchvision needed
        proc = internvl_processor_class()(image_processor=ip, tokenizer=tok, video_processor=None,
                                          image_seq_length=cls.units_per_tile(model.config),
                                          chat_template=checkpoint_chat_template(id_or_path, tok))
        return cls(model, proc, name=str(id_or_path), dtype=dtype, device=device,
                   attn_implementation=attn_implementation)

    # ---- modules and shapes --------------------------------------------------------------
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower().encoder.layer

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.vision_layers()]

    @staticmethod
    def units_per_tile(config) -> int:
        vc = config.vision_config
        side = int(vc.image_size[0]) // int(vc.patch_size[0])
        return int(side * side * config.downsample_ratio ** 2)

    @property
    def grid(self) -> tuple[int, int]:
        """The unit grid of one tile (16 x 16 for 448 px tiles of 14 px patches)."""
        vc = self.model.config.vision_config
        side = int(int(vc.image_size[0]) // int(vc.patch_size[0]) * self.model.config.downsample_ratio)
        return (side, side)

    def model_variables(self) -> dict[str, Any]:
        n = self.grid[0] * self.grid[1]
        most = int(getattr(self.processor.image_processor, "max_patches", 12))
        crops = most + 1 if most > 1 else 1
        out = {**super().model_variables(), "crops": crops, "crop_tokens": n, "visual_tokens": crops * n}
        out.pop("grid_tokens")  # the token count depends on the image: a budget is a count (as on Qwen2.5-VL)
        return out

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_patches, c) raster patch rows -> (B, n_units, 4c) unit rows, by the stock pixel shuffle."""
        B, n, c = x.shape
        side = int(round(n ** 0.5))
        y = self.model.model.pixel_shuffle(x.reshape(B, side, side, c), scale_factor=self.model.config.downsample_ratio)
        return y.reshape(B, -1, y.shape[-1])

    # ---- checks --------------------------------------------------------------------------
    def unavailable_signal(self, req: SignalRequest) -> str | None:
        if req.kind in NO_UNIT_SIGNALS:
            return (f"signal {req.kind!r} (read at {req.site}) is not available for InternVL: its projector takes "
                    f"2x2 patch units, so a CLS row or a single-head patch q/k has no place in the stream")
        return super().unavailable_signal(req)

    # ---- inputs --------------------------------------------------------------------------
    def format_prompt(self, prompt: str, images: int = 1) -> str:
        image = self.processor.image_token
        if image in prompt:
            return prompt
        return self.prompt_template.format(image="\n".join([image] * images), prompt=prompt)

    def with_placeholders(self, question: str) -> str:
        text = question.replace("<image>", self.processor.image_token)
        return self.prompt_template.replace("{image}\n", "").format(prompt=text)

    def turn_text(self, question: str) -> str:
        """A later user turn in InternVL's chat format (ChatML, as its prompt), after `answer<|im_end|>`."""
        return CHATML_TURN.format(question=question)

    def turn_end_id(self) -> int:
        end = token_id(self._tokenizer(), CHATML_END)
        return end if end is not None else super().turn_end_id()

    def tiles_of(self, size_hw: tuple[int, int]) -> tuple[int, int, bool]:
        """(tile rows, tile cols, thumbnail) GotOcr2's processing gives an image of (height, width) pixels."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        if not getattr(ip, "crop_to_patches", False) or int(ip.max_patches) <= 1:
            return 1, 1, False
        size = ip.size
        cols, rows = get_optimal_tiled_canvas(size_hw, (size["height"], size["width"]), int(ip.min_patches),
                                              int(ip.max_patches))
        return int(rows), int(cols), rows * cols > 1

    def encode(self, images: list, prompts: list[str]) -> Encoded:
        flat, per_prompt = flatten_images(images)
        texts = [self.format_prompt(p, n) for p, n in zip(prompts, per_prompt or [1] * len(prompts))]
        self.processor.tokenizer.padding_side = "left"
        enc = self.processor(images=flat, text=texts, return_tensors="pt", padding=True)
        tiles = [self.tiles_of((im.size[1], im.size[0])) for im in flat]
        counts = [r * c + int(t) for r, c, t in tiles]
        if sum(counts) != enc["pixel_values"].shape[0]:
            raise RunError(f"InternVL: {enc['pixel_values'].shape[0]} crops were made for {counts} expected")
        extras: dict[str, Any] = {"tiles": tiles, "crops": counts}
        if per_prompt is not None:
            extras["images_per_sample"] = per_prompt
        return Encoded(enc["input_ids"], enc["attention_mask"], {"pixel_values": enc["pixel_values"]}, texts, extras)

    def geometry(self, run: AdapterRun, b: int) -> Geometry:
        return self.image_geometries(run, b)[0]

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        out = []
        for i, im in zip(self.image_indices(run, b), run.layouts[b].images):
            rows, cols, thumb = run.enc.extras["tiles"][i]
            geom = tiled_geometry(self.grid, rows * cols, thumb, int(im.pos[0, 0]), layout=(rows, cols))
            if geom.n_tokens != im.n:
                raise RunError(f"sample {b}: the prompt has {im.n} image tokens but {rows}x{cols} tiles"
                               f"{' and a thumbnail' if thumb else ''} give {geom.n_tokens}")
            out.append(geom)
        return out

    # ---- the vision pass -------------------------------------------------------------------
    def vision_forward(self, run: AdapterRun) -> VisionOut:
        attn_layers: dict[int, set[str]] = {}
        for req in run.ex.requests():
            if req.kind in ("vision.cls_attention", "vision.keys"):
                attn_layers.setdefault(self._vision_layer(req), set()).add(req.kind)
        run.vision["attn_layers"] = attn_layers
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise RunError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported")
        counts = run.enc.extras["crops"]
        pix = run.enc.vision_inputs["pixel_values"].to(self.device, self.dtype)
        out = self.vision_tower()(pixel_values=pix, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        run.vision["hidden_states"] = hs
        starts = [sum(counts[:i]) for i in range(len(counts))]
        groups = [self.image_indices(run, b) for b in range(run.B)]
        # per sample: its crops' rows in the tower's batch (its images' crops are consecutive)
        run.vision["crop_rows"] = [(starts[g[0]], sum(counts[i] for i in g)) for g in groups]
        layer = cfg.vision_feature_layer
        feats = out.last_hidden_state if layer == -1 else hs[layer]
        units = self.to_units(feats[:, 1:])  # (crops, n_units, 4 d)

        rows = run.vision["crop_rows"]

        def projected() -> list[torch.Tensor]:
            proj = self.project(units)  # one batch over every crop, as the stock get_image_features
            return [proj[s:s + n].reshape(-1, proj.shape[-1]) for s, n in rows]

        return VisionOut(tokens=[units[s:s + n].reshape(-1, units.shape[-1]) for s, n in rows],
                         projected=projected, cls=[None] * run.B)

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> Any:
        start, n = run.vision["crop_rows"][b]
        hs = run.vision["hidden_states"]
        if req.kind in ("vision.hidden", "vision.hidden_mean"):
            if req.kind == "vision.hidden":
                rows = hs[self._vision_layer(req)][start:start + n, 1:]
            else:
                sel = hs[slice(req.arg("start"), req.arg("stop"))]
                rows = torch.stack([h[start:start + n, 1:].to(self.device) for h in sel]).float().mean(0).to(sel[0].dtype)
            return CropSignals(list(self.to_units(rows)))
        L = self._vision_layer(req)
        attn = run.vision.get("attn", {})
        if req.kind == "vision.cls_attention":
            a = attn[("cls_attention", L)][start:start + n]  # (crops, heads, n_patches)
            C, H, P = a.shape
            u = self.to_units(a.reshape(C * H, P, 1)).sum(-1)
            return CropSignals(list(u.reshape(C, H, -1)))
        if req.kind == "vision.keys":
            k = attn[("keys", L)][start:start + n, :, 1:]  # (crops, heads, n_patches, hd)
            C, H, P, hd = k.shape
            u = self.to_units(k.reshape(C * H, P, hd))
            return CropSignals(list(u.reshape(C, H, u.shape[1], -1)))
        raise RunError(f"the internvl adapter cannot give signal {req.kind}")
