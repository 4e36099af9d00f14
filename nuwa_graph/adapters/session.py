"""The hook session: the registered attention function and the decoder-layer pre-hooks.

`session(run)` installs, for one run, an attention function (`AttentionInterface` +
`AttentionMaskInterface`, one unique name per adapter instance) that calls the stock
implementation for the output and, during prefill, computes only the attention ROWS a
pipeline asked for; and a forward pre-hook per decoder layer that runs the `llm.K` sites and
hands layers of a later segment their own hidden states, 4-D mask, RoPE (cos, sin) and
position ids, also during decoding; and a forward hook on each layer the family names in
`post_layers()` (its `on_layer_output`, at prefill: Qwen3-VL's DeepStack). Everything is
removed on exit, also on error, and the attention implementation of both sub-models is
restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import RunError
from ..sites import Site
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
        # the session's name (attn_name) never says "flash": transformers would then load a flash
        # kernel BY that name (its hub-kernel loader, which fails); under flash the registered
        # function calls the kernel by its own name (_as_kernel), and the modeling code takes its
        # non-flash branches (Qwen's vision tower: one call per window, not one varlen call)

        def forward_of(module):
            if impl == "sdpa":
                return sdpa_attention_forward
            if impl == "eager":
                cls = type(module)
                if cls not in own:
                    import sys

                    own[cls] = sys.modules[cls.__module__].eager_attention_forward
                return own[cls]
            if impl.startswith("flash"):
                return _as_kernel(ALL_ATTENTION_FUNCTIONS[impl], impl)
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
            for i in sorted(self.post_layers()):  # the family's post-layer point (DeepStack)
                handles.append(self.decoder_layers()[i].register_forward_hook(self._make_post_hook(i)))
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

    def _make_post_hook(self, layer: int):
        """A forward hook on decoder `layer`: at prefill, the family's `on_layer_output` may
        change the layer's output (the layout is the one the layer saw: its segment)."""
        def hook(module, args, output):
            r = self._run
            if r is None or r.phase != "prefill":
                return None
            h = output[0] if isinstance(output, tuple) else output
            new = self.on_layer_output(r, layer, r.segment_of(layer), h)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _layer_pre(self, r: AdapterRun, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        h = args[0] if args else kwargs["hidden_states"]
        # under a device_map (accelerate) this hook runs BEFORE the layer's inputs are moved to its
        # device: h may still be on the previous layer's device and the RoPE tables on rotary_emb's
        dev = _device_of(module)
        if r.phase == "prefill":
            h = _to(h, dev)
            seg = r.segment_of(layer)
            first = seg is r.segments[0]
            cos, sin = (_to(t, dev) for t in kwargs["position_embeddings"]) if first else self._prefill_tables(seg, h)[1]
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
                if self.attn_implementation.startswith("flash") and kwargs.get("position_ids") is not None:
                    # not packed either (pre-LLM PESP leaves gaps that flash would read as packed rows)
                    return args, {**kwargs, "position_ids": None}
                return None
            mask, pe, pos_ids = self._prefill_tables(seg, h)
            return self._substitute(args, kwargs, h, mask, pe, pos_ids)
        # decode
        seg = r.segment_of(layer)
        if seg is r.segments[0]:
            return None
        h = _to(h, dev)
        mask, pe, pos_ids = self._step_tables(r, seg, h)
        return self._substitute(args, kwargs, h, mask, pe, pos_ids)

    def _prefill_tables(self, seg: Segment, h: torch.Tensor) -> tuple[Any, ...]:
        """(4-D mask, (cos, sin), position_ids) of a segment at prefill, on h's device: built
        once per segment (and device, under a device_map), not per layer."""
        if h.device not in seg.tables:
            on = seg.on(h.device)
            pos_ids = self.llm_position_ids(on.pos)
            valid = on.valid
            pe = tuple(_to(t, h.device) for t in self.rotary(h, pos_ids))  # rotary_emb may sit on another device
            seg.tables[h.device] = (self._impl_mask(prefill_mask(valid), valid, h.dtype, seg.padded), pe, pos_ids)
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
            pe = tuple(_to(t, h.device) for t in self.rotary(h, pos_ids))
            seg.step_tables = (key, self._impl_mask(decode_mask(kv, q), kv, h.dtype, seg.padded), pe, pos_ids)
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
            # RoPE comes from position_embeddings; a layer's position_ids only tell flash attention
            # whether a batch-1 row holds packed sequences (gapped or M-RoPE ids look packed), and a
            # segment is never packed: None, as stock Qwen2.5-VL passes for its (3, B, L) ids
            kwargs["position_ids"] = None
        return args, kwargs

    def _impl_mask(self, allowed: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype, padded: bool):
        """The (B, 1, q, kv) bool mask in the form the attention implementation takes: sdpa the
        bool mask, or None when nothing is padded and q == kv (prefill) or q == 1 (a step), so
        SDPA can pick its flash kernel (is_causal); eager an additive float mask; flash
        attention the 2-D key padding mask (None when nothing is padded), with causality from
        the kernel itself. `padded` comes from the host-side layout (reading key_valid would
        be a host sync in every decode step)."""
        if self.attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        if self.attn_implementation.startswith("flash"):
            return key_valid.long() if padded else None
        q, kv = allowed.shape[-2:]
        return allowed if padded or q not in (kv, 1) else None


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; no call at all when it is there already (the hooks run in every layer)."""
    return t if t.device == device else t.to(device)


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's weights live (a decoder layer's device under a device_map)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _ConfigAs:
    """A config that answers `_attn_implementation` with a kernel's name (the rest is the model's)."""

    def __init__(self, config: Any, impl: str):
        self._config = config
        self._attn_implementation = impl

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _ModuleAs:
    """An attention module as transformers' flash_attention_forward sees it: its config names the
    kernel to load (flash_attention_2), not the session's registered function."""

    def __init__(self, module: nn.Module, impl: str):
        self._module = module
        self.config = _ConfigAs(module.config, impl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _as_kernel(forward, impl: str):
    """`forward` (transformers' flash_attention_forward) loading the kernel named `impl`: it reads
    the name from module.config._attn_implementation, which in a session is the session's name,
    and loads kernels only by their own names."""
    def call(module, *args, **kwargs):
        return forward(_ModuleAs(module, impl), *args, **kwargs)

    return call
