"""The family-independent half of every adapter: the LLM side of a pruned forward pass.

An adapter binds one Hugging Face VLM to the engine. This module holds everything that
does not depend on the model family:

- the run life cycle: check the pipeline's signal requests BEFORE any forward pass, run
  the vision tower (family code), the `vision` and `pre_llm` sites, assemble the LLM input
  (left padded, explicit position ids), prefill, greedy decoding with a KV cache;
- the decoder-layer forward pre-hooks that run `llm.K` sites and drop tokens from layer K
  on (hidden states, position embeddings, 4D mask; the KV cache of later layers follows),
  also during decoding (mask columns, per-segment positions);
- the registered attention function (`AttentionInterface` + `AttentionMaskInterface`,
  one unique name per adapter instance) that calls the stock sdpa function for the output
  and, during prefill, computes only the attention ROWS a pipeline asked for;
- the signal reader (`external`, `pre_llm.*`, `llm.*`; `vision.*` is delegated to the
  family) and the `RunReport`.

Extension points (what a family subclass implements; LLaVA in llava.py is the example):

- class attributes `family`, `model_types` (config.model_type values handled) and
  `supported_signals` (the SIGNAL_KINDS this family can give); decorate the class with
  `@register_adapter` so `load_adapter` finds it by model_type.
- `from_pretrained(cls, id_or_path, dtype, device)`: load model + processor (real hub
  code path; tests use tiny presets).
- `text_model()`, `decoder_layers()`, `lm_head()`, `embed(ids)`; `rotary(h, pos)` if the
  text model's rotary embedding is not `text_model().rotary_emb(h, pos)`.
- `vision_attention_modules()`: attention modules of the vision tower (they get the
  registered attention function; `on_vision_attention` is called for them).
- `encode(images, prompts) -> Encoded` (processor, left padding) and
  `split_sample(enc, b) -> SampleLayout` (where the image block sits, full positions;
  the default finds the run of `image_token_id` and numbers 1-D positions from 0).
- `vision_forward(run) -> VisionOut`: run the vision tower (with the captures the
  requests need), give per-sample vision-space tokens and the full projected tokens.
- `project(x)`: vision space -> LLM space (for merged vision-space tokens and CLS).
- `read_vision_signal(run, req, b)`: the `vision.*` signals.
- `visual_positions(layout, ids, plan)`: absolute position ids (P, k) of the kept visual
  tokens for a PositionPlan (1-D default: image_start + offsets; None = contiguous).
  Position tensors are always (P, n) per sample (P = 1 for LLaVA, 3 for M-RoPE) and
  (P, B, L) for a batch; `llm_position_ids` turns them into what the text model takes.
- `llm_position_ids(pos)`: (P, B, L) -> the text model's `position_ids` (default: pos[0]).
- `geometry(run, b)`: the sample's `Geometry` (grid the pipeline sees, image_start).

Everything a run touches is per adapter instance and per run (`_Run`); hooks live in
`session()` and are removed on exit, also on error; the attention implementation of
both sub-models is restored.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import tracemalloc
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..context import Keep
from ..errors import PipelineError, RunError
from ..executor import Executor, RunState
from ..pipeline import Pipeline
from ..signals import LLMAttention, LLMHidden, Queries, SignalRequest
from ..sites import Site
from ..types import Geometry, PositionPlan

# --------------------------------------------------------------------------------------------
# registry of families (load_adapter looks model_type up here)
# --------------------------------------------------------------------------------------------
ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for mt in cls.model_types:
        ADAPTERS[mt] = cls
    return cls


ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise RunError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name.startswith("flash"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise RunError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
                           "flash-attn, CUDA only); use sdpa")
    return name


LLM_SIGNALS = frozenset({"external", "pre_llm.visual", "pre_llm.text", "llm.attention", "llm.hidden"})


# --------------------------------------------------------------------------------------------
# data carried through a run
# --------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Processor output for a batch (left padded) plus family extras for the vision tower."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    vision_inputs: dict[str, Any]  # e.g. pixel_values
    prompts: list[str]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleLayout:
    """One sample's unpruned prompt, split around its image block (no padding).

    Positions are (P, n): P = 1 for 1-D RoPE, 3 for M-RoPE.
    """

    pre_ids: torch.Tensor  # token ids before the image block
    post_ids: torch.Tensor  # token ids after it
    n_image: int  # image placeholder tokens in the prompt (the full grid)
    image_start: int  # index of the first image token in the sample's own sequence
    pos_pre: torch.Tensor  # (P, n_pre)
    pos_image: torch.Tensor  # (P, n_image) original positions of the full image block
    pos_post: torch.Tensor  # (P, n_post)
    n_extra: int = 0  # generated tokens appended by extend() (they are not prompt tokens)

    def extend(self, extra: torch.Tensor) -> None:
        """Append generated tokens after the prompt (cache-free recompute)."""
        extra = extra.reshape(-1).to(self.post_ids)
        if extra.numel() == 0:
            return
        last = self.pos_post[:, -1:] if self.pos_post.shape[1] else self.pos_image[:, -1:]
        self.pos_post = torch.cat([self.pos_post, last + 1 + torch.arange(extra.numel())], dim=1)
        self.post_ids = torch.cat([self.post_ids, extra])
        self.n_extra += int(extra.numel())

    @property
    def prompt_post_ids(self) -> torch.Tensor:
        """Token ids after the image that belong to the prompt (not the appended ones)."""
        return self.post_ids[: self.post_ids.numel() - self.n_extra]


@dataclass
class VisionOut:
    """What the family's vision pass hands to the base.

    `tokens[b]`: (n, d_vision) vision-space tokens of sample b in raster order (ids arange(n));
    `cls[b]`: the CLS row in vision space or None; `projected`: (B, n, d_llm) all tokens
    through the projector, computed in one batch exactly as the stock model does.
    """

    tokens: list[torch.Tensor]
    projected: torch.Tensor | list[torch.Tensor]
    cls: list[torch.Tensor | None]


@dataclass
class Block:
    """The image block of one sample before the LLM: ids, LLM-space rows, positions."""

    ids: torch.Tensor
    rows: torch.Tensor  # (k, d_llm)
    positions: torch.Tensor | None = None  # (P, k) absolute, None = contiguous
    text_follows: str = "compact"


@dataclass
class Segment:
    """The token layout seen by decoder layers [start, next segment's start)."""

    start: int
    valid: torch.Tensor  # (B, L) bool, prompt part (left padding False)
    pos: torch.Tensor  # (P, B, L)
    img_idx: list[torch.Tensor]  # per sample: sequence indices of image tokens (stream order)
    img_ids: list[torch.Tensor]  # per sample: their original ids
    post_start: list[int]  # per sample: sequence index of the first token after the image
    n_text: list[int]  # per sample: valid non-image tokens
    n_extra: list[int] = field(default_factory=list)  # per sample: appended generated tokens at the end
    key_valid: torch.Tensor | None = None  # (B, kv) grows during decoding
    last_pos: torch.Tensor | None = None  # (P, B) last position used


@dataclass
class RunReport:
    """What a run did and cost. Lists are per sample."""

    model: str
    pipeline: str
    answers: list[str]
    new_tokens: list[list[int]]
    visual_tokens_per_layer: list[list[int]]  # measured in the layer hooks at prefill
    visual_tokens_avg: list[float]
    visual_tokens_full: int
    prefill_ms: float
    decode_ms_per_token: float
    decode_steps: int
    peak_memory_bytes: int
    peak_memory_source: str
    kv_cache_bytes: int
    node_ms: dict[str, float]
    kept: list[dict[str, list[int]]]  # per sample: site -> kept original ids (last Keep there)
    actions: list[list[dict[str, Any]]]  # per sample: every Keep (site, node, count, positions)
    device: str = "cpu"
    dtype: str = "float32"
    schedule: dict[str, Any] = field(default_factory=dict)  # file run, variable values and their origin, sites
    signals: list[str] = field(default_factory=list)  # every model signal read: "kind(args) at site"
    flops: list[dict[str, Any]] = field(default_factory=list)  # per sample: nuwa_graph.flops.run_flops
    attn_implementation: str = "sdpa"
    peak_memory_above_start_bytes: int | None = None  # CUDA: peak minus what was allocated before (the weights)
    visual_tokens_full_per_sample: list[int] = field(default_factory=list)  # image tokens before pruning

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Run:
    """Per-request state (one per prefill + decode)."""

    def __init__(self, adapter: VLMAdapter, ex: Executor, enc: Encoded, external: dict | None, seed: int | None):
        self.adapter = adapter
        self.ex = ex
        self.enc = enc
        self.external = external or {}
        self.seed = seed
        self.B = enc.input_ids.shape[0]
        self.sites = ex.sites()
        self.state: RunState | None = None
        self.layouts: list[SampleLayout] = []
        self.captured: dict[str, list[Any]] = {}  # signal key -> per sample value
        self.vision: dict[str, Any] = {}  # family scratch for vision captures
        self.blocks: list[Block] = []
        self.segments: list[Segment] = []
        self.phase = "idle"  # prefill | decode
        self.counts: list[list[int]] = []  # per sample, per layer visual tokens (prefill)
        self.q_len = 0
        # what to capture in the LLM, from the requests
        self.llm_sites = {s.layer for s in self.sites if s.layer is not None}
        self.rows_attn: dict[int, list[LLMAttention]] = {}  # layer -> rope=True rows from the attention fn
        self.rows_pre: dict[int, list[LLMAttention]] = {}  # layer -> rows computed in the layer pre-hook
        self.hidden_at: dict[int, list[SignalRequest]] = {}
        for req in ex.requests():
            if isinstance(req, LLMAttention):
                L = req.layer
                K = Site(req.site).layer
                if req.rope and K is not None and L < K:
                    self.rows_attn.setdefault(L, []).append(req)
                else:
                    self.rows_pre.setdefault(L, []).append(req)
            elif isinstance(req, LLMHidden):
                self.hidden_at.setdefault(req.layer, []).append(req)

    def segment_of(self, layer: int) -> Segment:
        seg = self.segments[0]
        for s in self.segments:
            if s.start <= layer:
                seg = s
        return seg


def _columns(ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor | None:
    """Index into `ids` of each token of `present` (same device; no Python lists), or None
    when a token of `present` is not in `ids`."""
    if ids.numel() == 0:
        return None if present.numel() else present.long()
    order = torch.argsort(ids)
    at = torch.searchsorted(ids[order], present).clamp(max=ids.numel() - 1)
    cols = order[at]
    return cols if bool((ids[cols] == present).all()) else None


def _host_keeps(acts: list[list[Keep]]) -> list[list[Keep]]:
    """The Keep actions of one site with their ids and position plans on the CPU: the
    adapter's layout bookkeeping is host-side and small; this is the one copy per site
    (merged token values stay on the device)."""
    def host(a: Keep) -> Keep:
        pos = a.positions
        if pos is not None:
            pos = replace(pos, ids=pos.ids.cpu(), offsets=pos.offsets.cpu())
        return replace(a, ids=a.ids.cpu(), positions=pos)

    return [[host(a) for a in ab] for ab in acts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of a block: torch.cuda on GPU; on CPU the process peak RSS (VmHWM, reset
    through /proc/self/clear_refs), else tracemalloc (Python heap only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = ""
        self.peak = 0
        self.start = 0
        self._tm = False

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = int(torch.cuda.memory_allocated(self.device))
            self.source = "torch.cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if self._hwm() is not None:
                self.source = "peak RSS of the process (VmHWM)"
                return self
        except OSError:
            pass
        self.source = "tracemalloc (Python heap only)"
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._tm = True
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.source.startswith("peak RSS"):
            self.peak = int(self._hwm() or 0)
        else:
            self.peak = int(tracemalloc.get_traced_memory()[1])
            if self._tm:
                tracemalloc.stop()
        return False


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (H, n, hd); cos/sin (n, hd) -> rotated (standard half-rotation RoPE)."""
    return x * cos[None] + _rotate_half(x) * sin[None]


_counter = itertools.count()


# --------------------------------------------------------------------------------------------
# the adapter base
# --------------------------------------------------------------------------------------------
class VLMAdapter:
    """Drives one VLM through a pipeline. See the module docstring for the extension points."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    supported_signals: ClassVar[frozenset[str]] = LLM_SIGNALS

    def __init__(self, model: nn.Module, processor: Any, name: str = "", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
        self.model = model.eval()
        self.processor = processor
        self.name = name or self.family
        self.dtype = dtype
        self.device = torch.device(device)
        # layers no scorer reads run this implementation (sdpa | flash_attention_2 | eager)
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.attn_name = f"nuwa_rows_{self.family}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        self._run: _Run | None = None
        self._attn_index: dict[int, tuple[str, int]] = {}

    # ---- family hooks (override) -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> VLMAdapter:
        raise NotImplementedError

    def set_attn_implementation(self, name: str) -> VLMAdapter:
        """Run the model's own attention with `name` (sdpa | flash_attention_2 | eager)."""
        self.attn_implementation = check_attn_implementation(name)
        self.model.set_attn_implementation(name)
        return self

    def text_model(self) -> nn.Module:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model().embed_tokens(ids.to(self.device))

    def rotary(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for position ids `pos` as the text model takes them."""
        return self.text_model().rotary_emb(h, pos)

    def llm_position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """(P, B, L) -> the text model's position_ids (1-D RoPE: (B, L))."""
        return pos[0]

    def vision_attention_modules(self) -> list[nn.Module]:
        return []

    def on_vision_attention(self, run: _Run, layer: int, module: nn.Module, query: torch.Tensor,
                            key: torch.Tensor, kwargs: dict) -> None:
        """Called (in the vision pass) for each vision attention module; capture rows/keys."""

    def encode(self, images: list, prompts: list[str]) -> Encoded:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def split_sample(self, enc: Encoded, b: int) -> SampleLayout:
        """Default: one contiguous run of `image_token_id`; 1-D positions from 0."""
        ids = enc.input_ids[b][enc.attention_mask[b].bool()]
        where = (ids == self.image_token_id).nonzero().flatten()
        if where.numel() == 0:
            raise RunError("the prompt has no image placeholder token; the processor did not insert the image")
        s, e = int(where[0]), int(where[-1]) + 1
        if e - s != where.numel():
            raise RunError("the image placeholders are not one contiguous block (one image per prompt is supported)")
        pos = torch.arange(ids.numel())[None]
        return SampleLayout(ids[:s].cpu(), ids[e:].cpu(), e - s, s, pos[:, :s], pos[:, s:e], pos[:, e:])

    def vision_forward(self, run: _Run) -> VisionOut:
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def read_vision_signal(self, run: _Run, req: SignalRequest, b: int) -> torch.Tensor:
        raise RunError(f"{self.family} adapter cannot give signal {req.kind}")

    def check_request(self, req: SignalRequest) -> str | None:
        """Family checks of one request's arguments (e.g. layer range); a message or None."""
        return None

    def geometry(self, run: _Run, b: int) -> Geometry:
        raise NotImplementedError

    def visual_positions(self, layout: SampleLayout, ids: torch.Tensor, plan: PositionPlan | None) -> torch.Tensor:
        """Absolute positions (P, k) for kept visual tokens `ids` (1-D default)."""
        s = layout.pos_image[:, :1]
        if plan is None:
            return s + torch.arange(ids.numel())[None]
        if plan.offsets.numel() != ids.numel():
            raise RunError("the position plan does not match the kept tokens")
        return s + plan.offsets.reshape(1, -1).long()

    # ---- checks --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    def model_variables(self) -> dict[str, Any]:
        """Values of the pipeline model variables (pipeline.MODEL_VARIABLES) for this model."""
        vc = getattr(self.model.config, "vision_config", None)
        depth = getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", None)
        out: dict[str, Any] = {"family": self.family, "llm_layers": self.n_layers}
        if depth:
            out["vision_layers"] = int(depth)
        return out

    def check_pipeline(self, ex: Executor) -> None:
        """Raise RunError before any forward pass for anything this model cannot do."""
        problems = []
        for site in ex.sites():
            if site.layer is not None and site.layer >= self.n_layers:
                problems.append(f"site {site} is past the last LLM layer ({self.n_layers - 1}); "
                                + layer_variable_hint(ex.pipeline, site))
        for req in ex.requests():
            if req.kind not in self.supported_signals:
                problems.append(f"signal {req.kind!r} (read at {req.site}) is not available for the {self.family} "
                                f"family; it gives: {', '.join(sorted(self.supported_signals))}")
                continue
            msg = self.check_request(req)
            if msg:
                problems.append(msg)
        if problems:
            raise RunError(f"pipeline {ex.pipeline.name!r} cannot run on {self.name}:\n  - " + "\n  - ".join(problems))

    # ---- hooks ---------------------------------------------------------------------------
    def _attn_impls(self) -> dict[str, str]:
        cfg = self.model.config
        out = {}
        for sub in ("vision_config", "text_config"):
            c = getattr(cfg, sub, None)
            if c is not None:
                out[sub] = c._attn_implementation
        return out

    @contextmanager
    def session(self, run: _Run | None = None):
        """Install the attention function and layer hooks; always restore on exit."""
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        saved = self._attn_impls()
        handles = []
        adapter = self
        impl = self.attn_implementation
        own: dict[type, Any] = {}  # module class -> its modeling file's eager_attention_forward

        def forward_of(module):
            if impl == "sdpa":
                return sdpa_attention_forward
            if impl == "eager":
                cls = type(module)
                if cls not in own:
                    import sys

                    own[cls] = sys.modules[cls.__module__].eager_attention_forward
                return own[cls]
            return ALL_ATTENTION_FUNCTIONS[impl]

        def attention(module, query, key, value, attention_mask, **kwargs):
            out = forward_of(module)(module, query, key, value, attention_mask, **kwargs)
            r = adapter._run
            if r is not None and r.phase in ("prefill", "vision"):
                where = adapter._attn_index.get(id(module))
                if where is not None:
                    if where[0] == "vision":
                        adapter.on_vision_attention(r, where[1], module, query, key, kwargs)
                    elif where[1] in r.rows_attn:
                        adapter._rows_from_attention(r, where[1], module, query, key)
            return out

        AttentionInterface.register(self.attn_name, attention)
        AttentionMaskInterface.register(self.attn_name, sdpa_mask if impl == "sdpa" else ALL_MASK_ATTENTION_FUNCTIONS[impl])
        self._attn_index = {id(m): ("vision", i) for i, m in enumerate(self.vision_attention_modules())}
        for i, layer in enumerate(self.decoder_layers()):
            self._attn_index[id(layer.self_attn)] = ("llm", i)
        try:
            self.model.set_attn_implementation({k: self.attn_name for k in saved})
            for i, layer in enumerate(self.decoder_layers()):
                handles.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            self._run = run
            yield self
        finally:
            self._run = None
            for h in handles:
                h.remove()
            try:
                self.model.set_attn_implementation(saved)
            finally:
                from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

                ALL_ATTENTION_FUNCTIONS._global_mapping.pop(self.attn_name, None)
                ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(self.attn_name, None)
                self._attn_index = {}

    def _make_layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            r = self._run
            if r is None or r.phase not in ("prefill", "decode"):
                return None
            return self._layer_pre(r, layer, module, args, kwargs)

        return hook

    # ---- the LLM-side machinery ------------------------------------------------------------
    def _layer_pre(self, r: _Run, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        h = args[0] if args else kwargs["hidden_states"]
        if r.phase == "prefill":
            seg = r.segment_of(layer)
            first = seg is r.segments[0]
            cos, sin = kwargs["position_embeddings"] if first else self._segment_inputs(seg, h)[1]
            if layer in r.llm_sites:
                self._capture_pre(r, layer, module, h, cos, sin, seg)
                site = Site.llm(layer)
                acts = _host_keeps(r.ex.run_site(r.state, site, self._reader(r), r.seed))
                if any(acts):
                    new = self._apply_llm_keep(r, layer, seg, h, acts)
                    if new is not None:
                        h = self._gather_hidden(h, new, seg, acts, r)
                        r.segments.append(new)
                        seg, first = new, False
                        cos, sin = self._segment_inputs(seg, h)[1]
            elif layer in r.rows_pre or layer in r.hidden_at:
                self._capture_pre(r, layer, module, h, cos, sin, seg)
            if h.shape[1] != seg.valid.shape[1]:
                raise RunError(f"internal: layer {layer} got {h.shape[1]} tokens, layout says {seg.valid.shape[1]}")
            for b in range(r.B):
                r.counts[b].append(int(seg.valid[b].sum()) - seg.n_text[b])
            if first:
                return None
            mask, pe, pos_ids = self._segment_inputs(seg, h)
            return self._substitute(args, kwargs, h, mask, pe, pos_ids)
        # decode
        seg = r.segment_of(layer)
        if seg is r.segments[0]:
            return None
        mask, pe, pos_ids = self._step_inputs(r, seg, h)
        return self._substitute(args, kwargs, h, mask, pe, pos_ids)

    def _segment_inputs(self, seg: Segment, h: torch.Tensor):
        """(4-D mask, (cos, sin), position_ids) of a segment at prefill, on h's device: built
        once per segment (and device, under a device_map), not per layer."""
        cache = seg.__dict__.setdefault("_on_device", {})
        if h.device not in cache:
            pos_ids = self.llm_position_ids(seg.pos.to(h.device))
            valid = seg.valid.to(h.device)
            cache[h.device] = (self._impl_mask(self._prefill_mask(valid), valid, h.dtype), self.rotary(h, pos_ids),
                               pos_ids)
        return cache[h.device]

    def _step_inputs(self, r: _Run, seg: Segment, h: torch.Tensor):
        """Like `_segment_inputs` for one decode step: built once per step and segment from
        `key_valid` / `last_pos`, which live on the model's device during decoding."""
        key = (getattr(r, "step", 0), h.device)
        cached = seg.__dict__.get("_step_cache")
        if cached is None or cached[0] != key:
            q = h.shape[1]
            pos = seg.last_pos.to(h.device)[:, :, None] + 1 + torch.arange(q, device=h.device)
            pos_ids = self.llm_position_ids(pos)
            kv = seg.key_valid.to(h.device)
            cached = (key, self._impl_mask(self._decode_mask(kv, q), kv, h.dtype), self.rotary(h, pos_ids), pos_ids)
            seg.__dict__["_step_cache"] = cached
        return cached[1:]

    @staticmethod
    def _substitute(args, kwargs, h, mask, pe, pos_ids):
        kwargs = dict(kwargs)
        if args:
            args = (h,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = h
        kwargs["attention_mask"] = mask
        kwargs["position_embeddings"] = pe
        if "position_ids" in kwargs:
            kwargs["position_ids"] = pos_ids
        return args, kwargs

    def _impl_mask(self, allowed: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype):
        """The (B, 1, q, kv) bool mask in the form the attention implementation takes: sdpa the
        bool mask; eager an additive float mask; flash attention the 2-D key padding mask
        (None when nothing is padded), with causality from the kernel itself."""
        if self.attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        if self.attn_implementation.startswith("flash"):
            return None if bool(key_valid.all()) else key_valid.long()
        return allowed

    def _prefill_mask(self, valid: torch.Tensor) -> torch.Tensor:
        B, L = valid.shape
        causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
        m = causal[None] & valid[:, None, :]
        m = m | torch.eye(L, dtype=torch.bool, device=valid.device)[None]  # padded rows see themselves (no NaN)
        return m[:, None]

    def _decode_mask(self, key_valid: torch.Tensor, q: int) -> torch.Tensor:
        B, kv = key_valid.shape
        qi = torch.arange(q, device=key_valid.device)[:, None] + (kv - q)
        kj = torch.arange(kv, device=key_valid.device)[None]
        m = (kj <= qi)[None] & key_valid[:, None, :]
        return m[:, None]

    # signals inside the LLM ---------------------------------------------------------------
    @staticmethod
    def _query_index(seg: Segment, b: int, queries: Queries) -> torch.Tensor:
        """Sequence indices of the query rows; "last" is the last PROMPT token, also in a
        cache-free recompute that appends generated tokens (so both select the same)."""
        L = seg.valid.shape[1] - (seg.n_extra[b] if seg.n_extra else 0)
        if queries.which == "last":
            return torch.tensor([L - 1])
        if queries.which == "last_n":
            n = min(queries.n, L - seg.post_start[b])
            return torch.arange(L - n, L)
        return torch.arange(seg.post_start[b], L)

    def _rows(self, q: torch.Tensor, k: torch.Tensor, seg: Segment, b: int, qidx: torch.Tensor, scaling: float,
              softmax_over: str) -> torch.Tensor:
        """q (H, nq, hd) rows at sequence indices qidx; k (H, L, hd) all keys of sample b.
        Returns (H, nq, n_img) post-softmax rows over the image keys of the segment."""
        img = seg.img_idx[b].to(k.device)
        qi = qidx.to(k.device)[:, None]
        if softmax_over == "image":
            logits = torch.einsum("hqd,hkd->hqk", q.float(), k[:, img].float()) * scaling
            allowed = img[None, :] <= qi
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            return torch.softmax(logits, dim=-1)
        logits = torch.einsum("hqd,hkd->hqk", q.float(), k.float()) * scaling
        kj = torch.arange(k.shape[1], device=k.device)[None]
        allowed = (kj <= qi) & seg.valid[b].to(k.device)[None]
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        return torch.softmax(logits, dim=-1)[:, :, img]

    def _rows_from_attention(self, r: _Run, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor):
        seg = r.segment_of(layer)
        groups = query.shape[1] // key.shape[1]
        for req in r.rows_attn[layer]:
            vals = []
            for b in range(r.B):
                qidx = self._query_index(seg, b, req.queries)
                k = key[b].repeat_interleave(groups, dim=0)
                rows = self._rows(query[b][:, qidx.to(query.device)], k, seg, b, qidx, module.scaling,
                                  req.softmax_over)
                vals.append((rows, seg.img_ids[b]))
            r.captured[req.key] = vals

    def _capture_pre(self, r: _Run, layer: int, module: nn.Module, h: torch.Tensor, cos, sin, seg: Segment):
        for req in r.hidden_at.get(layer, []):
            r.captured[req.key] = [(h[b, seg.img_idx[b].to(h.device)], seg.img_ids[b]) for b in range(r.B)]
        reqs = r.rows_pre.get(layer, [])
        if not reqs:
            return
        attn = module.self_attn
        hd = attn.head_dim
        x = module.input_layernorm(h)
        for req in reqs:
            rope = req.rope
            vals = []
            for b in range(r.B):
                qidx = self._query_index(seg, b, req.queries).to(h.device)
                q = attn.q_proj(x[b, qidx]).view(qidx.numel(), -1, hd).transpose(0, 1)
                k = attn.k_proj(x[b]).view(x.shape[1], -1, hd).transpose(0, 1)
                if rope:
                    q = apply_rope(q, cos[b, qidx], sin[b, qidx])
                    k = apply_rope(k, cos[b], sin[b])
                k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                rows = self._rows(q, k, seg, b, qidx, attn.scaling, req.softmax_over)
                vals.append((rows, seg.img_ids[b]))
            r.captured[req.key] = vals

    # applying a Keep at llm.K ---------------------------------------------------------------
    def _apply_llm_keep(self, r: _Run, layer: int, seg: Segment, h: torch.Tensor, acts: list[list[Keep]]):
        """New segment for layers >= `layer` (with `_gather`/`_repl`), or None when nothing changes."""
        B, L = seg.valid.shape
        views = []
        changed = False
        for b in range(B):
            layout = r.layouts[b]
            src = torch.arange(L)  # row of h each sequence slot comes from (-1: replacement only)
            pos = seg.pos[:, b].clone()
            ii, ids = seg.img_idx[b].clone(), seg.img_ids[b].clone()
            ps = seg.post_start[b]
            rows: dict[int, torch.Tensor] = {}  # slot -> replacement hidden row
            for act in acts[b]:
                keep_ids = act.ids.long()
                cur = {int(t): int(j) for t, j in zip(ids.tolist(), ii.tolist())}
                slots = []
                for t in keep_ids.tolist():
                    if t not in cur and act.tokens is None:
                        raise RunError(f"node {act.node!r} keeps token {t} at {act.site}, which is not present there")
                    slots.append(cur.get(t, -1))
                slots_t = torch.tensor(slots, dtype=torch.long)
                first = int(ii.min()) if ii.numel() else ps
                before, after = torch.arange(first), torch.arange(ps, src.numel())
                if act.positions is not None:
                    vpos = self.visual_positions(layout, keep_ids, act.positions).to(pos)
                else:  # keep current ids; a token with no current row gets its original id
                    fallback = layout.pos_image[:, keep_ids.clamp(0, layout.n_image - 1)].to(pos)
                    vpos = torch.where(slots_t[None] >= 0, pos[:, slots_t.clamp(min=0)], fallback)
                post_pos = pos[:, after]
                follows = act.positions.text_follows if act.positions is not None else "original"
                if follows == "compact" and post_pos.shape[1]:
                    top = vpos.max() if vpos.numel() else (pos[:, before].max() if before.numel() else -1)
                    post_pos = post_pos - post_pos[:, :1] + top + 1
                order = torch.cat([before, slots_t, after])
                new_src = torch.where(order >= 0, src[order.clamp(min=0)], -1)
                new_pos = torch.cat([pos[:, before], vpos, post_pos], dim=1)
                new_rows: dict[int, torch.Tensor] = {}
                if act.tokens is not None:
                    if act.tokens.space != "llm":
                        raise RunError(f"node {act.node!r}: tokens applied at {act.site} must be in llm space "
                                       f"(got {act.tokens.space!r}); merge before the LLM or project them")
                    for j in range(keep_ids.numel()):
                        new_rows[before.numel() + j] = act.tokens.values[j]
                else:
                    for jn, jo in enumerate(order.tolist()):
                        if jo in rows:
                            new_rows[jn] = rows[jo]
                if not (torch.equal(new_src, src) and torch.equal(new_pos, pos)) or new_rows or rows:
                    changed = True
                src, pos, rows = new_src, new_pos, new_rows
                ii = torch.arange(before.numel(), before.numel() + keep_ids.numel())
                ids = keep_ids.clone()
                ps = before.numel() + keep_ids.numel()
            views.append((src, pos, ii, ids, ps, rows))
        if not changed:
            return None
        # drop the old left padding, then left-pad to the new common length
        npads = [L - int(seg.valid[b].sum()) for b in range(B)]
        newL = max(v[0].numel() - npads[b] for b, v in enumerate(views))
        P = seg.pos.shape[0]
        valid = torch.zeros(B, newL, dtype=torch.bool)
        pos_all = torch.ones(P, B, newL, dtype=seg.pos.dtype)
        gather = torch.zeros(B, newL, dtype=torch.long)
        img_idx, img_ids, post_start, repl = [], [], [], []
        for b, (src, pos, ii, ids, ps, rows) in enumerate(views):
            npad = npads[b]
            n = src.numel() - npad
            shift = newL - n
            valid[b, shift:] = True
            pos_all[:, b, shift:] = pos[:, npad:]
            gather[b, shift:] = src[npad:]
            gather[b, :shift] = npad  # padding copies the first valid row
            img_idx.append(ii - npad + shift)
            img_ids.append(ids)
            post_start.append(ps - npad + shift)
            repl.append({j - npad + shift: v for j, v in rows.items()})
            for j in (gather[b] < 0).nonzero().flatten().tolist():
                if j not in repl[b]:
                    raise RunError("a kept token has neither a current row nor replacement features")
        new = Segment(layer, valid, pos_all, img_idx, img_ids, post_start, list(seg.n_text), list(seg.n_extra))
        new._gather = gather  # type: ignore[attr-defined]
        new._repl = repl  # type: ignore[attr-defined]
        return new

    def _gather_hidden(self, h: torch.Tensor, new: Segment, seg: Segment, acts, r: _Run) -> torch.Tensor:
        gather = new._gather.to(h.device)  # type: ignore[attr-defined]
        out = torch.gather(h, 1, gather.clamp(min=0)[:, :, None].expand(-1, -1, h.shape[-1]))
        for b, rows in enumerate(new._repl):  # type: ignore[attr-defined]
            for j, v in rows.items():
                out[b, j] = v.to(out)
        return out

    # the reader ---------------------------------------------------------------------------
    def _reader(self, r: _Run):
        def read(req: SignalRequest, b: int) -> torch.Tensor:
            kind = req.kind
            if kind == "external":
                name = req.arg("name")
                if name not in r.external:
                    raise RunError(f"the pipeline reads external values {name!r}; pass them to the run "
                                   f"(external={{{name!r}: tensor}}); given: {', '.join(r.external) or 'none'}")
                v = r.external[name]
                return v[b] if isinstance(v, (list, tuple)) else v
            if kind == "pre_llm.visual":
                return r.blocks[b].rows
            if kind == "pre_llm.text":
                return self.embed(r.layouts[b].prompt_post_ids)
            if kind in ("llm.attention", "llm.hidden"):
                if req.key not in r.captured:
                    raise RunError(f"internal: signal {req.key} was not captured")
                val, ids = r.captured[req.key][b]
                cols = _columns(ids.to(val.device), r.state.present[b].to(val.device))
                if cols is None:
                    raise RunError(f"signal {req.key}: a token present now was not present at layer {req.arg('layer')}")
                out = val[..., cols, :] if kind == "llm.hidden" else val[..., cols]
                return out.to(self.device)  # a no-op unless a device_map put layer L elsewhere
            if kind.startswith("vision."):
                return self.read_vision_signal(r, req, b)
            raise RunError(f"{self.family} adapter cannot give signal {kind}")

        return read

    # ---- the run ---------------------------------------------------------------------------
    def _pre_llm(self, r: _Run, vis: VisionOut) -> None:
        """Vision and pre_llm sites; leaves r.blocks."""
        reader = self._reader(r)
        vis_site, pre_site = Site("vision"), Site("pre_llm")
        for s in r.sites:
            if s.layer is None and s not in (vis_site, pre_site):
                raise RunError(f"unsupported site {s}")
        proj = vis.projected
        r.blocks = [Block(torch.arange(proj[b].shape[0]), proj[b]) for b in range(r.B)]
        for site in (vis_site, pre_site):
            if site not in r.sites:
                continue
            acts = _host_keeps(r.ex.run_site(r.state, site, reader, r.seed))
            for b in range(r.B):
                for act in acts[b]:
                    r.blocks[b] = self._apply_pre_keep(r, b, act, vis, r.blocks[b])

    def _apply_pre_keep(self, r: _Run, b: int, act: Keep, vis: VisionOut, block: Block) -> Block:
        ids = act.ids.long()
        if act.tokens is not None:
            vals = act.tokens.values
            if act.tokens.space == "vision":
                rows = self.project(vals.to(self.device, self.dtype)[None])[0]
            elif act.tokens.space == "llm":
                rows = vals.to(self.device, self.dtype)
            else:
                raise RunError(f"node {act.node!r}: unknown token space {act.tokens.space!r} (vision or llm)")
        else:
            where = {int(t): j for j, t in enumerate(block.ids.tolist())}
            parts = []
            for t in ids.tolist():
                if t in where:
                    parts.append(block.rows[where[t]])
                elif t == -1 and vis.cls[b] is not None:
                    parts.append(self.project(vis.cls[b].to(self.device, self.dtype)[None, None])[0, 0])
                else:
                    raise RunError(f"node {act.node!r} keeps token {t} at {act.site}, which is not present there")
            rows = torch.stack(parts) if parts else block.rows[:0]
        layout = r.layouts[b]
        if act.positions is not None:
            return Block(ids, rows, self.visual_positions(layout, ids, act.positions), act.positions.text_follows)
        return Block(ids, rows, None, "compact")

    def _assemble(self, r: _Run) -> tuple[torch.Tensor, torch.Tensor, Segment]:
        """inputs_embeds (B, L, d), 2-D mask, and segment 0 for the LLM."""
        embs, poss, lens, img_idx, img_ids, post_start, n_text = [], [], [], [], [], [], []
        for b in range(r.B):
            lay, blk = r.layouts[b], r.blocks[b]
            k = blk.ids.numel()
            vpos = blk.positions if blk.positions is not None else self.visual_positions(lay, blk.ids, None)
            post = lay.pos_post
            follows = blk.text_follows if blk.positions is not None else "compact"
            if follows == "compact" and post.shape[1]:
                top = vpos.max() if k else (lay.pos_pre.max() if lay.pos_pre.numel() else -1)
                post = post - post[:, :1] + top + 1
            ids_all = torch.cat([lay.pre_ids, lay.post_ids])
            e = self.embed(ids_all)
            npre = lay.pre_ids.numel()
            embs.append(torch.cat([e[:npre], blk.rows.to(e), e[npre:]]))
            poss.append(torch.cat([lay.pos_pre, vpos.to(lay.pos_pre), post], dim=1))
            lens.append(embs[-1].shape[0])
            img_ids.append(blk.ids)
            n_text.append(ids_all.numel())
        L = max(lens)
        d = embs[0].shape[-1]
        P = poss[0].shape[0]
        x = torch.zeros(r.B, L, d, dtype=embs[0].dtype, device=self.device)
        am = torch.zeros(r.B, L, dtype=torch.long)
        pos = torch.ones(P, r.B, L, dtype=torch.long)
        for b in range(r.B):
            sh = L - lens[b]
            x[b, sh:] = embs[b]
            am[b, sh:] = 1
            pos[:, b, sh:] = poss[b]
            npre = r.layouts[b].pre_ids.numel()
            k = r.blocks[b].ids.numel()
            img_idx.append(torch.arange(sh + npre, sh + npre + k))
            post_start.append(sh + npre + k)
        seg = Segment(0, am.bool(), pos, img_idx, img_ids, post_start, n_text,
                      [r.layouts[b].n_extra for b in range(r.B)])
        return x, am, seg

    def _start(self, pipeline: Pipeline, images, prompts, external, seed, extra_ids=None) -> _Run:
        try:
            pipeline = pipeline.bind_model(self.model_variables())
        except PipelineError as exc:
            raise RunError(f"pipeline {pipeline.name!r} does not fit this model "
                           f"({self.model_variables()}):\n{exc}") from None
        ex = Executor(pipeline)
        self.check_pipeline(ex)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(prompts):
            raise RunError(f"{len(images)} images for {len(prompts)} prompts; give one image per prompt")
        enc = self.encode(list(images), list(prompts))
        r = _Run(self, ex, enc, external, seed)
        r.layouts = [self.split_sample(enc, b) for b in range(r.B)]
        if extra_ids is not None:
            for b in range(r.B):
                r.layouts[b].extend(torch.as_tensor(extra_ids[b]))
        r.counts = [[] for _ in range(r.B)]
        return r

    @torch.no_grad()
    def _prefill(self, r: _Run, use_cache: bool, all_logits: bool = False):
        from transformers import DynamicCache

        r.phase = "vision"
        vis = self.vision_forward(r)
        r.state = r.ex.start([self.geometry(r, b) for b in range(r.B)], device=self.device)
        self._pre_llm(r, vis)
        x, am, seg0 = self._assemble(r)
        r.segments = [seg0]
        cache = DynamicCache(config=self.text_model().config) if use_cache else None
        r.phase = "prefill"
        out = self.text_model()(inputs_embeds=x, attention_mask=am.to(self.device),
                                position_ids=self.llm_position_ids(seg0.pos).to(self.device),
                                cache=cache, use_cache=use_cache)
        hs = out.last_hidden_state
        logits = self.lm_head()(hs if all_logits else hs[:, -1:])
        return logits, cache

    def forward_logits(self, pipeline: Pipeline, images, prompts, external: dict | None = None,
                       seed: int | None = None, extra_ids=None) -> tuple[torch.Tensor, _Run]:
        """Cache-free prefill; logits for every position of the (pruned) sequence.
        `extra_ids[b]` are appended after the prompt (recompute of generated tokens)."""
        r = self._start(pipeline, images, prompts, external, seed, extra_ids)
        with self.session(r):
            logits, _ = self._prefill(r, use_cache=False, all_logits=True)
        r.phase = "idle"
        return logits, r

    @torch.no_grad()
    def generate(self, pipeline: Pipeline, images, prompts, max_new_tokens: int = 16, external: dict | None = None,
                 seed: int | None = None, stop_at_eos: bool = True, return_logits: bool = False,
                 sampling: Sampling | None = None) -> RunReport:
        """Decoding with a KV cache over a left-padded batch, greedy unless `sampling` says
        otherwise; returns a RunReport (with `.step_logits`, a list of (B, V) tensors, when
        return_logits)."""
        r = self._start(pipeline, images, prompts, external, seed)
        pick = (sampling or GREEDY).picker(self.device, pipeline.spec.seed if seed is None else seed)
        eos = self._eos_ids()
        step_logits = []
        new_tokens: list[list[int]] = [[] for _ in range(r.B)]
        finished = torch.zeros(r.B, dtype=torch.bool)
        decode_s = 0.0
        steps = 0
        mem = _PeakMemory(self.device)
        with self.session(r), mem:
            _sync(self.device)
            t0 = time.perf_counter()
            logits, cache = self._prefill(r, use_cache=True)
            _sync(self.device)
            prefill_s = time.perf_counter() - t0
            r.phase = "decode"
            for seg in r.segments:  # decoding state lives on the device: no per-step copies
                seg.key_valid = seg.valid.to(self.device, copy=True)
                seg.last_pos = seg.pos[:, :, -1].to(self.device, copy=True)
            grow = torch.ones(r.B, 1, dtype=torch.bool, device=self.device)
            last_logits = logits[:, -1].float()
            for step in range(max_new_tokens):
                if return_logits:
                    step_logits.append(last_logits.cpu())
                nxt_dev = pick(last_logits)
                nxt = nxt_dev.cpu()  # the one host copy per step: the token ids
                for b in range(r.B):
                    if not finished[b]:
                        new_tokens[b].append(int(nxt[b]))
                        if stop_at_eos and int(nxt[b]) in eos:
                            finished[b] = True
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                t1 = time.perf_counter()
                for seg in r.segments:
                    seg.key_valid = torch.cat([seg.key_valid, grow], dim=1)
                seg0 = r.segments[0]
                pos0 = seg0.last_pos[:, :, None] + 1
                r.step = step  # type: ignore[attr-defined]
                out = self.text_model()(inputs_embeds=self.embed(nxt_dev[:, None]), attention_mask=seg0.key_valid.long(),
                                        position_ids=self.llm_position_ids(pos0), cache=cache, use_cache=True)
                for seg in r.segments:
                    seg.last_pos = seg.last_pos + 1
                last_logits = self.lm_head()(out.last_hidden_state[:, -1]).float()
                _sync(self.device)
                decode_s += time.perf_counter() - t1
                steps += 1
            r.phase = "idle"
        kv = 0
        for lay in getattr(cache, "layers", []):
            for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
                if isinstance(t, torch.Tensor):
                    kv += t.numel() * t.element_size()
        rep = self._report(r, new_tokens, prefill_s, decode_s, steps, mem, kv)
        rep.schedule = r.ex.pipeline.schedule()
        rep.signals = [f"{q.key} at {q.site}" for q in r.ex.requests()]
        if return_logits:
            rep.step_logits = step_logits  # type: ignore[attr-defined]
        return rep

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    getattr(self.model.config, "text_config", None)):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    def decode_text(self, ids: list[int]) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(ids, skip_special_tokens=True)

    def _report(self, r: _Run, new_tokens, prefill_s, decode_s, steps, mem: _PeakMemory, kv: int) -> RunReport:
        kept: list[dict[str, list[int]]] = []
        actions: list[list[dict[str, Any]]] = []
        for b in range(r.B):
            kb: dict[str, list[int]] = {}
            ab = []
            for a in r.state.actions[b]:
                kb[a.site] = a.ids.tolist()
                ab.append({"site": a.site, "node": a.node, "kept": int(a.ids.numel()),
                           "merged": a.tokens is not None,
                           "positions": None if a.positions is None else a.positions.policy})
            kept.append(kb)
            actions.append(ab)
        counts = [c[: self.n_layers] for c in r.counts]
        flops = [self._flops(r, b, counts[b]) for b in range(r.B)]
        return RunReport(
            model=self.name, pipeline=r.ex.pipeline.name,
            answers=[self.decode_text(t) for t in new_tokens], new_tokens=new_tokens,
            visual_tokens_per_layer=counts,
            visual_tokens_avg=[sum(c) / len(c) if c else 0.0 for c in counts],
            visual_tokens_full=r.layouts[0].n_image if r.layouts else 0,
            prefill_ms=prefill_s * 1e3, decode_ms_per_token=(decode_s / steps * 1e3) if steps else 0.0,
            decode_steps=steps, peak_memory_bytes=mem.peak, peak_memory_source=mem.source, kv_cache_bytes=kv,
            node_ms={k: v * 1e3 for k, v in r.state.timings.items()}, kept=kept, actions=actions,
            device=str(self.device), dtype=str(self.dtype).replace("torch.", ""), flops=flops,
            attn_implementation=self.attn_implementation,
            peak_memory_above_start_bytes=(mem.peak - mem.start) if self.device.type == "cuda" else None,
            visual_tokens_full_per_sample=[lay.n_image for lay in r.layouts],
        )

    def _flops(self, r: _Run, b: int, counts: list[int]) -> dict[str, Any]:
        """FLOPs of sample b (nuwa_graph/flops.py); a model whose config lacks a field says so."""
        from ..flops import run_flops

        try:
            return run_flops(self.model.config, int(r.segments[0].n_text[b]), counts, r.layouts[b].n_image,
                             r.state.geometries[b].grid)
        except (AttributeError, TypeError, ValueError) as exc:
            return {"unavailable": f"FLOPs cannot be counted for this config: {exc}"}


def layer_variable_hint(pipe: Pipeline, site: Site) -> str:
    """'change K (now 40), e.g. --set K=...': the pipeline variables that put a node at `site`."""
    from ..validation import layer_variable_hint as hint

    return hint(pipe.spec, {n for n, s in pipe.sites.items() if s == site}, pipe.variables)


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'fp32' | 'bfloat16' | 'bf16' | 'float16' | 'fp16' -> torch dtype (RunError otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if str(name).lower() not in table:
        raise RunError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return table[str(name).lower()]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default, every paper number), or sampled with
    `temperature`, then restricted to the `top_k` most likely tokens (0: all) and the smallest set
    whose probability reaches `top_p` (1.0: all), as transformers' samplers do. Draws come from a
    generator on the model's device seeded with the run's seed, so a seed repeats its answers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise RunError(f"temperature={self.temperature}: it must be a positive number (greedy: do_sample=False)")
        if self.top_k < 0:
            raise RunError(f"top_k={self.top_k}: it must be 0 (all tokens) or positive")
        if not 0 < self.top_p <= 1:
            raise RunError(f"top_p={self.top_p}: it must be in (0, 1]")

    def picker(self, device: torch.device, seed: int):
        """A function (B, V) float logits -> (B,) token ids on the logits' device."""
        if not self.do_sample:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))

        def pick(logits: torch.Tensor) -> torch.Tensor:
            scores = logits / self.temperature
            if self.top_k > 0:
                kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if self.top_p < 1:
                sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
                cum = sorted_scores.softmax(-1).cumsum(-1)
                drop = cum - sorted_scores.softmax(-1) >= self.top_p  # keep up to the token that reaches top_p
                scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
            return torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]

        return pick


GREEDY = Sampling()


def load_kwargs(device: str, device_map: str | dict | None, attn_implementation: str) -> dict[str, Any]:
    """from_pretrained keyword arguments: the attention implementation, and the weights loaded
    straight onto `device` (or spread by `device_map`, e.g. 'auto') where accelerate is
    installed; without it the model loads to CPU RAM and is moved (device_map needs it)."""
    import importlib.util

    kw: dict[str, Any] = {"attn_implementation": check_attn_implementation(attn_implementation)}
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if device_map is not None:
        if not has_accelerate:
            raise RunError(f"device_map={device_map!r} needs the accelerate package (pip install accelerate)")
        kw["device_map"] = device_map
    elif has_accelerate:
        kw["device_map"] = str(device)
    return kw


def load_checkpoint(model_cls, id_or_path: str, dtype: torch.dtype, device: str, device_map: str | dict | None,
                    attn_implementation: str) -> tuple[nn.Module, torch.device]:
    """`model_cls.from_pretrained` with load_kwargs, moved to `device` unless a device_map placed
    it; returns the model and the device its inputs go to."""
    kw = load_kwargs(device, device_map, attn_implementation)
    model = model_cls.from_pretrained(id_or_path, dtype=dtype, **kw)
    if "device_map" not in kw:
        model = model.to(device)
    return model, input_device(model, device)


def input_device(model: nn.Module, fallback: str | torch.device) -> torch.device:
    """The device of the model's input embeddings (where a device_map puts the first layer)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return torch.device(fallback)


__all__ = ["ADAPTERS", "ATTN_IMPLEMENTATIONS", "GREEDY", "Block", "Encoded", "LLM_SIGNALS", "RunReport", "SampleLayout", "Sampling", "Segment", "VLMAdapter",
           "VisionOut", "apply_rope", "check_attn_implementation", "dtype_of", "input_device", "load_checkpoint", "load_kwargs",
           "register_adapter"]
