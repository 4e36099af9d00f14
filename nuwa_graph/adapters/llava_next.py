"""The LLaVA-NeXT adapter (`LlavaNextForConditionalGeneration`, v1.6: AnyRes tiles + CLIP + Llama/Mistral).

The image block is what the stock model packs (`pack_image_features`): the base crop (the
whole image squashed to one crop) as a grid, then the tiles stitched onto one canvas, cut to
the unpad window, with the learned `image_newline` after every canvas row. Its Geometry has
three parts (nuwa_graph/geometry.py: `anyres_geometry`): `grid` (crop 0), `tiles` (crops
1.., row-major, each placed on the canvas) and `newline` slots. Stream ids are the stock
order, so keep-everything is the stock model bit for bit.

Vision signals come per crop (`CropSignals`, one tensor per crop in that crop's raster order,
CLS first where the signal has it): CLIP runs every crop of an image as one batch row, so
`vision.cls_attention` is each crop's own CLS row. A node reading them runs per crop (its
ids are mapped through the stitching and the unpad cut; cells cut away get ids past the
stream, newline slots have no vision row). Layer indexing is LLaVA-1.5's (llava.py).

Prompts: a plain question gets the checkpoint's chat template (the released -hf checkpoints ship
one: `[INST] ... [/INST]` on Mistral, ChatML on the 34B, Qwen2 chat on OneVision, `USER: ...
ASSISTANT:` on Vicuna), else LLaVA's `USER: <image>` form (the tiny presets have none); later
dialog turns are read off the same template (`conversation.template_turn`), or are LLaVA's where
the template is LLaVA's own format (Vicuna: it puts no end token after an answer, the official
conversation ends one with `</s>`).

Budgets: papers count LLaVA-NeXT budgets over the 5 crops of a 2x2 image (640 / 320 / 160 =
5 x 128 / 64 / 32); the model variables say `crops` (the most crops the pinpoints give),
`crop_tokens` (one crop's grid) and `visual_tokens` (the most stream tokens of an image).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RunError
from ..family_geometries import anyres_geometry
from ..part_views import CropSignals
from ..signals import SignalRequest
from ..types import Geometry
from .base import AdapterRun, Encoded, VisionOut, load_checkpoint, register_adapter
from .conversation import template_turn, token_id, user_content
from .llava import ATTN_KINDS, LlavaAdapter


def pinpoint_tiles(pinpoints: list, size: int) -> list[tuple[int, int]]:
    """(tile rows, tile cols) of every pinpoint resolution (pinpoints as (height, width), HF's convention)."""
    return [(int(h) // size, int(w) // size) for h, w in pinpoints]


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`llava_next`): AnyRes tiles as parts; vision signals per crop."""

    family = "llava_next"
    family_group = "llava"  # CLIP crops with a CLS each + projector + LLM: `family_files` keys `llava` route it too
    model_types = ("llava_next",)
    official_dtype = "float16"
    official_dtype_source = ("LLaVA-NeXT's official code (haotian-liu/LLaVA load_pretrained_model, float16), which "
                             "the pruning papers' LLaVA-NeXT results run on")

    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> LlavaNextAdapter:
        from transformers import AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        model, device = load_checkpoint(LlavaNextForConditionalGeneration, id_or_path, dtype, device, device_map,
                                        attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        ip = LlavaNextImageProcessorPil.from_pretrained(id_or_path)  # PIL: no torchvision needed
        vc = model.config.vision_config
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=vc.patch_size,
                                  vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1, chat_template=getattr(tok, "chat_template", None))
        return cls(model, proc, name=str(id_or_path), dtype=dtype, device=device,
                   attn_implementation=attn_implementation)

    # ---- prompts ---------------------------------------------------------------------------
    def _template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.processor.tokenizer, "chat_template",
                                                                         None)

    def format_prompt(self, prompt: str, images: int = 1) -> str:
        """A prompt with `<image>` is used as it is; a plain question gets the checkpoint's chat
        template with `images` images before it, else LLaVA's `USER: <image>` form."""
        if "<image>" in prompt:
            return prompt
        if self._template():
            msg = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        return super().format_prompt(prompt, images)

    def with_placeholders(self, question: str) -> str:
        if not self._template():
            return super().with_placeholders(question)
        return self.processor.apply_chat_template([{"role": "user", "content": user_content(question)}],
                                                  add_generation_prompt=True, tokenize=False)

    def _template_turn(self) -> tuple[str, str] | None:
        """(a later user turn, the token ending an answer) read off the chat template; None:
        LLaVA's turns (no template, or one whose prompt is LLaVA's own format and which ends an
        answer with no special token: Vicuna). Any other template that cannot be continued is
        refused (template_turn's error)."""
        if not self._template():
            return None
        try:
            return template_turn(self.processor)
        except RunError:
            if self.format_prompt("q") == super().format_prompt("q"):
                return None
            raise

    def turn_text(self, question: str) -> str:
        """A later user turn in the format of `format_prompt`."""
        turn = self._template_turn()
        return super().turn_text(question) if turn is None else turn[0].replace("{question}", question)

    def turn_end_id(self) -> int:
        turn = self._template_turn()
        end = None if turn is None else token_id(self._tokenizer(), turn[1])
        return super().turn_end_id() if end is None else end

    # ---- geometry --------------------------------------------------------------------------
    def tiles_of(self, image_size_hw: Any) -> tuple[int, int]:
        """(tile rows, tile cols) the stock model uses for an image of (height, width) pixels."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        nph, npw = get_anyres_image_grid_shape(image_size_hw, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        return int(nph), int(npw)

    def resized(self, size_hw: list[int]) -> tuple[int, int] | None:
        """The tile canvas's shape after the family resizes it in LLM space (None: it does not)."""
        return None

    def model_variables(self) -> dict[str, Any]:
        h, w = self.grid
        tiles = pinpoint_tiles(self.model.config.image_grid_pinpoints, self.model.config.vision_config.image_size)
        most = max(th * tw for th, tw in tiles)
        widest = max(th * h * (tw * w + 1) for th, tw in tiles)  # no unpad: the largest block
        out = {**super().model_variables(), "crops": 1 + most, "crop_tokens": h * w, "visual_tokens": h * w + widest}
        out.pop("grid_tokens")  # the token count depends on the image: a budget is a count (as on Qwen2.5-VL)
        return out

    def tiled(self, enc: Encoded, image: int) -> bool:
        """Whether the stock model cuts image `image` of the batch into tiles (LLaVA-NeXT: always;
        OneVision: only an image alone in its prompt)."""
        return True

    def image_geometry(self, size_hw: list[int], image_start: int = 0, tiled: bool = True) -> Geometry:
        """The geometry of an image of (height, width) pixels, as the stock model packs it
        (not `tiled`: the base crop and one newline)."""
        tiles = self.tiles_of(size_hw) if tiled else (0, 0)
        return anyres_geometry(self.grid, tiles, (size_hw[0], size_hw[1]), image_start,
                               resized=self.resized(size_hw) if tiled else None)

    def image_token_counts(self, enc: Encoded, b: int) -> list[int] | None:
        counts = enc.extras.get("images_per_sample")
        if counts is None:
            return None
        first = sum(counts[:b])
        sizes = enc.vision_inputs["image_sizes"]
        return [self.image_geometry([int(x) for x in sizes[i].tolist()], tiled=self.tiled(enc, i)).n_tokens
                for i in range(first, first + counts[b])]

    def geometry(self, run: AdapterRun, b: int) -> Geometry:
        return self.image_geometries(run, b)[0]

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        out = []
        for i, im in zip(self.image_indices(run, b), run.layouts[b].images):
            size = [int(x) for x in run.enc.vision_inputs["image_sizes"][i].tolist()]
            geom = self.image_geometry(size, int(im.pos[0, 0]), self.tiled(run.enc, i))
            if geom.n_tokens != im.n:
                raise RunError(f"sample {b}: the prompt has {im.n} image tokens but the stock packing of a "
                               f"{size[1]}x{size[0]} image gives {geom.n_tokens} ({geom.describe()})")
            out.append(geom)
        return out

    # ---- inputs --------------------------------------------------------------------------
    def encode(self, images: list, prompts: list[str]) -> Encoded:
        flat, counts, texts = self.texts(images, prompts)
        self.processor.tokenizer.padding_side = "left"
        # nested per prompt: OneVision's processor tells a prompt's several images from that
        nested = flat if counts is None else [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        enc = self.processor(images=nested, text=texts, return_tensors="pt", padding=True)
        return Encoded(enc["input_ids"], enc["attention_mask"],
                       {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}, texts,
                       {} if counts is None else {"images_per_sample": counts})

    # ---- the vision pass -------------------------------------------------------------------
    def crop_counts(self, run: AdapterRun) -> list[int]:
        sizes = run.enc.vision_inputs["image_sizes"]
        return [1 + th * tw if self.tiled(run.enc, i) else 1
                for i, (th, tw) in enumerate(self.tiles_of([int(x) for x in s.tolist()]) for s in sizes)]

    def vision_forward(self, run: AdapterRun) -> VisionOut:
        attn_layers: dict[int, set[str]] = {}
        for req in run.ex.requests():
            if req.kind in ATTN_KINDS:
                attn_layers.setdefault(self._vision_layer(req), set()).add(req.kind)
        run.vision["attn_layers"] = attn_layers
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != self.feature_strategy:
            raise RunError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported "
                           f"({self.family} uses {self.feature_strategy!r})")
        counts = self.crop_counts(run)
        pix = run.enc.vision_inputs["pixel_values"]
        flat = torch.cat([pix[b, :n] for b, n in enumerate(counts)]).to(self.device, self.dtype)
        out = self.vision_tower()(flat, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        run.vision["hidden_states"] = hs
        starts = [sum(counts[:i]) for i in range(len(counts))]
        groups = [self.image_indices(run, b) for b in range(run.B)]
        # per sample: its crops' rows in the tower's batch (its images' crops are consecutive)
        run.vision["crop_rows"] = [(starts[g[0]], sum(counts[i] for i in g)) for g in groups]
        layer = cfg.vision_feature_layer
        feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
        if self.feature_strategy == "default":
            feats = feats[:, 1:]
        sizes = run.enc.vision_inputs["image_sizes"]

        def packed() -> list[torch.Tensor]:
            # exactly the stock get_image_features: one projector batch, split per image, packed
            proj = self.project(feats)
            rows = self.pack(list(torch.split(proj, counts, dim=0)), sizes.to(proj.device))
            return [torch.cat([rows[i] for i in g]) if len(g) > 1 else rows[g[0]] for g in groups]

        per_image = [feats[s:s + n].reshape(-1, feats.shape[-1]) for s, n in zip(starts, counts)]
        return VisionOut(tokens=[torch.cat([per_image[i] for i in g]) if len(g) > 1 else per_image[g[0]]
                                 for g in groups], projected=packed, cls=[None] * run.B)

    feature_strategy = "default"  # CLIP: the CLS row is dropped before the projector

    def pack(self, per_image: list[torch.Tensor], sizes: torch.Tensor) -> list[torch.Tensor]:
        """The stock packing of projected crops into each image's stream rows."""
        rows, _ = self.model.model.pack_image_features(per_image, sizes, self.feature_strategy,
                                                       image_newline=self.model.model.image_newline)
        return rows

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> Any:
        """One tensor per crop of sample b (of each of its images, crops numbered on across them)."""
        start, n = run.vision["crop_rows"][b]
        return CropSignals([self.vision_row_signal(run, req, start + c) for c in range(n)])
