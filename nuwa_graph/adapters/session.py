"""The hook session: the registered attention function and the decoder-layer pre-hooks.

`session(run)` installs, for one run, an attention function (`AttentionInterface` +
`AttentionMaskInterface`, one unique name per adapter instance) that calls the stock
implementation for the output and, during prefill, computes only the attention ROWS a
pipeline asked for; and a forward pre-hook per decoder layer that runs the `llm.K` sites and
hands layers of a later segment their own hidden states, 4-D mask, RoPE (cos, sin) and
position ids, also during decoding. Everything is removed on exit, also on error, and the
attention implementation of both sub-models is restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..sites import Site
from . import llm_signals
from .layout import Segment, decode_mask, gather_hidden, host_keeps, keep_in_segment, prefill_mask
from .signal_rows import SignalRows
from .state import AdapterRun


class HookSession(SignalRows):
    """Adapter layer: installs and removes the hooks a run needs."""

    def _attn_impls(self) -> dict[str, str]:
        cfg = self.model.config
        out = {}
        for sub in ("vision_config", "text_config"):
            c = getattr(cfg, sub, None)
            if c is not None:
                out[sub] = c._attn_implementation
        return out

    @contextmanager
    def session(self, run: AdapterRun | None = None):
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
                    if where[0] == "llm" and where[1] in r.llm_plan.keys_attn:
                        llm_signals.capture_keys(r, where[1], query, key)
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
            self._layer_hooks = handles
            self._run = run
            yield self
        finally:
            self._run = None
            self._layer_hooks = []
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

    def _reader(self, r: AdapterRun):
        """The base reader, plus `llm.keys` / `llm.token_hidden` (llm_signals.py)."""
        base = super()._reader(r)

        def read(req, b: int) -> torch.Tensor:
            if req.kind in ("llm.keys", "llm.token_hidden"):
                return llm_signals.read(r, req, b).to(self.device)
            return base(req, b)

        return read

    def _release_layer_hooks(self) -> None:
        """Remove the decoder-layer hooks before the session ends: `generate` does so after a
        prefill that left one segment, whose decode steps the hooks would only pass through
        (a hook makes every layer call take torch's slow path)."""
        for h in self._layer_hooks:
            h.remove()
        self._layer_hooks = []

    def _make_layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            r = self._run
            if r is None or r.phase not in ("prefill", "decode"):
                return None
            return self._layer_pre(r, layer, module, args, kwargs)

        return hook

    def _layer_pre(self, r: AdapterRun, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        h = args[0] if args else kwargs["hidden_states"]
        if r.phase == "prefill":
            seg = r.segment_of(layer)
            first = seg is r.segments[0]
            cos, sin = kwargs["position_embeddings"] if first else self._prefill_tables(seg, h)[1]
            if layer in r.llm_plan.pre:
                llm_signals.capture_pre(self, r, layer, module, h, cos, sin, seg)
            if layer in r.llm_sites:
                self._capture_pre(r, layer, module, h, cos, sin, seg)
                assert r.state is not None
                acts = host_keeps(r.ex.run_site(r.state, Site.llm(layer), self._reader(r), r.seed))
                if any(acts):
                    new = keep_in_segment(layer, seg, acts, r.layouts, self.visual_positions)
                    if new is not None:
                        h = gather_hidden(h, new)
                        r.segments.append(new)
                        seg, first = new, False
                        cos, sin = self._prefill_tables(seg, h)[1]
            elif layer in r.rows_pre or layer in r.hidden_at:
                self._capture_pre(r, layer, module, h, cos, sin, seg)
            if h.shape[1] != seg.valid.shape[1]:
                raise RunError(f"internal: layer {layer} got {h.shape[1]} tokens, layout says {seg.valid.shape[1]}")
            for b in range(r.B):
                r.counts[b].append(int(seg.valid[b].sum()) - seg.n_text[b])
            if first:
                return None
            mask, pe, pos_ids = self._prefill_tables(seg, h)
            return self._substitute(args, kwargs, h, mask, pe, pos_ids)
        # decode
        seg = r.segment_of(layer)
        if seg is r.segments[0]:
            return None
        mask, pe, pos_ids = self._step_tables(r, seg, h)
        return self._substitute(args, kwargs, h, mask, pe, pos_ids)

    def _prefill_tables(self, seg: Segment, h: torch.Tensor) -> tuple[Any, ...]:
        """(4-D mask, (cos, sin), position_ids) of a segment at prefill, on h's device: built
        once per segment (and device, under a device_map), not per layer."""
        if h.device not in seg.tables:
            pos_ids = self.llm_position_ids(seg.pos.to(h.device))
            valid = seg.valid.to(h.device)
            seg.tables[h.device] = (self._impl_mask(prefill_mask(valid), valid, h.dtype), self.rotary(h, pos_ids),
                                    pos_ids)
        return seg.tables[h.device]

    def _step_tables(self, r: AdapterRun, seg: Segment, h: torch.Tensor) -> tuple[Any, ...]:
        """Like `_prefill_tables` for one decode step: built once per step and segment from
        `key_valid` / `last_pos`, which live on the model's device during decoding."""
        key = (r.step, h.device)
        if seg.step_tables is None or seg.step_tables[0] != key:
            assert seg.last_pos is not None and seg.key_valid is not None
            q = h.shape[1]
            pos = seg.last_pos.to(h.device)[:, :, None] + 1 + torch.arange(q, device=h.device)
            pos_ids = self.llm_position_ids(pos)
            kv = seg.key_valid.to(h.device)
            seg.step_tables = (key, self._impl_mask(decode_mask(kv, q), kv, h.dtype), self.rotary(h, pos_ids), pos_ids)
        return seg.step_tables[1:]

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
