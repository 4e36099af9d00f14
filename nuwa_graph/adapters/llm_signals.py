"""LLM signals beyond attention rows: key states (`llm.keys`) and hidden states, optionally
through the final norm (`llm.token_hidden`), of the image tokens present or of the text after
the image, captured during the prefill (signal_kinds.py).

Where each value comes from, for a request read at site llm.K with layer L:
- `llm.keys`, rope, L < K: the keys layer L's attention function receives (after RoPE and
  any q/k norm: exactly what the layer attends with), GQA groups repeated to the query heads
  as the official codes' `repeat_kv` does;
- otherwise (`llm.keys` without rope, or L == K; `llm.token_hidden`): at the input of layer L
  from that layer's own input_layernorm / k_proj (and its k_norm where the family has one),
  RoPE from the segment's (cos, sin): `project_keys`, the one place such keys are computed.
Values are kept per sample with the original ids of the image tokens (text rows have none), so
a later site reads the tokens present there (`read`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import RunError
from ..signal_kinds import LLMKeys, LLMTokenHidden
from ..signals import Queries, SignalRequest
from .layout import Segment, columns
from .queries import query_index
from .signal_rows import apply_rope, head_norm

if TYPE_CHECKING:
    from .state import AdapterRun

_TEXT = Queries("text")


def token_index(seg: Segment, b: int, tokens: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sequence indices (in the segment) of sample b's image tokens or prompt text after the
    image, made on `device` (the segment's tables are copied there once per segment, the text
    range is built there: no copy per layer or sample)."""
    return seg.on(device).img_idx[b] if tokens == "image" else query_index(seg, b, _TEXT, device)


def _ids(seg: Segment, b: int, tokens: str, device: torch.device | str) -> torch.Tensor | None:
    return seg.on(device).img_ids[b] if tokens == "image" else None


def repeat_groups(k: torch.Tensor, heads: int) -> torch.Tensor:
    """(kv_heads, n, d) -> (heads, n, d): each KV head repeated for its query group (repeat_kv)."""
    if k.shape[0] == heads:
        return k
    return k.repeat_interleave(heads // k.shape[0], dim=0)


def capture_keys(r: AdapterRun, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
    """Called from the registered attention function of decoder layer `layer` at prefill:
    keep the (post-RoPE) keys the requests of this layer read."""
    seg = r.segment_of(layer)
    for req in r.llm_plan.keys_attn[layer]:
        vals = []
        for b in range(r.B):
            idx = token_index(seg, b, req.tokens, key.device)
            vals.append((repeat_groups(key[b][:, idx].detach(), query.shape[1]), _ids(seg, b, req.tokens, key.device)))
        r.captured[req.key] = vals


def project_keys(layer_module: nn.Module, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
                 ) -> torch.Tensor:
    """Keys of one decoder layer for hidden states h (n, d) at its input: input_layernorm,
    k_proj, the QK-norm where the family has one (`head_norm`: per head, or over all heads),
    RoPE when (cos, sin) are given ((n, head_dim) each). Returns (kv_heads, n, head_dim)."""
    attn = layer_module.self_attn
    hd = attn.head_dim
    k = head_norm(attn, "k_norm", attn.k_proj(layer_module.input_layernorm(h)).view(h.shape[0], -1, hd))
    k = k.transpose(0, 1)
    if cos is not None and sin is not None:
        k = apply_rope(k, cos, sin)
    return k


def final_norm(adapter: Any, x: torch.Tensor) -> torch.Tensor:
    """The language model's final norm of x, on x's device (under a device_map the norm may sit
    on the last GPU: its output comes back to x's device, where the method reads it)."""
    norm = adapter.text_model().norm
    weight = getattr(norm, "weight", None)
    if weight is None or weight.device == x.device:
        return norm(x)
    return norm(x.to(weight.device)).to(x.device)


def capture_pre(adapter: Any, r: AdapterRun, layer: int, module: nn.Module, h: torch.Tensor, cos, sin,
                seg: Segment) -> None:
    """Called in decoder layer `layer`'s pre-hook at prefill, before the site there runs."""
    heads = module.self_attn.config.num_attention_heads
    for req in r.llm_plan.pre[layer]:
        vals = []
        for b in range(r.B):
            tokens = req.tokens  # type: ignore[attr-defined]
            idx = token_index(seg, b, tokens, h.device)
            x = h[b, idx]
            if isinstance(req, LLMTokenHidden):
                val = final_norm(adapter, x) if req.norm == "final" else x
            else:
                assert isinstance(req, LLMKeys)
                rope = (cos[b, idx], sin[b, idx]) if req.rope else (None, None)
                val = repeat_groups(project_keys(module, x, *rope), heads)
            vals.append((val.detach(), _ids(seg, b, tokens, val.device)))
        r.captured[req.key] = vals


def read(r: AdapterRun, req: SignalRequest, b: int) -> torch.Tensor:
    """The value of one of these signals for sample b: image rows of the tokens present now."""
    if req.key not in r.captured:
        raise RunError(f"internal: signal {req.key} was not captured")
    assert r.state is not None
    val, ids = r.captured[req.key][b]  # ids: the captured image tokens, on val's device
    if ids is None:  # text rows: every prompt token after the image
        return val
    # checked on the host, from the layout (a check on the device would be a sync per read)
    layer = int(req.arg("layer"))
    if columns(r.segment_of(layer).img_ids[b], r.segments[-1].img_ids[b]) is None:
        raise RunError(f"signal {req.key}: a token present now was not present at layer {layer}")
    cols = columns(ids, r.state.present[b].to(val.device), check=False)
    return val[:, cols] if isinstance(req, LLMKeys) else val[cols]
