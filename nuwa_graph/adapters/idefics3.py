"""The Idefics3 / SmolVLM adapter (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`:
SigLIP without CLS + pixel shuffle + a linear connector + Llama / SmolLM2, 1-D RoPE).

With image splitting on, the image processor resizes an image, cuts it into rows x cols
square tiles and adds the whole image at one tile's size (the global image) LAST; each of these
crops is one SigLIP pass whose patch grid goes through a pixel shuffle of `scale_factor` s, so
one stream token = one s x s patch unit (the patch rows concatenated row-major, the stock
`pixel_shuffle`; InternVL's 2x2 unit for s = 2). Unlike every other family, each crop's tokens
are their own RUN in the prompt, with text between the runs:

    <fake_token_around_image><row_1_col_1><image>*T <fake_token_around_image><row_1_col_2><image>*T \\n
    ...                                                                                            \\n
    \\n<fake_token_around_image><global-img><image>*T<fake_token_around_image>

(an image small enough for one tile is the global run alone). The layout (layout.py
`SampleLayout`) holds every run as a visual block, so the text between tiles is kept, moved
as text is moved between images (runs.py `place_runs`); the GEOMETRY holds one block per IMAGE:
its tiles and its global image are the parts of one Geometry (`tiled_geometry`: a `tile` part
per tile, the `thumbnail` part last, as InternVL's), so `per: image` counts a budget over the
whole image, tiles and global together, and spatial nodes run per tile (`per: part`).
`prompt_geometry` tells the layout which run each id belongs to (every crop is one run).

Positions are the stock model's 1-D ones; a position plan is applied per run (`visual_positions`):
PESP keeps each kept token's original position, PERC numbers the kept tokens of each run
contiguously from the run's start (with the text compacted after it: what feeding the pruned
sequence to the stock model does), RPME stretches each run's kept tokens over that run's range.

Vision signals come per crop (`CropSignals`), over the crop's units: `vision.hidden(layer)` /
`vision.hidden_mean` = unit rows (n, s^2 x d_vision), the space the connector's projection takes
(`hidden_states` has depth + 1 entries; the LAST one is the tower's output after its
post-LayerNorm, the features the connector takes, so layer -1 rows project as the stock ones);
`vision.attention_received(layer, queries=sum|mean)` = the attention each patch receives at
encoder layer `layer` (head mean, summed or averaged over every query of its crop), then the
mean over the s^2 patches of each unit. No CLS signal (SigLIP has none).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..family_geometries import tiled_geometry
from ..part_views import CropSignals
from ..positions import rpme_offsets
from ..prompt_geometry import prompt_geometry
from ..signals import SignalRequest
from ..types import Geometry, PositionPlan
from .base import LLM_SIGNALS, AdapterRun, Encoded, VisionOut, load_checkpoint, register_adapter
from .conversation import template_turn, token_id, user_content
from .image_runs import flatten_images, image_runs
from .layout import SampleLayout
from .llava import LlavaAdapter, attention_columns
from .processors import checkpoint_chat_template

END_OF_UTTERANCE = "<end_of_utterance>"
DEFAULT_TEMPLATE = "<|im_start|>User:{image}{prompt}<end_of_utterance>\nAssistant:"  # SmolVLM's chat format


def idefics3_processor(model_type: str, image_processor, tokenizer, image_seq_len: int, chat_template=None):
    """The stock processor of the model type (SmolVLMProcessor, which needs the `num2words`
    package, with `video_processor=None` accepted; Idefics3Processor), PIL image processing."""
    if model_type == "smolvlm":
        from transformers import SmolVLMProcessor

        from .processors import without_video

        return without_video(SmolVLMProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=None, image_seq_len=image_seq_len,
                                               chat_template=chat_template)
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=chat_template)


@register_adapter
class Idefics3Adapter(LlavaAdapter):
    """Idefics3 / SmolVLM: an image = tiles + a global image, each crop its own run in the prompt."""

    family = "idefics3"
    family_group = ""  # its own group: SigLIP units, no CLS, tiles as separate runs
    has_cls = False
    model_types = ("idefics3", "smolvlm")  # type: ignore[assignment]  # (LlavaAdapter infers a 1-tuple)
    official_dtype = "bfloat16"
    official_dtype_source = ("the SmolVLM / Idefics3 model cards (HuggingFaceTB/SmolVLM-Instruct, "
                             "HuggingFaceM4/Idefics3-8B-Llama3: torch_dtype=torch.bfloat16)")
    supported_signals = frozenset({"vision.hidden", "vision.hidden_mean", "vision.attention_received"}) | LLM_SIGNALS

    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> Idefics3Adapter:
        from transformers import AutoConfig, AutoTokenizer

        model_type = AutoConfig.from_pretrained(id_or_path).model_type
        if model_type == "smolvlm":
            from transformers import SmolVLMForConditionalGeneration as Model
            from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Images
        else:
            from transformers import Idefics3ForConditionalGeneration as Model
            from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images
        model, device = load_checkpoint(Model, id_or_path, dtype, device, device_map, attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        tok.padding_side = "left"
        proc = idefics3_processor(model_type, Images.from_pretrained(id_or_path), tok, cls.units_per_crop(model.config),
                                  checkpoint_chat_template(id_or_path, tok))
        return cls(model, proc, name=str(id_or_path), dtype=dtype, device=device,
                   attn_implementation=attn_implementation)

    # ---- modules and shapes --------------------------------------------------------------
    def text_model(self) -> nn.Module:
        return self.model.model.text_model

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower().encoder.layers

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.connector.modality_projection(x)

    @staticmethod
    def units_per_crop(config) -> int:
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size) // int(config.scale_factor)
        return side * side

    @property
    def grid(self) -> tuple[int, int]:
        """The unit grid of one crop (8 x 8 for SmolVLM's 512 px crops of 16 px patches, shuffle 4)."""
        cfg = self.model.config
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size) // int(cfg.scale_factor)
        return (side, side)

    def model_variables(self) -> dict[str, Any]:
        n = self.grid[0] * self.grid[1]
        ip = self.processor.image_processor
        most = 1
        if getattr(ip, "do_image_splitting", False):  # the most tiles a side takes: longest edge / tile size
            side = -(-int(ip.size["longest_edge"]) // int(ip.max_image_size["longest_edge"]))
            most = side * side + 1 if side > 1 else 1
        out = {**super().model_variables(), "crops": most, "crop_tokens": n, "visual_tokens": most * n,
               "clip_text": False}
        out.pop("grid_tokens")  # the token count depends on the image: a budget is a count
        return out

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        """(C, n_patches, c) raster patch rows -> (C, n_units, s^2 c) unit rows, by the stock pixel shuffle."""
        return self.model.model.connector.pixel_shuffle(x, self.model.config.scale_factor)

    # ---- inputs --------------------------------------------------------------------------
    def _template(self) -> str | None:
        return getattr(self.processor, "chat_template", None)

    def format_prompt(self, prompt: str, images: int = 1) -> str:
        """A prompt holding `<image>` is used as it is; a question gets the checkpoint's chat
        template with `images` images before it (SmolVLM's `User:` / `Assistant:` form without one)."""
        if self.processor.image_token in prompt:
            return prompt
        if self._template():
            msg = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        return DEFAULT_TEMPLATE.format(image=self.processor.image_token * images, prompt=prompt)

    def with_placeholders(self, question: str) -> str:
        """A question with `<image>` placeholders inside one user turn of the chat template
        (SmolVLM's form without one), each image where its placeholder is."""
        if self._template():
            return self.processor.apply_chat_template([{"role": "user", "content": user_content(question)}],
                                                      add_generation_prompt=True, tokenize=False)
        return DEFAULT_TEMPLATE.format(image="", prompt=question.replace("<image>", self.processor.image_token))

    def turn_text(self, question: str) -> str:
        """A later user turn in the format of `format_prompt`: read off the chat template
        (conversation.template_turn), else SmolVLM's form after `answer<end_of_utterance>`."""
        if self._template():
            return template_turn(self.processor)[0].replace("{question}", question)
        return f"\nUser:{question}{END_OF_UTTERANCE}\nAssistant:"

    def turn_end_id(self) -> int:
        end = token_id(self._tokenizer(), template_turn(self.processor)[1] if self._template() else END_OF_UTTERANCE)
        return end if end is not None else super().turn_end_id()

    def tiles_of(self, size_hw: tuple[int, int]) -> tuple[int, int]:
        """(tile rows, tile cols) the image processor cuts an image of (height, width) pixels
        into; (0, 0): no split, the global image alone."""
        _, rows, cols = self.processor.image_processor.get_number_of_image_patches(*size_hw)
        return int(rows), int(cols)

    def encode(self, images: list, prompts: list[str]) -> Encoded:
        flat, per_prompt = flatten_images(images)
        texts = [self.format_prompt(p, n) for p, n in zip(prompts, per_prompt or [1] * len(prompts))]
        self.processor.tokenizer.padding_side = "left"
        counts = per_prompt or [1] * len(prompts)
        nested = [flat[sum(counts[:b]):sum(counts[:b + 1])] for b in range(len(counts))]  # the images of each prompt
        enc = self.processor(images=nested, text=texts, return_tensors="pt", padding=True)
        tiles = [self.tiles_of((im.size[1], im.size[0])) for im in flat]
        crops = [r * c + 1 for r, c in tiles]
        extras: dict[str, Any] = {"tiles": tiles, "crops": crops}
        if per_prompt is not None:
            extras["images_per_sample"] = per_prompt
        vision = {"pixel_values": enc["pixel_values"], "pixel_attention_mask": enc["pixel_attention_mask"]}
        return Encoded(enc["input_ids"], enc["attention_mask"], vision, texts, extras)

    def split_sample(self, enc: Encoded, b: int) -> SampleLayout:
        """Every crop's run of `<image>` is a visual block of the layout (the text between them stays text)."""
        ids = enc.input_ids[b][enc.attention_mask[b].bool()]
        runs = image_runs(ids == self.image_token_id)
        crops = [enc.extras["crops"][i] for i in self._images_of(enc, b)]
        T = self.grid[0] * self.grid[1]
        if len(runs) != sum(crops) or any(e - s != T for s, e in runs):
            raise RunError(f"sample {b}: the prompt has {len(runs)} image runs of {[e - s for s, e in runs]} tokens, "
                           f"but its images' tiles give {sum(crops)} crops of {T} tokens ({crops})")
        return SampleLayout.of(ids, torch.arange(ids.numel())[None], runs)

    @staticmethod
    def _images_of(enc: Encoded, b: int) -> list[int]:
        counts = enc.extras.get("images_per_sample")
        if counts is None:
            return [b]
        return list(range(sum(counts[:b]), sum(counts[:b + 1])))

    # ---- geometry ------------------------------------------------------------------------
    def geometry(self, run: AdapterRun, b: int) -> Geometry:
        return self.image_geometries(run, b)[0]

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        out, first = [], 0
        lay = run.layouts[b]
        for i in self.image_indices(run, b):
            rows, cols = run.enc.extras["tiles"][i]
            n_tiles = rows * cols
            start = int(lay.images[first].pos[0, 0])
            out.append(tiled_geometry(self.grid, max(n_tiles, 1), n_tiles > 0, start,
                                      layout=(rows, cols) if n_tiles else None))
            first += n_tiles + 1
        return out

    def prompt_geometry(self, run: AdapterRun, b: int) -> Geometry:
        """The images' geometries in one id space; the layout learns the RUN of every id (crop
        k of the prompt, counted across its images, is run k)."""
        geom = prompt_geometry(self.image_geometries(run, b))
        lay = run.layouts[b]
        if len(geom.crops) != len(lay.images) or geom.n_tokens != lay.n_image:
            raise RunError(f"sample {b}: the prompt has {len(lay.images)} image runs ({lay.n_image} tokens) but its "
                           f"geometry gives {len(geom.crops)} crops ({geom.describe()})")
        T = self.grid[0] * self.grid[1]
        N, C = geom.n_tokens, len(geom.crops)
        table = torch.empty(geom.id_space, dtype=torch.long, device="cpu")
        table[:N] = torch.arange(N, device="cpu") // T
        table[N:] = torch.arange(geom.id_space - N, device="cpu") % max(C, 1)  # a crop's CLS and pooled ids: its run
        if geom.vision_only:
            raise RunError("Idefics3: crops cut no cells away; a vision-only id has no run")
        lay.id_blocks = table if len(lay.images) > 1 else None
        return geom

    def visual_positions(self, layout: SampleLayout, ids: torch.Tensor, plan: PositionPlan | None) -> torch.Tensor:
        """1-D positions of one run's kept tokens (`ids` counted from the run's first token): the
        plan's policy applied within the run (module docstring); None: contiguous."""
        s = layout.images[0].pos[:, :1]
        if plan is None or plan.policy == "perc":
            return s + torch.arange(ids.numel())[None]
        local = ids.long().clamp(min=0)
        if plan.policy == "pesp":
            return s + local[None]
        if plan.policy == "rpme":
            order = torch.argsort(local, stable=True)
            offs = torch.empty_like(local)
            offs[order] = rpme_offsets(local[order], layout.images[0].n - 1)
            return s + offs[None]
        raise RunError(f"Idefics3: position policy {plan.policy!r} is not known per run (pesp, perc, rpme)")

    # ---- signals ---------------------------------------------------------------------------
    def check_request(self, req: SignalRequest) -> str | None:
        if req.kind == "vision.attention_received" and req.arg("queries", "sum") not in ("sum", "mean"):
            return f"signal {req.key}: queries must be sum or mean"
        return super().check_request(req)

    def on_vision_attention(self, run: AdapterRun, layer: int, module: nn.Module, query: torch.Tensor,
                            key: torch.Tensor, kwargs: dict) -> None:
        if "vision.attention_received" not in run.vision.get("attn_layers", {}).get(layer, ()):
            return
        scaling = kwargs.get("scaling", getattr(module, "scale", query.shape[-1] ** -0.5))
        cols = torch.stack([attention_columns(query[c], key[c], scaling) for c in range(query.shape[0])])
        run.vision.setdefault("attn", {})[("received", layer)] = cols  # (crops, 2, n_patches): sum, mean

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> Any:
        start, n = run.vision["crop_rows"][b]
        hs = run.vision["hidden_states"]
        if req.kind == "vision.hidden":
            return CropSignals(list(self.to_units(hs[self._vision_layer(req)][start:start + n])))
        if req.kind == "vision.hidden_mean":
            sel = hs[slice(req.arg("start"), req.arg("stop"))]
            rows = torch.stack([h[start:start + n].to(self.device) for h in sel]).float().mean(0).to(sel[0].dtype)
            return CropSignals(list(self.to_units(rows)))
        if req.kind == "vision.attention_received":
            cols = run.vision["attn"][("received", self._vision_layer(req))][start:start + n]
            row = cols[:, 0 if req.arg("queries", "sum") == "sum" else 1]  # (crops, n_patches)
            units = self.to_units(row[:, :, None]).mean(-1)  # the mean over each unit's patches
            return CropSignals(list(units))
        raise RunError(f"the idefics3 adapter cannot give signal {req.kind}")

    # ---- the vision pass -------------------------------------------------------------------
    def vision_forward(self, run: AdapterRun) -> VisionOut:
        attn_layers: dict[int, set[str]] = {}
        for req in run.ex.requests():
            if req.kind == "vision.attention_received":
                attn_layers.setdefault(self._vision_layer(req), set()).add(req.kind)
        run.vision["attn_layers"] = attn_layers
        counts = run.enc.extras["crops"]
        groups = [self.image_indices(run, b) for b in range(run.B)]
        per_sample = [sum(counts[i] for i in g) for g in groups]
        pix = run.enc.vision_inputs["pixel_values"]  # (B, most crops, 3, H, W), zero crops pad a sample
        mask = run.enc.vision_inputs["pixel_attention_mask"]
        mask = torch.cat([mask[b, :n] for b, n in enumerate(per_sample)])  # on the host, as the processor gave it
        if not bool(mask.all()):  # the stock patch mask is then all True, what the tower makes by itself
            raise RunError("Idefics3: a crop has padded pixels; the image processor makes square crops of "
                           "max_image_size (keep do_resize and do_image_splitting as the checkpoint sets them)")
        pix = torch.cat([pix[b, :n] for b, n in enumerate(per_sample)]).to(self.device, self.dtype)
        out = self.vision_tower()(pixel_values=pix, output_hidden_states=True, return_dict=True)
        # the last entry: the tower's output after its post-LayerNorm, what the connector takes
        hs = (*out.hidden_states[:-1], out.last_hidden_state)
        run.vision["hidden_states"] = hs
        starts = [sum(per_sample[:b]) for b in range(run.B)]
        run.vision["crop_rows"] = list(zip(starts, per_sample))
        units = self.to_units(out.last_hidden_state)  # (crops, T, s^2 d)

        def projected() -> list[torch.Tensor]:
            proj = self.project(units)  # one batch over every crop, as the stock connector
            return [proj[s:s + n].reshape(-1, proj.shape[-1]) for s, n in run.vision["crop_rows"]]

        return VisionOut(tokens=[units[s:s + n].reshape(-1, units.shape[-1]) for s, n in run.vision["crop_rows"]],
                         projected=projected, cls=[None] * run.B)
