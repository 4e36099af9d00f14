"""The LLaVA-1.5 adapter (`LlavaForConditionalGeneration`: CLIP vision tower + projector + Llama).

Sites: `vision` = CLIP hidden_states[vision_feature_layer] without CLS (before the
projector), `pre_llm` = projected tokens and text embeddings, `llm.K` = input of decoder
layer K. The pipeline's grid is the CLIP patch grid (24 x 24 for CLIP-L/14-336).

Vision signals and their `layer` argument (CLIP-L has 24 encoder layers, indices 0..23):

- hidden-state signals index `hidden_states` (length n_layers + 1; 0 = embeddings,
  i = output of encoder layer i - 1, negatives from the end):
  `vision.hidden(layer=-2)` (n, d) without CLS, `vision.cls_hidden(layer=-2)` (d,),
  `vision.hidden_mean(start, stop)` = mean of hidden_states[start:stop] (Python slice), (n, d).
  layer -2 = output of encoder layer 22, what LLaVA feeds the projector.
- attention signals index the encoder layers (0..n_layers-1, negatives from the end):
  `vision.cls_attention(layer=-2)` = post-softmax CLS -> patch row of encoder layer 22
  (= `attentions[-2][:, :, 0, 1:]`), (heads, n);
  `vision.keys(layer=-2)` = that layer's key states, (heads, n + 1, head_dim), CLS first;
  `vision.qk_single_head(layer=-1)` = q_proj and k_proj outputs of that layer on its
  layer_norm1 input (for layer -1: the output of layer 22 after LayerNorm, PruMerge+),
  (2, n + 1, d), CLS first.
- `vision.attention_received(layer, queries=sum|mean)`: the attention each patch receives at
  encoder layer `layer`: the map averaged over heads, then summed or averaged over ALL queries
  (CLS query included), CLS key dropped, (n,) (HiPrune's column mean: `queries: mean`).
All are computed from the q/k that the registered attention function sees (the vision
tower keeps SDPA for its output; no N x N map is kept beyond one head-averaged (n+1)^2 buffer).

CDPruner's CLIP embeddings (`vision.clip_embeds(layer=-2)`, `vision.clip_text_embeds`) come
from the CLIP checkpoint of the vision tower (clip_text.py), loaded on first use; the model
variable `clip_text` says whether this model has one (False: CDPruner runs its LLM variant).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..part_views import CropSignals
from ..signals import SignalRequest
from ..types import Geometry
from .base import LLM_SIGNALS, AdapterRun, Encoded, VisionOut, VLMAdapter, load_checkpoint, register_adapter
from .clip_text import ClipText, clip_text_name, load_clip_text
from .image_runs import flatten_images


def question_of(prompt: str) -> str:
    """The user's question in a prompt: the prompt itself, or what follows `<image>` in a full
    chat prompt, up to the assistant cue (CDPruner embeds the question, not the template)."""
    if "<image>" not in prompt:
        return prompt
    rest = prompt.split("<image>", 1)[1].split("ASSISTANT:", 1)[0]
    return " ".join(rest.replace("<image>", " ").split()) if "<image>" in rest else rest.strip()  # several images

ATTN_KINDS = {"vision.cls_attention", "vision.keys", "vision.qk_single_head", "vision.attention_received"}
_HIDDEN_KINDS = {"vision.hidden", "vision.cls_hidden", "vision.hidden_mean", "vision.clip_embeds"}
_CLIP_KINDS = {"vision.clip_embeds", "vision.clip_text_embeds"}
_DEFAULT_LAYER = {"vision.hidden": -2, "vision.cls_hidden": -2, "vision.cls_attention": -2, "vision.keys": -2,
                  "vision.qk_single_head": -1, "vision.attention_received": -2, "vision.clip_embeds": -2}


def attention_columns(q: torch.Tensor, k: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """(2, n + 1) float32 for one sample: the attention each key receives, the map
    softmax(q k^T * scaling) averaged over heads, then summed (row 0) and averaged (row 1) over
    all queries; q, k (heads, n + 1, d). The head mean is taken per query chunk into one
    (n + 1)^2 buffer, reduced over queries as the official `.mean(dim=1).mean(dim=1)` does."""
    n = q.shape[1]
    buf = torch.empty(n, n, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        buf[a:b] = torch.softmax(torch.matmul(q[:, a:b].float(), kt) * scaling, dim=-1).mean(dim=0)
    return torch.stack([buf.sum(dim=0), buf.mean(dim=0)])


@register_adapter
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5 layout (also any `llava` model_type with a CLIP-like tower and a Llama-like LLM)."""

    family = "llava"
    has_cls = True  # CLIP-style towers: the CLS-based methods (VisionZip, PruMerge+, Nüwa's LLaVA recipe) run here
    model_types = ("llava",)
    supported_signals = frozenset({"vision.hidden", "vision.hidden_mean", "vision.cls_hidden", "vision.cls_attention",
                                   "vision.keys", "vision.qk_single_head", "vision.attention_received"}
                                  ) | LLM_SIGNALS | _CLIP_KINDS
    # CDPruner's auxiliary CLIP: a loaded ClipText, the checkpoint to load it from, or None (no text tower)
    clip_text: ClipText | str | None = None

    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"
    official_dtype = "float16"
    official_dtype_source = ("LLaVA-1.5's official code (load_pretrained_model), which FastV, PDrop, SparseVLM, "
                             "VisionZip and PruMerge+ run on")

    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> LlavaAdapter:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model, device = load_checkpoint(LlavaForConditionalGeneration, id_or_path, dtype, device, device_map, attn_implementation)
        proc = AutoProcessor.from_pretrained(id_or_path)
        tok = getattr(proc, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.unk_token or tok.eos_token
        adapter = cls(model, proc, name=str(id_or_path), dtype=dtype, device=device,
                      attn_implementation=attn_implementation)
        adapter.clip_text = clip_text_name(model.config)
        return adapter

    # ---- modules -----------------------------------------------------------------------
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_layers(self) -> nn.ModuleList:
        vt = self.vision_tower()
        return getattr(vt, "vision_model", vt).encoder.layers

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.vision_layers()]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(x)

    @property
    def grid(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        n = vc.image_size // vc.patch_size
        return (n, n)

    def model_variables(self) -> dict[str, int]:
        """LLaVA's grid is fixed by the CLIP config, so budgets scale to it (grid_tokens); one crop."""
        n = self.grid[0] * self.grid[1]
        return {**super().model_variables(), "grid_tokens": n, "crops": 1, "crop_tokens": n, "visual_tokens": n,
                "clip_text": self.clip_text is not None}

    def clip(self) -> ClipText:
        """The auxiliary CLIP (loaded on first use, float32 on the model's device)."""
        if isinstance(self.clip_text, str):
            self.clip_text = load_clip_text(self.clip_text, self.device)
        if self.clip_text is None:
            raise RunError("this LLaVA model has no CLIP text tower")
        return self.clip_text

    def auxiliary_modules(self) -> list[nn.Module]:
        clip = self.clip_text
        return [clip.text_model, clip.visual_projection] if isinstance(clip, ClipText) else []

    def unavailable_signal(self, req: SignalRequest) -> str | None:
        if req.kind in _CLIP_KINDS and self.clip_text is None:
            return (f"signal {req.kind!r} (read at {req.site}) needs the CLIP text tower of the vision tower's "
                    f"checkpoint, and {self.name}'s tower has none the adapter knows (CDPruner: run --set "
                    f"relevance=llm, the relevance from the LLM's own instruction embeddings)")
        return super().unavailable_signal(req)

    # ---- inputs ------------------------------------------------------------------------
    def format_prompt(self, prompt: str, images: int = 1) -> str:
        """A prompt with `<image>` is used as it is; a plain question gets the template with
        `images` placeholders before it."""
        if "<image>" in prompt:
            return prompt
        return self.prompt_template.replace("<image>\n", "<image>\n" * images).format(prompt=prompt)

    def with_placeholders(self, question: str) -> str:
        return self.prompt_template.replace("<image>\n", "").format(prompt=question)

    def texts(self, images: list, prompts: list[str]) -> tuple[list, list[int] | None, list[str]]:
        """(the batch's images as one list, images per prompt or None, the prompts' texts)."""
        flat, counts = flatten_images(images)
        texts = [self.format_prompt(p, n) for p, n in zip(prompts, counts or [1] * len(prompts))]
        return flat, counts, texts

    def turn_text(self, question: str) -> str:
        """LLaVA-1.5's later user turn: `...ASSISTANT: answer</s>USER: {question} ASSISTANT:`."""
        return f"USER: {question} ASSISTANT:"

    def encode(self, images: list, prompts: list[str]) -> Encoded:
        flat, counts, texts = self.texts(images, prompts)
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        enc = self.processor(images=flat, text=texts, return_tensors="pt", padding=True)
        extras: dict[str, Any] = {"questions": [question_of(p) for p in prompts]}
        if counts is not None:
            extras["images_per_sample"] = counts
        return Encoded(enc["input_ids"], enc["attention_mask"], {"pixel_values": enc["pixel_values"]}, texts, extras)

    def image_token_counts(self, enc: Encoded, b: int) -> list[int] | None:
        counts = enc.extras.get("images_per_sample")
        return None if counts is None else [self.grid[0] * self.grid[1]] * counts[b]

    def geometry(self, run: AdapterRun, b: int) -> Geometry:
        return self.image_geometries(run, b)[0]

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        out = []
        for im in run.layouts[b].images:
            if im.n != self.grid[0] * self.grid[1]:
                raise RunError(f"the prompt has {im.n} image tokens but the grid is {self.grid}")
            out.append(Geometry(grid=self.grid, image_start=int(im.pos[0, 0])))
        return out

    # ---- signals -----------------------------------------------------------------------
    def _vision_layer(self, req: SignalRequest) -> int:
        n = len(self.vision_layers())
        L = int(req.arg("layer", _DEFAULT_LAYER.get(req.kind, -2)))
        if req.kind in ATTN_KINDS:
            if not -n <= L < n:
                raise RunError(f"signal {req.key}: layer {L} is outside the vision encoder's layers "
                               f"(-{n}..{n - 1}); attention signals index encoder layers")
            return L % n
        if not -(n + 1) <= L <= n:
            raise RunError(f"signal {req.key}: layer {L} is outside hidden_states (-{n + 1}..{n})")
        return L % (n + 1)

    def check_request(self, req: SignalRequest) -> str | None:
        if req.arg("order", "raster") != "raster":
            return f"signal {req.key}: the LLaVA tower has no window order (order: raster)"
        if req.kind in ATTN_KINDS or req.kind in ("vision.hidden", "vision.cls_hidden", "vision.clip_embeds"):
            try:
                self._vision_layer(req)
            except RunError as exc:
                return str(exc)
        if req.kind == "vision.hidden_mean":
            n = len(self.vision_layers()) + 1
            idx = range(n)[slice(req.arg("start"), req.arg("stop"))]
            if len(idx) == 0:
                return f"signal {req.key}: hidden_states[{req.arg('start')}:{req.arg('stop')}] is empty ({n} entries)"
        return None

    def on_vision_attention(self, run: AdapterRun, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            kwargs: dict) -> None:
        wants = run.vision.get("attn_layers", {}).get(layer)
        if not wants:
            return
        store = run.vision.setdefault("attn", {})
        scaling = kwargs.get("scaling", getattr(module, "scale", query.shape[-1] ** -0.5))
        if "vision.cls_attention" in wants:
            row = torch.einsum("bhd,bhkd->bhk", query[:, :, 0].float(), key.float()) * scaling
            store[("cls_attention", layer)] = torch.softmax(row, dim=-1)[:, :, 1:]
        if "vision.keys" in wants:
            store[("keys", layer)] = key.detach()
        if "vision.qk_single_head" in wants:
            B, H, N, hd = query.shape
            q = query.transpose(1, 2).reshape(B, N, H * hd)
            k = key.transpose(1, 2).reshape(B, N, H * hd)
            store[("qk", layer)] = torch.stack([q, k], dim=1)
        if "vision.attention_received" in wants:
            store[("received", layer)] = torch.stack([attention_columns(query[b], key[b], scaling)[:, 1:]
                                                      for b in range(query.shape[0])])

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> Any:
        """Sample b's vision signal: its image's, or one per image (CropSignals: a node reading
        it runs per crop, i.e. per image here)."""
        idx = self.image_indices(run, b)
        if req.kind == "vision.clip_text_embeds":  # the sample's question: one per prompt, not per image
            return self.clip().text_embeds(run.enc.extras["questions"][b], self.device)
        if len(idx) == 1:
            return self.vision_row_signal(run, req, idx[0])
        return CropSignals([self.vision_row_signal(run, req, i) for i in idx])

    def vision_row_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> torch.Tensor:
        """A vision signal of row b of the vision tower's batch (one crop)."""
        hs = run.vision["hidden_states"]
        if req.kind == "vision.hidden":
            return hs[self._vision_layer(req)][b, 1:]
        if req.kind == "vision.cls_hidden":
            return hs[self._vision_layer(req)][b, 0]
        if req.kind == "vision.hidden_mean":
            sel = hs[slice(req.arg("start"), req.arg("stop"))]
            # a device_map may split the tower: the layers' outputs meet on the adapter's device
            return torch.stack([h[b, 1:].to(self.device) for h in sel]).float().mean(0).to(sel[0].dtype)
        if req.kind == "vision.clip_embeds":
            patches = hs[self._vision_layer(req)][b, 1:]
            vt = self.vision_tower()
            return self.clip().image_embeds(patches, getattr(vt, "vision_model", vt).post_layernorm)
        if req.kind == "vision.clip_text_embeds":
            return self.clip().text_embeds(run.enc.extras["questions"][b], self.device)
        attn = run.vision.get("attn", {})
        L = self._vision_layer(req)
        if req.kind == "vision.attention_received":
            return attn[("received", L)][b, 0 if req.arg("queries", "sum") == "sum" else 1]
        name = {"vision.cls_attention": "cls_attention", "vision.keys": "keys", "vision.qk_single_head": "qk"}.get(req.kind)
        if name is None:
            raise RunError(f"the llava adapter cannot give signal {req.kind}")
        return attn[(name, L)][b]

    # ---- the vision pass -----------------------------------------------------------------
    def vision_forward(self, run: AdapterRun) -> VisionOut:
        attn_layers: dict[int, set[str]] = {}
        for req in run.ex.requests():
            if req.kind in ATTN_KINDS:
                attn_layers.setdefault(self._vision_layer(req), set()).add(req.kind)
        run.vision["attn_layers"] = attn_layers
        cfg = self.model.config
        pix = run.enc.vision_inputs["pixel_values"].to(self.device)
        out = self.vision_tower()(pix, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        run.vision["hidden_states"] = hs
        layer = cfg.vision_feature_layer
        strategy = cfg.vision_feature_select_strategy
        if isinstance(layer, int):
            feats = hs[layer]
            if strategy == "default":
                feats = feats[:, 1:]
        else:
            pool = [hs[i] for i in layer]
            if strategy == "default":
                pool = [h[:, 1:] for h in pool]
            feats = torch.cat(pool, dim=-1)
        if strategy != "default":
            raise RunError(f"vision_feature_select_strategy={strategy!r} is not supported (LLaVA-1.5 uses 'default')")
        cls_rows: list[Any] = []
        for b in range(feats.shape[0]):
            if isinstance(layer, int):
                cls_rows.append(hs[layer][b, 0])
            else:
                cls_rows.append(torch.cat([hs[i][b, 0] for i in layer], dim=-1))
        # the projector runs on the whole batch, as the stock model does, when a Block first needs it:
        # a pipeline that replaces every token before the LLM (a vision-space merger) never pays for it
        if run.enc.extras.get("images_per_sample") is None:
            return VisionOut(tokens=[feats[b] for b in range(feats.shape[0])], projected=lambda: self.project(feats),
                             cls=cls_rows)
        # several images per prompt: a sample's tokens are its images' in prompt order (ids run
        # on across them); their CLS rows have prompt ids of their own, with no row here
        groups = [self.image_indices(run, b) for b in range(run.B)]
        return VisionOut(tokens=[feats[g].reshape(-1, feats.shape[-1]) for g in groups],
                         projected=lambda: [p.reshape(-1, p.shape[-1]) for p in (self.project(feats)[g] for g in groups)],
                         cls=[cls_rows[g[0]] if len(g) == 1 else None for g in groups])
