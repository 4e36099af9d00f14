"""LLM signals: attention rows and hidden states read inside the decoder, and the reader
the executor calls for every model signal of a run.

`llm.attention` rows are post-softmax rows of chosen query tokens (`queries`) over the image
keys of the current segment, computed either inside the registered attention function (rope
rows at a layer before the site: the model's own q and k) or in the layer pre-hook from the
layer's own projections (`_capture_pre`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import RunError
from ..signals import SignalRequest
from .family import FamilyHooks
from .layout import Block, Segment, columns
from .queries import query_index
from .state import AdapterRun


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (H, n, hd); cos/sin (n, r) -> rotated (standard half-rotation RoPE). With partial
    rotary (r < hd, e.g. Qwen3.5's 0.25 of the head) only the first r dims of each head turn
    and the rest pass through, as the transformers models with partial rotary do."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos[None] + _rotate_half(x) * sin[None]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos[None] + _rotate_half(rot) * sin[None], rest), dim=-1)


def head_norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the attention module's QK-norm `name` (q_norm / k_norm; Qwen3, Gemma 3, InternVL3.5)
    to x (n, heads, hd) where the module has one, as its forward does: before RoPE, over each
    head's dims, or over the whole width where the norm spans heads x hd (OLMo 2). x as is
    when the module has none."""
    norm = getattr(attn, name, None)
    if norm is None:
        return x
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[-1] != x.shape[-1]:  # a norm over all heads at once
        return norm(x.reshape(x.shape[0], -1)).view_as(x)
    return norm(x)


def attention_rows(q: torch.Tensor, k: torch.Tensor, seg: Segment, b: int, qidx: torch.Tensor, scaling: float,
                   softmax_over: str) -> torch.Tensor:
    """q (H, nq, hd) rows at sequence indices qidx; k (H, L, hd) all keys of sample b.
    Returns (H, nq, n_img) post-softmax rows over the image keys of the segment."""
    on = seg.on(k.device)  # the segment's index tensors on this layer's device (copied once)
    img = on.img_idx[b]
    qi = qidx.to(k.device)[:, None]
    if softmax_over == "image":
        logits = torch.einsum("hqd,hkd->hqk", q.float(), k[:, img].float()) * scaling
        allowed = img[None, :] <= qi
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        return torch.softmax(logits, dim=-1)
    logits = torch.einsum("hqd,hkd->hqk", q.float(), k.float()) * scaling
    kj = torch.arange(k.shape[1], device=k.device)[None]
    allowed = (kj <= qi) & on.valid[b][None]
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    return torch.softmax(logits, dim=-1)[:, :, img]


class SignalRows(FamilyHooks):
    """Adapter layer: captures LLM signals during prefill and reads every signal kind."""

    def _visual_block(self, r: AdapterRun, b: int) -> Block:
        """Sample b's image block as it stands (before the LLM: the full projected tokens
        until a Keep changes them; the projector runs only when they are needed)."""
        block = r.blocks[b]
        if block is None:
            assert r.vision_out is not None, "the vision pass has not run"
            rows = r.vision_out.projected_rows(b).to(self.device)  # a no-op unless a device_map split the model
            block = r.blocks[b] = Block(torch.arange(rows.shape[0]), rows)
        return block

    def _rows_from_attention(self, r: AdapterRun, layer: int, module: nn.Module, query: torch.Tensor,
                             key: torch.Tensor) -> None:
        seg = r.segment_of(layer)
        groups = query.shape[1] // key.shape[1]
        for req in r.rows_attn[layer]:
            vals = []
            for b in range(r.B):
                qidx = query_index(seg, b, req.queries, query.device)
                k = key[b].repeat_interleave(groups, dim=0)
                rows = attention_rows(query[b][:, qidx], k, seg, b, qidx, module.scaling, req.softmax_over)
                vals.append((rows, seg.on(rows.device).img_ids[b]))
            r.captured[req.key] = vals

    def _capture_pre(self, r: AdapterRun, layer: int, module: nn.Module, h: torch.Tensor, cos, sin,
                     seg: Segment) -> None:
        for req in r.hidden_at.get(layer, []):
            on = seg.on(h.device)
            r.captured[req.key] = [(h[b, on.img_idx[b]], on.img_ids[b]) for b in range(r.B)]
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
                qidx = query_index(seg, b, req.queries, h.device)
                q = head_norm(attn, "q_norm", attn.q_proj(x[b, qidx]).view(qidx.numel(), -1, hd)).transpose(0, 1)
                k = head_norm(attn, "k_norm", attn.k_proj(x[b]).view(x.shape[1], -1, hd)).transpose(0, 1)
                if rope:
                    q = apply_rope(q, cos[b, qidx], sin[b, qidx])
                    k = apply_rope(k, cos[b], sin[b])
                k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                rows = attention_rows(q, k, seg, b, qidx, attn.scaling, req.softmax_over)
                vals.append((rows, seg.on(rows.device).img_ids[b]))
            r.captured[req.key] = vals

    def _reader(self, r: AdapterRun) -> Callable[[SignalRequest, int], torch.Tensor]:
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
                return self._visual_block(r, b).rows
            if kind == "pre_llm.text":  # every sample embedded at the first read: one copy of the ids per run
                if b not in r.text_rows:
                    ids = [lay.prompt_post_ids for lay in r.layouts]
                    r.text_rows.update(enumerate(self.embed(torch.cat(ids)).split([i.numel() for i in ids])))
                return r.text_rows[b]
            if kind in ("llm.attention", "llm.hidden"):
                if req.key not in r.captured:
                    raise RunError(f"internal: signal {req.key} was not captured")
                assert r.state is not None
                val, ids = r.captured[req.key][b]  # ids: the captured tokens, on val's device
                # checked on the host, from the layout (a check on the device would be a sync per read):
                # the tokens present now are those of the latest segment
                if columns(r.segment_of(int(req.arg("layer"))).img_ids[b], r.segments[-1].img_ids[b]) is None:
                    raise RunError(f"signal {req.key}: a token present now was not present at layer {req.arg('layer')}")
                cols = columns(ids, r.state.present[b].to(val.device), check=False)
                out = val[..., cols, :] if kind == "llm.hidden" else val[..., cols]
                return out.to(self.device)  # a no-op unless a device_map put layer L elsewhere
            if kind.startswith("vision."):  # on the adapter's device even if a device_map put the tower elsewhere
                return self.read_vision_signal(r, req, b).to(self.device)
            raise RunError(f"{self.family} adapter cannot give signal {kind}")

        return read
