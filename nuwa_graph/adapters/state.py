"""The state of one request (one prefill + decode) as the adapter's hooks see it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..executor import Executor, RunState
from ..signal_kinds import LLMKeys, LLMTokenHidden
from ..signals import LLMAttention, LLMHidden, SignalRequest
from ..sites import Site
from .layout import Block, Encoded, SampleLayout, Segment, VisionOut

if TYPE_CHECKING:
    from .family import FamilyHooks


def read_in_attention(req: SignalRequest) -> bool:
    """Whether an LLM signal with RoPE of a layer before its site is taken inside that layer's
    attention function (the rotated q/k exist only there); otherwise at the layer's input."""
    K = Site(req.site).layer
    return bool(getattr(req, "rope", False)) and K is not None and req.layer < K  # type: ignore[attr-defined]


class LLMSignalPlan:
    """Which decoder layers capture `llm.keys` / `llm.token_hidden` (adapters/llm_signals.py)."""

    def __init__(self, requests: list[SignalRequest]):
        self.keys_attn: dict[int, list[LLMKeys]] = {}  # layer -> keys taken in its attention function
        self.pre: dict[int, list[SignalRequest]] = {}  # layer -> values computed at its input (pre-hook)
        for req in requests:
            if isinstance(req, LLMKeys):
                if read_in_attention(req):
                    self.keys_attn.setdefault(req.layer, []).append(req)
                else:
                    self.pre.setdefault(req.layer, []).append(req)
            elif isinstance(req, LLMTokenHidden):
                self.pre.setdefault(req.layer, []).append(req)


class AdapterRun:
    """Per-request state: the layouts, blocks and segments, what the hooks capture, and
    which layers capture what (from the pipeline's signal requests)."""

    def __init__(self, adapter: FamilyHooks, ex: Executor, enc: Encoded, external: dict | None, seed: int | None):
        self.adapter = adapter
        self.ex = ex
        self.enc = enc
        self.external = external or {}
        self.seed = seed
        self.B = enc.input_ids.shape[0]
        self.sites = ex.sites()
        self.state: RunState | None = None
        self.layouts: list[SampleLayout] = []
        self.keys: list[str] | None = None  # per sample, its content key (context.sample_key)
        self.captured: dict[str, list[Any]] = {}  # signal key -> per sample value
        self.vision: dict[str, Any] = {}  # family scratch for vision captures
        self.text_rows: dict[int, Any] = {}  # per sample: pre_llm.text, embedded once
        self.vision_out: VisionOut | None = None  # the family's vision pass
        self.blocks: list[Block | None] = []  # None: the full projected block, not built yet
        self.segments: list[Segment] = []
        self.phase = "idle"  # vision | prefill | decode
        self.step = 0  # decoding step (keys the per-step mask and RoPE tables)
        self.counts: list[list[int]] = []  # per sample, per layer visual tokens (prefill)
        # what to capture in the LLM, from the requests
        self.llm_sites = {s.layer for s in self.sites if s.layer is not None}
        self.rows_attn: dict[int, list[LLMAttention]] = {}  # layer -> rope=True rows from the attention fn
        self.rows_pre: dict[int, list[LLMAttention]] = {}  # layer -> rows computed in the layer pre-hook
        self.hidden_at: dict[int, list[SignalRequest]] = {}
        self.llm_plan = LLMSignalPlan(ex.requests())  # llm.keys, llm.token_hidden (llm_signals.py)
        for req in ex.requests():  # typed and checked when the pipeline loaded (signals.py)
            if isinstance(req, LLMAttention):
                if read_in_attention(req):
                    self.rows_attn.setdefault(req.layer, []).append(req)
                else:
                    self.rows_pre.setdefault(req.layer, []).append(req)
            elif isinstance(req, LLMHidden):
                self.hidden_at.setdefault(req.layer, []).append(req)

    def segment_of(self, layer: int) -> Segment:
        seg = self.segments[0]
        for s in self.segments:
            if s.start <= layer:
                seg = s
        return seg
