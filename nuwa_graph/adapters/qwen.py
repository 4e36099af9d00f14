"""The Qwen2.5-VL adapter (`Qwen2_5_VLForConditionalGeneration`), and the base of the Qwen-VL
line (Qwen2-VL and Qwen3-VL in qwen_vl.py); its tiny preset is in tiny.py.

Family hooks of the line (overridden by the other generations): `window_index(grid_thw)`
(the tower's order of merge units: windows on Qwen2.5-VL, raster on Qwen2-VL / Qwen3-VL),
`merge_units(x)` (vision-space merge units -> LLM space through the patch merger, whatever
its module names), `after_vision(run, out, vg)` (family outputs of the tower: DeepStack).

Geometry. The grid a pipeline sees is the MERGED grid (after the 2x2 patch merger): one
token per merge unit, raster order, ids = arange(rows * cols). `image_start` is the position
of the first `<|image_pad|>` in the sample's own (unpadded) sequence. One image per prompt.

The vision tower runs in WINDOW order: `get_vision_window_index` permutes the merge units
so that each attention window is contiguous (4 patches of a merge unit stay together), and
the stock model restores raster order only after the merger. Every vision signal below is
reordered to raster order (unless a request asks for `order: window`).

Vision signals (all over the merged grid, read at site `vision`):
- `vision.attention_received(layer)`: attention each patch receives at vision block `layer`
  (0-based; negative counts from the end), mean over heads, summed over queries, then the
  mean over the 4 patches of each merge unit, reordered to raster. It is computed from the
  block's own q and k (after its rotary embedding) inside the registered attention function,
  segment by segment, exactly where the model attends: at a window-attention block each
  patch only receives attention from the queries of its own window (so values are sums
  over a window, not over the image); at a full-attention block (`fullatt_block_indexes`)
  they are sums over the whole image. Query rows are processed in chunks (no S x S map kept).
  Nüwa's Qwen code reads the last block (`layer: -1`), a full-attention block.
- `vision.hidden(layer)`: hidden_states[layer] in the HF convention (0 = patch embeddings,
  i = output of block i-1), one row per merge unit: the 4 patch rows concatenated, i.e. the
  merger's input layout (n, 4 * d_vision). This is the "vision space" of Qwen: Tokens in
  space `vision` of that width are projected by the merger (ln_q per patch + MLP).
- `vision.hidden_mean(start, stop)`: the mean of hidden_states[start:stop], same layout.
  Optional request arg `merger: true` passes the mean through the patch merger (n, d_llm).
- `vision.merged_hidden_mean(start, stop)`: the patch merger applied to the mean of the
  OUTPUTS of blocks start..stop-1 (= hidden_states[start+1:stop+1]); (n, d_llm). Nüwa's Qwen
  similarity features (blocks 7..23). The official code leaves these in window order (most
  likely a bug, methods.md); we reorder to raster by default; a request arg
  `order: window` reproduces the official layout (rows in window order, ids still 0..n-1).
- Not available (Qwen has no CLS token): `vision.cls_attention`, `vision.cls_hidden`,
  `vision.keys`, `vision.qk_single_head`. A pipeline that needs one is refused before any
  forward pass, with a pointer to `vision.attention_received`.
LLM-side signals (`llm.attention`, `llm.hidden`, `pre_llm.*`, `external`) come from the base.

Positions (M-RoPE). The full sequence's 3D ids (3, L) come from `get_rope_index` per sample
(a still image: (s, s + row, s + col); text after the image continues at s + max(rows, cols)).
Explicit position ids are always passed, so the model's cached `rope_deltas` never matter.
A PositionPlan is turned into 3D ids by `visual_positions_3d` (qwen_geometry.py):
- PESP: each kept token keeps its own 3D id; text keeps its unpruned ids;
- PERC: kept token j gets s + j on all three axes; text follows compactly;
- RPME: per axis (t, row, col) the kept set is stretched over the image's full range on that
  axis with the formula of `nuwa_graph.positions.rpme_offsets` applied to the axis' distinct
  values (new[0] = 0; new[j] = ceil(u[j] * span / u[-1])); text keeps its unpruned ids;
- no plan before the LLM: an unchanged block keeps the model's ids, a changed one is
  numbered contiguously (PERC); no plan at `llm.K`: current ids are kept (base).
Decoding continues from the last prompt position + 1 on every axis (what the stock model
does with its rope deltas).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..part_views import CropSignals
from ..signals import SignalRequest
from ..types import Geometry, PositionPlan
from .base import LLM_SIGNALS, AdapterRun, Encoded, SampleLayout, VisionOut, VLMAdapter, load_checkpoint, register_adapter
from .conversation import CHATML_END, CHATML_TURN, token_id
from .image_runs import flatten_images
from .qwen_geometry import VisionGeometry, attention_received, block_index, hidden_index, hidden_indices, visual_positions_3d
from .qwen_processing import _processor_class, qwen_processor

#: signals that need a CLS token; Qwen2.5-VL's vision tower has none
NO_CLS_SIGNALS = ("vision.cls_attention", "vision.cls_hidden", "vision.keys", "vision.qk_single_head")
QWEN_VISION_SIGNALS = frozenset({"vision.attention_received", "vision.hidden", "vision.hidden_mean",
                                 "vision.merged_hidden_mean"})

# --- the adapter ------------------------------------------------------------------------------
@register_adapter
class QwenAdapter(VLMAdapter):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`); see the module docstring."""

    family = "qwen2_5_vl"
    family_group = "qwen-vl"
    model_types = ("qwen2_5_vl",)
    supported_signals = LLM_SIGNALS | QWEN_VISION_SIGNALS
    display_name = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"  # transformers class of the checkpoint
    processor_class = "Qwen2_5_VLProcessor"
    #: the native chat template's system message (None: the template adds none)
    system_prompt: str | None = "You are a helpful assistant."
    official_dtype = "bfloat16"
    official_dtype_source = "Qwen2.5-VL's official examples (and its checkpoints' torch_dtype)"

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> QwenAdapter:
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model, device = load_checkpoint(getattr(transformers, cls.model_class), id_or_path, dtype, device, device_map,
                                        attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(id_or_path)
        processor = _processor_class(cls.processor_class)(image_processor=image_processor, tokenizer=tok,
                                                          video_processor=None,
                                                          chat_template=getattr(tok, "chat_template", None))
        return cls(model, processor, name=str(id_or_path), dtype=dtype, device=device,
                   attn_implementation=attn_implementation)

    # ---- model parts -------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def llm_position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        return pos  # (3, B, L): M-RoPE takes all three rows

    def vision_attention_modules(self) -> list[nn.Module]:
        return [blk.attn for blk in self.visual.blocks]

    @classmethod
    def prompt(cls, question: str, images: int = 1) -> str:
        """The family's native chat prompt with the image(s) before the question (Qwen2-VL and
        Qwen2.5-VL: with their default system message; Qwen3-VL: none)."""
        system = f"<|im_start|>system\n{cls.system_prompt}<|im_end|>\n" if cls.system_prompt is not None else ""
        return (f"{system}<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * images
                + f"{question}<|im_end|>\n<|im_start|>assistant\n")

    def with_placeholders(self, question: str) -> str:
        return self.prompt(question.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>"), images=0)

    def turn_text(self, question: str) -> str:
        """A later user turn of the chat template, after `answer<|im_end|>`."""
        return CHATML_TURN.format(question=question)

    def turn_end_id(self) -> int:
        end = token_id(self._tokenizer(), CHATML_END)
        return end if end is not None else super().turn_end_id()

    # ---- checks -------------------------------------------------------------------------
    def unavailable_signal(self, req: SignalRequest) -> str | None:
        if req.kind in NO_CLS_SIGNALS:
            return (f"signal {req.kind!r} (read at {req.site}) needs a CLS token, and {self.display_name}'s vision "
                    f"tower has none; use 'vision.attention_received' (attention each merged token receives at a vision "
                    f"block, e.g. layer -1 as Nüwa's Qwen code does) as the saliency signal instead")
        if req.kind in ("vision.clip_embeds", "vision.clip_text_embeds"):
            return (f"signal {req.kind!r} (read at {req.site}) needs a CLIP vision tower with its text tower; "
                    f"{self.display_name}'s has none (CDPruner: --set relevance=llm, the relevance from the LLM's own "
                    f"instruction embeddings, which cdpruner.yaml chooses by itself on this model)")
        return super().unavailable_signal(req)

    def refusal_hint(self, ex) -> str:
        if not any(req.kind in NO_CLS_SIGNALS for req in ex.requests()):
            return super().refusal_hint(ex)
        return (f"\nhint: {ex.pipeline.name} is defined on a CLS token (CLIP-style towers, LLaVA-1.5) and has "
                f"no form for the Qwen-VL models ({self.display_name} here: no CLS token); "
                f"{self.runnable_hint()}")

    def check_request(self, req: SignalRequest) -> str | None:
        if not req.kind.startswith("vision."):
            return None
        depth = len(self.visual.blocks)
        try:
            if req.kind == "vision.attention_received":
                block_index(int(req.arg("layer", -1)), depth)
                if req.arg("queries", "sum") != "sum":
                    return (f"signal {req.key}: on {self.display_name} the attention received is summed over the queries "
                            f"of each attention window (queries: sum), as Nüwa's and HiPrune's Qwen code do")
            else:
                hidden_indices(req, depth)
        except (RunError, TypeError, ValueError) as exc:
            return f"signal {req.key}: {exc}"
        return None

    # ---- inputs --------------------------------------------------------------------------
    def encode(self, images: list, prompts: list[str]) -> Encoded:
        # a plain question gets the chat template with one image block (as LLaVA's adapter does)
        flat, counts = flatten_images(images)
        per_prompt = counts or [1] * len(prompts)
        prompts = [p if "<|image_pad|>" in p else self.prompt(p, n) for p, n in zip(prompts, per_prompt)]
        try:
            enc = self.processor(images=flat, text=list(prompts), return_tensors="pt", padding=True,
                                 padding_side="left")
        except ValueError as exc:
            raise RunError(f"the {self.display_name} processor refused the prompt: {exc}; give a plain question, or a chat "
                           f"prompt with exactly one <|vision_start|><|image_pad|><|vision_end|> block") from None
        am = enc["attention_mask"]
        if am.shape[0] > 1 and bool((am[:, -1] == 0).any()):
            raise RunError("the processor padded on the right; the adapter needs left padding")
        n_img = int(enc["image_grid_thw"].shape[0])
        if n_img != len(flat):
            raise RunError(f"{n_img} images were encoded for {len(flat)} images given; each image needs its own "
                           f"<|vision_start|><|image_pad|><|vision_end|> block in its prompt")
        vision = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = (enc["input_ids"] == self.image_token_id).long()
        extras = {"mm_token_type_ids": mm}
        if counts is not None:
            extras["images_per_sample"] = counts
        return Encoded(enc["input_ids"], am, vision, list(prompts), extras)

    def split_sample(self, enc: Encoded, b: int) -> SampleLayout:
        """The base split, with the sample's 3D M-RoPE ids from `get_rope_index`."""
        keep = enc.attention_mask[b].bool()
        ids = enc.input_ids[b][keep]
        runs = self.image_runs(ids)
        mm = enc.extras["mm_token_type_ids"][b][keep]
        counts = enc.extras.get("images_per_sample")
        first = b if counts is None else sum(counts[:b])
        grid = enc.vision_inputs["image_grid_thw"][first:first + len(runs)]
        merge = self.visual.spatial_merge_size
        for (s, e), g in zip(runs, grid):
            if int(g.prod()) // (merge * merge) != e - s:
                raise RunError(f"sample {b}: {e - s} image placeholders for a {tuple(g.tolist())} patch grid")
        if grid.shape[0] != len(runs):
            raise RunError(f"sample {b}: {len(runs)} image blocks in the prompt for {grid.shape[0]} images")
        pos, _ = self.model.model.get_rope_index(ids[None], mm[None], image_grid_thw=grid)
        return SampleLayout.of(ids, pos[:, 0].cpu(), runs)

    def geometry(self, run: AdapterRun, b: int) -> Geometry:  # a sample's first image
        return self.image_geometries(run, b)[0]

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        vg: VisionGeometry = run.vision["geometry"]
        return [Geometry(grid=vg.merged_grid(i), image_start=im.start)
                for i, im in zip(self.image_indices(run, b), run.layouts[b].images)]

    def per_sample(self, run: AdapterRun, per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-image rows -> per-sample rows (a sample's images' rows in prompt order)."""
        many = run.enc.extras.get("images_per_sample") is not None
        return [torch.cat([per_image[i] for i in self.image_indices(run, b)]) for b in range(run.B)] if many else per_image

    def visual_positions(self, layout: SampleLayout, ids: torch.Tensor, plan: PositionPlan | None) -> torch.Tensor:
        if plan is not None and plan.offsets.numel() != ids.numel():
            raise RunError("the position plan does not match the kept tokens")
        grid = self._grid_of(layout)
        pos, _ = visual_positions_3d(layout.pos_image, grid, ids.long(), plan)
        return pos

    @staticmethod
    def _grid_of(layout: SampleLayout) -> tuple[int, int]:
        # for a still image the height/width rows of the 3D ids count the merged grid
        p = layout.pos_image
        return int(p[1].max() - p[1].min()) + 1, int(p[2].max() - p[2].min()) + 1

    # ---- the vision pass -------------------------------------------------------------------
    def _vision_plan(self, run: AdapterRun) -> None:
        depth = len(self.visual.blocks)
        attn_blocks: set[int] = set()
        sums: dict[tuple, list[int]] = {}
        for req in run.ex.requests():
            if req.kind == "vision.attention_received":
                attn_blocks.add(block_index(int(req.arg("layer", -1)), depth))
            elif req.kind in ("vision.hidden", "vision.hidden_mean", "vision.merged_hidden_mean"):
                idx = hidden_indices(req, depth)
                sums[tuple(idx)] = idx
        run.vision.update(attn_blocks=attn_blocks, recv={i: [] for i in attn_blocks},
                          sums={k: None for k in sums}, counted={k: 0 for k in sums})

    def on_vision_attention(self, run: AdapterRun, layer: int, module: nn.Module, query: torch.Tensor,
                            key: torch.Tensor, kwargs: dict) -> None:
        if layer not in run.vision.get("attn_blocks", ()):
            return
        # sdpa/eager: one call per attention segment (window, or whole image), in sequence order;
        # flash attention: one call over every segment, which cu_seq_lens_q delimits
        cu = kwargs.get("cu_seq_lens_q")
        bounds = cu.tolist() if cu is not None else [0, query.shape[2]]
        run.vision["recv"][layer].append(attention_received(query[0], key[0], bounds, module.scaling))

    def _hidden_hooks(self, run: AdapterRun) -> list:
        wanted = sorted({i for k in run.vision["sums"] for i in k})
        blocks = self.visual.blocks

        def add(i: int, h: torch.Tensor) -> None:
            for k in run.vision["sums"]:
                if i in k:
                    h32 = h.detach().float().to(self.device)  # blocks may sit on several devices
                    cur = run.vision["sums"][k]
                    run.vision["sums"][k] = h32.clone() if cur is None else cur + h32
                    run.vision["counted"][k] += 1

        handles = []
        for i in wanted:
            if i == 0:
                handles.append(blocks[0].register_forward_pre_hook(
                    lambda m, a, kw: add(0, a[0] if a else kw["hidden_states"]), with_kwargs=True))
            else:
                handles.append(blocks[i - 1].register_forward_hook(
                    lambda m, a, out, i=i: add(i, out[0] if isinstance(out, tuple) else out)))
        return handles

    @torch.no_grad()
    def vision_forward(self, run: AdapterRun) -> VisionOut:
        # the tower computes from grid_thw next to its patch embedding's outputs (Qwen3-VL's
        # interpolated position embeddings): give it on that module's device (a split tower)
        grid_thw = run.enc.vision_inputs["image_grid_thw"].to(self._patch_embed_device())
        pixels = run.enc.vision_inputs["pixel_values"].to(self.device, self.visual.dtype)
        host_thw = run.enc.vision_inputs["image_grid_thw"]  # on the host: no device sync
        vg = VisionGeometry.of(self.visual, host_thw, self.window_index(host_thw), self.device)
        run.vision["geometry"] = vg
        self._vision_plan(run)
        handles = self._hidden_hooks(run)
        try:
            out = self.visual(pixels, grid_thw=grid_thw)
        finally:
            for h in handles:
                h.remove()
        merged = out.pooler_output  # raster order already (the stock model undoes the window order)
        projected = self.per_sample(run, [p.to(self.dtype) for p in vg.split(merged)])
        u = vg.merge * vg.merge
        last = out.last_hidden_state
        units = vg.to_raster(last.reshape(last.shape[0] // u, -1))
        self.after_vision(run, out, vg)
        return VisionOut(tokens=self.per_sample(run, vg.split(units)), projected=projected, cls=[None] * run.B)

    def _of_sample(self, run: AdapterRun, per_image: list[torch.Tensor], b: int) -> Any:
        """Sample b's share of a per-image vision signal: its image's, or one per image (CropSignals)."""
        idx = self.image_indices(run, b)
        return per_image[idx[0]] if len(idx) == 1 else CropSignals([per_image[i] for i in idx])

    def _patch_embed_device(self) -> torch.device:
        p = next(self.visual.patch_embed.parameters(), None)
        return self.device if p is None or p.device.type == "meta" else p.device

    # ---- family hooks of the Qwen-VL line -----------------------------------------------
    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Window position -> raster merged-token index of the tower's merge units (Qwen2.5-VL
        runs them in attention windows; a tower without windows overrides this with arange)."""
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=self.visual.spatial_merge_size,
                                           window_size=self.visual.window_size, patch_size=self.visual.patch_size)
        return index

    def after_vision(self, run: AdapterRun, out, vg: VisionGeometry) -> None:
        """Keep what else the tower returned that the LLM side needs (Qwen3-VL: DeepStack)."""

    @property
    def unit_width(self) -> int:
        """Width of one merge unit in vision space: its m x m patch rows concatenated."""
        return int(self.visual.merger.hidden_size)

    def merge_units(self, x: torch.Tensor) -> torch.Tensor:
        """Merge units (..., m*m * d_vision) -> LLM space through the tower's own patch merger
        (its forward takes the patch rows, whatever its module names: ln_q + mlp on Qwen2-VL and
        Qwen2.5-VL, norm + linear_fc1/fc2 on Qwen3-VL)."""
        merger = self.visual.merger
        lead = x.shape[:-1]
        m = self.visual.spatial_merge_size
        dtype = next(merger.parameters()).dtype
        y = merger(x.reshape(-1, self.unit_width // (m * m)).to(dtype))
        return y.reshape(*lead, -1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Merge-unit rows (..., 4 * d_vision) -> LLM space through the patch merger."""
        if x.shape[-1] != self.unit_width:
            m = self.visual.spatial_merge_size
            raise RunError(f"{self.display_name} projects merge units of width {self.unit_width} ({m * m} patches x "
                           f"{self.unit_width // (m * m)}); got tokens of width {x.shape[-1]} in space 'vision' (use "
                           f"space 'llm' for merger outputs)")
        return self.merge_units(x)

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> torch.Tensor:
        vg: VisionGeometry = run.vision["geometry"]
        depth = len(self.visual.blocks)
        window = req.arg("order", "raster") == "window"
        if req.kind == "vision.attention_received":
            blk = block_index(int(req.arg("layer", -1)), depth)
            per_patch = torch.cat(run.vision["recv"][blk])
            per_unit = vg.per_unit_mean(per_patch)
            rows = per_unit if window else vg.to_raster(per_unit)
            return self._of_sample(run, vg.split(rows), b)
        idx = tuple(hidden_indices(req, depth))
        total = run.vision["sums"][idx]
        if total is None:
            raise RunError(f"internal: vision hidden states {idx} were not captured")
        mean = total / len(idx)
        u = vg.merge * vg.merge
        rows = mean.reshape(mean.shape[0] // u, -1)
        if req.kind == "vision.merged_hidden_mean" or bool(req.arg("merger", False)):
            with torch.no_grad():
                rows = self.merge_units(rows)
        rows = rows if window else vg.to_raster(rows)
        return self._of_sample(run, [r.to(self.dtype) for r in vg.split(rows)], b)  # the model dtype (CONTRACTS.md)


__all__ = ["NO_CLS_SIGNALS", "QWEN_VISION_SIGNALS", "QwenAdapter", "attention_received", "block_index", "hidden_index",
           "qwen_processor"]
