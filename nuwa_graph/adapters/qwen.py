"""The Qwen2.5-VL adapter (`Qwen2_5_VLForConditionalGeneration`) and a tiny offline preset.

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
A PositionPlan is turned into 3D ids by `visual_positions_3d`:
- PESP: each kept token keeps its own 3D id; text keeps its unpruned ids;
- PERC: kept token j gets s + j on all three axes; text follows compactly;
- RPME: per axis (t, row, col) the kept set is stretched over the image's full range on that
  axis with the formula of nodes/positions.py (`rpme_offsets`) applied to the axis' distinct
  values (new[0] = 0; new[j] = ceil(u[j] * span / u[-1])); text keeps its unpruned ids;
- no plan before the LLM: an unchanged block keeps the model's ids, a changed one is
  numbered contiguously (PERC); no plan at `llm.K`: current ids are kept (base).
Decoding continues from the last prompt position + 1 on every axis (what the stock model
does with its rope deltas).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RunError
from ..signals import SignalRequest
from ..types import Geometry, PositionPlan
from .base import LLM_SIGNALS, Encoded, SampleLayout, VisionOut, VLMAdapter, _Run, load_checkpoint, register_adapter

#: signals that need a CLS token; Qwen2.5-VL's vision tower has none
NO_CLS_SIGNALS = ("vision.cls_attention", "vision.cls_hidden", "vision.keys", "vision.qk_single_head")
QWEN_VISION_SIGNALS = frozenset({"vision.attention_received", "vision.hidden", "vision.hidden_mean",
                                 "vision.merged_hidden_mean"})

# --- vision-side signals ----------------------------------------------------------------------
def hidden_index(layer: int, depth: int) -> int:
    """hidden_states index (HF convention: 0 = patch embeddings, i = output of block i - 1)."""
    idx = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= idx <= depth:
        raise RunError(f"vision hidden_states index {layer} is out of range for a {depth}-block vision tower "
                       f"(valid: 0..{depth} or -{depth + 1}..-1)")
    return idx


def block_index(layer: int, depth: int) -> int:
    idx = layer if layer >= 0 else depth + layer
    if not 0 <= idx < depth:
        raise RunError(f"vision block {layer} is out of range for a {depth}-block vision tower")
    return idx


def attention_received(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float,
                       chunk: int = 1024) -> torch.Tensor:
    """Attention each patch receives, mean over heads and summed over queries, within each
    attention segment [cu[i], cu[i+1]) (a window, or a whole image at full-attention blocks).

    q, k: (heads, S, d) after RoPE. Returns (S,) float32. Rows are computed in query chunks,
    so no S x S map is kept (a window's map is small; a full-attention block is chunked)."""
    q = q.float()
    k = k.float()
    out = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        kk = k[:, a:b]
        for qs in range(a, b, chunk):
            qe = min(b, qs + chunk)
            p = torch.softmax(torch.matmul(q[:, qs:qe], kk.transpose(1, 2)) * scaling, dim=-1)
            out[a:b] += p.sum(dim=1).mean(dim=0)
    return out


class VisionProbe:
    """Forward hooks on the Qwen2.5-VL vision tower for one pass.

    - `attn_blocks`: blocks whose attention-received is computed (q and k recomputed from the
      block's normed input with its own qkv and rotary embedding, in the window-permuted patch
      order the tower runs in, within the block's own segments: windows at window blocks,
      whole images at full-attention blocks);
    - `hidden_layers`: hidden_states indices recorded (0 = input of block 0).
    Values are stored in the tower's window-permuted patch order; `VisionGeometry` reorders.
    """

    def __init__(self, visual, attn_blocks=(), hidden_layers=()):
        self.visual = visual
        self.attn_blocks = sorted(set(attn_blocks))
        self.hidden_layers = sorted(set(hidden_layers))
        self.received: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def install(self) -> VisionProbe:
        blocks = self.visual.blocks
        for i in self.attn_blocks:
            self.handles.append(blocks[i].attn.register_forward_pre_hook(self._attn_hook(i), with_kwargs=True))
        for h in self.hidden_layers:
            if h == 0:
                self.handles.append(blocks[0].register_forward_pre_hook(self._input_hook(), with_kwargs=True))
            else:
                self.handles.append(blocks[h - 1].register_forward_hook(self._output_hook(h)))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _attn_hook(self, block: int):
        def hook(module, args, kwargs):
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

            h = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"]
            cos, sin = kwargs["position_embeddings"]
            s = h.shape[0]
            with torch.no_grad():
                qkv = module.qkv(h).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3)
                q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
                self.received[block] = attention_received(q.transpose(0, 1), k.transpose(0, 1), cu, module.scaling)
            return None

        return hook

    def _input_hook(self):
        def hook(module, args, kwargs):
            self.hidden[0] = (args[0] if args else kwargs["hidden_states"]).detach()
            return None

        return hook

    def _output_hook(self, idx: int):
        def hook(module, args, output):
            self.hidden[idx] = (output[0] if isinstance(output, tuple) else output).detach()
            return None

        return hook


@dataclass
class VisionGeometry:
    """Window order <-> raster order of the merged tokens of a batch of images."""

    grid_thw: torch.Tensor  # (images, 3) patch grid
    merge: int
    window_index: torch.Tensor  # window position -> raster merged-token index (global)
    counts: list[int]  # merged tokens per image

    @classmethod
    def of(cls, visual, grid_thw: torch.Tensor) -> VisionGeometry:
        from transformers.vision_utils import get_vision_window_index

        merge = visual.spatial_merge_size
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=visual.window_size,
                                                  patch_size=visual.patch_size)
        counts = (grid_thw.prod(-1) // (merge * merge)).tolist()
        return cls(grid_thw, merge, window_index.to(grid_thw.device), [int(c) for c in counts])

    def merged_grid(self, image: int) -> tuple[int, int]:
        t, h, w = (int(x) for x in self.grid_thw[image])
        return h // self.merge, w // self.merge

    def to_raster(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Rows in window order (one per merged token) -> raster order."""
        out = torch.empty_like(per_unit)
        out[self.window_index.to(per_unit.device)] = per_unit
        return out

    def per_unit_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(S, ...) patch rows (window-permuted, merge units contiguous) -> (S / m^2, ...) means."""
        u = self.merge * self.merge
        return per_patch.reshape(per_patch.shape[0] // u, u, *per_patch.shape[1:]).mean(dim=1)

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(rows, self.counts, dim=0))


# --- 3D positions (M-RoPE) --------------------------------------------------------------------
def _stretch_axis(values: torch.Tensor, span: int) -> torch.Tensor:
    """RPME on one axis: the distinct values, ascending, go through `rpme_offsets` (new[0] = 0,
    new[j] = ceil(u[j] * span / u[-1])); every token gets the new value of its own value."""
    from nuwa_graph.nodes.positions import rpme_offsets

    uniq = torch.unique(values)  # sorted ascending
    mapped = rpme_offsets(uniq, span)
    return mapped[torch.searchsorted(uniq, values)]


def visual_positions_3d(image_pos: torch.Tensor, grid: tuple[int, int], ids: torch.Tensor,
                        plan: PositionPlan | None) -> tuple[torch.Tensor, bool]:
    """3D position ids (3, k) of the kept visual tokens `ids` (in sequence order), and whether
    the text after the image keeps its unpruned ids (True) or follows compactly (False).

    `image_pos` (3, n) holds the unpruned 3D ids of the image block in raster order (from
    get_rope_index: (s, s + row, s + col) for a still image). Policies:
    - pesp: each token keeps the 3D id of the grid cell `offsets[j]` (its own id);
    - perc (and any other 1-D plan): s + offsets[j] on all three axes (contiguous, like text);
    - rpme: per axis, the kept tokens' (t, row, col) are stretched over that axis' full range
      with the same formula as nodes/positions.py (`rpme_offsets`) applied to the distinct
      values of the axis; t stays s for a still image;
    - no plan: an unchanged block (ids == 0..n-1 in order) keeps the model's own ids; any other
      block is numbered contiguously (PERC), which is what dropping tokens means elsewhere.
    """
    n = image_pos.shape[1]
    rows, cols = grid
    s = image_pos[:, 0].min()
    index = ids.clamp(min=0).to(image_pos.device)
    if plan is None:
        if ids.numel() == n and torch.equal(ids.cpu(), torch.arange(n)):
            return image_pos.clone(), True
        return (s + torch.arange(ids.numel(), device=image_pos.device)).expand(3, -1).clone(), False
    offsets = plan.offsets.to(image_pos.device).long()
    original = plan.text_follows == "original"
    if plan.policy == "pesp":
        if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= n):
            raise RunError(f"PESP offsets must lie in the image block [0, {n}); got {int(offsets.min())}..{int(offsets.max())}")
        return image_pos[:, offsets].clone(), original
    if plan.policy == "rpme":
        if index.numel() == 0:
            return image_pos[:, :0].clone(), original
        r, c = index // cols, index % cols
        t_axis = image_pos[0, index] - s
        out = torch.stack([_stretch_axis(t_axis, int(image_pos[0].max() - s)),
                           _stretch_axis(r, rows - 1), _stretch_axis(c, cols - 1)]) + s
        return out, original
    return (s + offsets).expand(3, -1).clone(), original


def pruned_positions_3d(pos: torch.Tensor, image_start: int, n_image: int, grid: tuple[int, int],
                        ids: torch.Tensor, plan: PositionPlan | None) -> torch.Tensor:
    """Full 3D positions (3, L') of one unpadded sequence whose image block [image_start,
    image_start + n_image) is replaced by `ids`: text before keeps its ids, the kept block gets
    `visual_positions_3d`, the text after keeps its unpruned ids or follows the last visual
    position + 1 (max over the three axes, as get_rope_index continues after an image)."""
    before = pos[:, :image_start]
    after = pos[:, image_start + n_image:]
    vis, original = visual_positions_3d(pos[:, image_start:image_start + n_image], grid, ids, plan)
    if not original and after.shape[1]:
        start = (vis.max() + 1) if vis.numel() else pos[:, image_start].min()
        after = after - after[:, :1].min() + start
    return torch.cat([before, vis, after], dim=1)


# --- the adapter ------------------------------------------------------------------------------
def _hidden_indices(req: SignalRequest, depth: int) -> list[int]:
    """hidden_states indices a vision hidden request averages."""
    if req.kind == "vision.hidden":
        return [hidden_index(int(req.arg("layer", -1)), depth)]
    start, stop = int(req.arg("start")), int(req.arg("stop"))
    if req.kind == "vision.merged_hidden_mean":  # block outputs start..stop-1
        lo, hi = block_index(start, depth) + 1, block_index(stop - 1, depth) + 2
    else:
        lo = hidden_index(start, depth)
        hi = hidden_index(stop - 1, depth) + 1
    if hi <= lo:
        raise RunError(f"signal {req.key}: empty range")
    return list(range(lo, hi))


@register_adapter
class QwenAdapter(VLMAdapter):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`); see the module docstring."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    supported_signals = LLM_SIGNALS | QWEN_VISION_SIGNALS

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> QwenAdapter:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model, device = load_checkpoint(Qwen2_5_VLForConditionalGeneration, id_or_path, dtype, device, device_map, attn_implementation)
        tok = AutoTokenizer.from_pretrained(id_or_path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(id_or_path)
        processor = _processor_class()(image_processor=image_processor, tokenizer=tok, video_processor=None,
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

    @staticmethod
    def prompt(question: str) -> str:
        """A Qwen2.5-VL chat prompt with one image before the question."""
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")

    # ---- checks -------------------------------------------------------------------------
    def check_pipeline(self, ex) -> None:
        problems = []
        for req in ex.requests():
            if req.kind in NO_CLS_SIGNALS:
                problems.append(
                    f"signal {req.kind!r} (read at {req.site}) needs a CLS token, and Qwen2.5-VL's vision tower "
                    f"has none; use 'vision.attention_received' (attention each merged token receives at a vision "
                    f"block, e.g. layer -1 as Nüwa's Qwen code does) as the saliency signal instead")
        try:
            super().check_pipeline(ex)
        except RunError as exc:
            lines = [ln.strip()[2:] for ln in str(exc).splitlines()[1:] if ln.strip().startswith("- ")]
            problems += [ln for ln in lines if not any(f"signal {k!r}" in ln for k in NO_CLS_SIGNALS)]
        if problems:
            hint = ""
            if any(req.kind in NO_CLS_SIGNALS for req in ex.requests()):
                hint = (f"\nhint: {ex.pipeline.name} is defined on a CLS token (CLIP-style towers, LLaVA-1.5) and has "
                        f"no Qwen2.5-VL form; on this model run pipelines/nuwa.yaml (it switches to its authors' Qwen "
                        f"code by itself) or a method that reads only LLM signals (fastv, pdrop, sparsevlm, feather, "
                        f"random, downsample)")
            raise RunError(f"pipeline {ex.pipeline.name!r} cannot run on {self.name}:\n  - " + "\n  - ".join(problems)
                           + hint)

    def check_request(self, req: SignalRequest) -> str | None:
        if not req.kind.startswith("vision."):
            return None
        depth = len(self.visual.blocks)
        try:
            if req.kind == "vision.attention_received":
                block_index(int(req.arg("layer", -1)), depth)
            else:
                _hidden_indices(req, depth)
        except (RunError, TypeError, ValueError) as exc:
            return f"signal {req.key}: {exc}"
        return None

    # ---- inputs --------------------------------------------------------------------------
    def encode(self, images: list, prompts: list[str]) -> Encoded:
        # a plain question gets the chat template with one image block (as LLaVA's adapter does)
        prompts = [p if "<|image_pad|>" in p else self.prompt(p) for p in prompts]
        try:
            enc = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True,
                                 padding_side="left")
        except ValueError as exc:
            raise RunError(f"the Qwen2.5-VL processor refused the prompt: {exc}; give a plain question, or a chat "
                           f"prompt with exactly one <|vision_start|><|image_pad|><|vision_end|> block") from None
        am = enc["attention_mask"]
        if am.shape[0] > 1 and bool((am[:, -1] == 0).any()):
            raise RunError("the processor padded on the right; the adapter needs left padding")
        n_img = int(enc["image_grid_thw"].shape[0])
        if n_img != am.shape[0]:
            raise RunError(f"{n_img} images were encoded for {am.shape[0]} prompts; each prompt needs exactly one "
                           f"<|vision_start|><|image_pad|><|vision_end|> block")
        vision = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = (enc["input_ids"] == self.image_token_id).long()
        return Encoded(enc["input_ids"], am, vision, list(prompts), {"mm_token_type_ids": mm})

    def split_sample(self, enc: Encoded, b: int) -> SampleLayout:
        """The base split, with the sample's 3D M-RoPE ids from `get_rope_index`."""
        lay = super().split_sample(enc, b)
        keep = enc.attention_mask[b].bool()
        ids = enc.input_ids[b][keep]
        mm = enc.extras["mm_token_type_ids"][b][keep]
        grid = enc.vision_inputs["image_grid_thw"][b:b + 1]
        pos, _ = self.model.model.get_rope_index(ids[None], mm[None], image_grid_thw=grid)
        pos = pos[:, 0].cpu()
        s, e = lay.image_start, lay.image_start + lay.n_image
        merge = self.visual.spatial_merge_size
        if int(grid[0].prod()) // (merge * merge) != lay.n_image:
            raise RunError(f"sample {b}: {lay.n_image} image placeholders for a {tuple(grid[0].tolist())} patch grid")
        return SampleLayout(lay.pre_ids, lay.post_ids, lay.n_image, s, pos[:, :s], pos[:, s:e], pos[:, e:])

    def geometry(self, run: _Run, b: int) -> Geometry:
        vg: VisionGeometry = run.vision["geometry"]
        return Geometry(grid=vg.merged_grid(b), image_start=run.layouts[b].image_start)

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
    def _vision_plan(self, run: _Run) -> None:
        depth = len(self.visual.blocks)
        attn_blocks: set[int] = set()
        sums: dict[tuple, list[int]] = {}
        for req in run.ex.requests():
            if req.kind == "vision.attention_received":
                attn_blocks.add(block_index(int(req.arg("layer", -1)), depth))
            elif req.kind in ("vision.hidden", "vision.hidden_mean", "vision.merged_hidden_mean"):
                idx = _hidden_indices(req, depth)
                sums[tuple(idx)] = idx
        run.vision.update(attn_blocks=attn_blocks, recv={i: [] for i in attn_blocks},
                          sums={k: None for k in sums}, counted={k: 0 for k in sums})

    def on_vision_attention(self, run: _Run, layer: int, module: nn.Module, query: torch.Tensor,
                            key: torch.Tensor, kwargs: dict) -> None:
        if layer not in run.vision.get("attn_blocks", ()):
            return
        # one call per attention segment (window, or whole image), in sequence order
        n = query.shape[2]
        cu = torch.tensor([0, n])
        run.vision["recv"][layer].append(attention_received(query[0], key[0], cu, module.scaling))

    def _hidden_hooks(self, run: _Run) -> list:
        wanted = sorted({i for k in run.vision["sums"] for i in k})
        blocks = self.visual.blocks

        def add(i: int, h: torch.Tensor) -> None:
            for k in run.vision["sums"]:
                if i in k:
                    h32 = h.detach().float()
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
    def vision_forward(self, run: _Run) -> VisionOut:
        grid_thw = run.enc.vision_inputs["image_grid_thw"].to(self.device)
        pixels = run.enc.vision_inputs["pixel_values"].to(self.device, self.visual.dtype)
        vg = VisionGeometry.of(self.visual, grid_thw)
        run.vision["geometry"] = vg
        self._vision_plan(run)
        handles = self._hidden_hooks(run)
        try:
            out = self.visual(pixels, grid_thw=grid_thw)
        finally:
            for h in handles:
                h.remove()
        merged = out.pooler_output  # raster order already (the stock model undoes the window order)
        projected = [p.to(self.dtype) for p in vg.split(merged)]
        u = vg.merge * vg.merge
        last = out.last_hidden_state
        units = vg.to_raster(last.reshape(last.shape[0] // u, -1))
        return VisionOut(tokens=vg.split(units), projected=projected, cls=[None] * run.B)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Merge-unit rows (..., 4 * d_vision) -> LLM space through the patch merger."""
        merger = self.visual.merger
        d = self.visual.config.hidden_size
        if x.shape[-1] != merger.hidden_size:
            raise RunError(f"Qwen2.5-VL projects merge units of width {merger.hidden_size} (4 patches x {d}); "
                           f"got tokens of width {x.shape[-1]} in space 'vision' (use space 'llm' for merger outputs)")
        lead = x.shape[:-1]
        y = merger.mlp(merger.ln_q(x.reshape(-1, d).to(merger.ln_q.weight.dtype)).reshape(-1, merger.hidden_size))
        return y.reshape(*lead, -1)

    def read_vision_signal(self, run: _Run, req: SignalRequest, b: int) -> torch.Tensor:
        vg: VisionGeometry = run.vision["geometry"]
        depth = len(self.visual.blocks)
        window = req.arg("order", "raster") == "window"
        if req.kind == "vision.attention_received":
            blk = block_index(int(req.arg("layer", -1)), depth)
            per_patch = torch.cat(run.vision["recv"][blk])
            per_unit = vg.per_unit_mean(per_patch)
            rows = per_unit if window else vg.to_raster(per_unit)
            return vg.split(rows)[b]
        idx = tuple(_hidden_indices(req, depth))
        total = run.vision["sums"][idx]
        if total is None:
            raise RunError(f"internal: vision hidden states {idx} were not captured")
        mean = total / len(idx)
        if req.kind == "vision.merged_hidden_mean" or bool(req.arg("merger", False)):
            with torch.no_grad():
                rows = self.visual.merger(mean.to(self.visual.merger.ln_q.weight.dtype))
        else:
            u = vg.merge * vg.merge
            rows = mean.reshape(mean.shape[0] // u, -1)
        rows = rows if window else vg.to_raster(rows)
        return vg.split(rows)[b].to(self.dtype)  # features: the model dtype (docs/CONTRACTS.md)


# --- the tiny preset ------------------------------------------------------------------------
TINY_WORDS = (
    "what is the color of shape shapes a an left right top bottom middle center above below "
    "red green blue yellow purple orange white black gray circle square triangle star "
    "how many are there where describe image picture in on at to and or ? . , yes no "
    "one two three four five six seven eight nine zero small large big"
).split()
TINY_SPECIALS = ("<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def tiny_qwen_tokenizer():
    """A word-level tokenizer built offline, with Qwen's vision special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(TINY_SPECIALS) + list(TINY_VISION_TOKENS) + TINY_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": list(TINY_VISION_TOKENS)})
    return tok


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class QwenImageProcessorNoVideo(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor usable without torchvision: `video_processor=None` is accepted
        (the stock class check looks the video base class up in a mapping that does not exist
        when torchvision is missing). Videos are not supported by this adapter anyway."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return QwenImageProcessorNoVideo


def qwen_processor(tokenizer, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                   min_pixels: int | None = None, max_pixels: int | None = None):
    """A Qwen2.5-VL processor from a tokenizer and PIL image processing (no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    factor = patch_size * merge_size
    kwargs = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    kwargs["min_pixels"] = min_pixels if min_pixels is not None else factor * factor
    kwargs["max_pixels"] = max_pixels if max_pixels is not None else factor * factor * 1280
    image_processor = Qwen2VLImageProcessorPil(**kwargs)
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def tiny_qwen_config(vocab_size: int, token_ids: dict[str, int], depth: int = 4, patch_size: int = 4,
                     window_size: int = 16, vision_hidden: int = 32, text_hidden: int = 64, text_layers: int = 4):
    """A tiny Qwen2.5-VL config: window attention (windows of 2x2 merged tokens with the
    defaults) with full attention at blocks 1 and 3, out_hidden_size = text hidden, 4 text
    layers with 4 heads (head_dim 16, mrope_section [2, 3, 3] sums to head_dim / 2)."""
    from transformers import Qwen2_5_VLConfig

    text_heads = 4
    head_dim = text_hidden // text_heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           out_hidden_size=text_hidden, fullatt_block_indexes=[i for i in range(depth) if i % 2 == 1],
                           in_channels=3),
        text_config=dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=token_ids["<|endoftext|>"],
                         pad_token_id=token_ids["<pad>"],
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=token_ids["<|endoftext|>"], pad_token_id=token_ids["<pad>"],
    )


# merged grid of the tiny preset's default image: 5 x 7 (odd on both sides), i.e. 40 x 56 pixels
TINY_GRID = (5, 7)


def build_tiny_qwen(seed: int = 0):
    """A tiny, randomly initialised Qwen2.5-VL with an offline tokenizer and processor.

    Returns (model, processor), eval mode, fp32. `tiny_qwen_image()` gives an image whose
    merged grid is TINY_GRID (5 x 7 merged tokens = 10 x 14 patches of 4 px) and
    `tiny_qwen_prompt()` a prompt with the image placeholder block. Weights are drawn with a
    larger spread than the default init so that pruning visibly changes the logits.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}
    config = tiny_qwen_config(len(tok), ids)
    processor = qwen_processor(tok, patch_size=config.vision_config.patch_size, merge_size=2,
                               min_pixels=8 * 8, max_pixels=64 * 8 * 8 * 16)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


def tiny_qwen(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> QwenAdapter:
    """The `tiny-qwen` preset as a ready adapter."""
    model, processor = build_tiny_qwen(seed)
    model = model.to(device=device, dtype=dtype)
    return QwenAdapter(model, processor, name="tiny-qwen", dtype=dtype, device=device)


def tiny_qwen_image(grid: tuple[int, int] = TINY_GRID, seed: int = 0, unit: int = 8):
    """A random RGB PIL image whose merged grid is `grid` (unit = patch_size * merge_size px)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(grid[0] * unit, grid[1] * unit, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def tiny_qwen_prompt(question: str = "what is the color of the shape ?") -> str:
    """The prompt layout the adapter expects: text, the image block, text."""
    return f"<|im_start|> describe <|vision_start|><|image_pad|><|vision_end|> {question} <|im_end|>"
