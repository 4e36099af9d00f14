"""FlashAttention without flash-attn: transformers' flash path run on a CPU with SDPA kernels.

transformers (5.x) reaches flash attention through `modeling_flash_attention_utils`:
`flash_attention_forward` -> `_flash_attention_forward` -> `lazy_import_flash_attention(name)` ->
`_lazy_imports(name)`, which returns the kernels (`flash_attn_func`, `flash_attn_varlen_func`,
...) of the package that `name` names and sends any other name to the hub-kernel loader, which
fails with "Could not find the currently requested flash attention implementation".
`FlashStandIn.install(monkeypatch)` replaces `_lazy_imports` (and forgets the cached kernel):
- the implementation name it is asked for is recorded (`names`); an unknown name fails as it
  does in transformers;
- the kernels are SDPA stand-ins with flash-attn's signatures and semantics (causal masks
  aligned bottom-right, grouped KV heads, varlen calls delimited by `cu_seqlens`); each call
  is recorded (`calls`: dense or varlen, with its cu_seqlens), so a test sees exactly what
  flash attention would have been asked to compute.

The adapter refuses flash_attention_2 when flash-attn is not installed
(`family.check_attn_implementation`); `use_flash(adapter, monkeypatch)` goes around that check
deliberately for the test, without weakening it for users.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KERNEL = "flash_attention_2"


@dataclass
class Call:
    kind: str  # dense | varlen
    causal: bool
    q_shape: tuple[int, ...]
    phase: str  # what the adapter was doing (vision | prefill | decode)
    cu_q: list[int] = field(default_factory=list)
    cu_k: list[int] = field(default_factory=list)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """q (Lq, H, D), k/v (Lk, Hkv, D) -> (Lq, H, D), as flash attention computes it."""
    Lq, H, _ = q.shape
    Lk, Hkv, _ = k.shape
    if Hkv != H:  # grouped KV heads: head h reads KV head h // (H / Hkv)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    mask = None
    if causal:  # bottom-right aligned, as flash-attn >= 2.1
        mask = torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


class FlashStandIn:
    def __init__(self, adapter=None):
        self.adapter = adapter
        self.names: list[str | None] = []
        self.calls: list[Call] = []

    def _phase(self) -> str:
        run = getattr(self.adapter, "_run", None)
        return run.phase if run is not None else "idle"

    # flash-attn's signatures (transformers inspects the varlen one to decide which kwargs to pass)
    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert tuple(window_size) == (-1, -1) and not softcap and dropout_p == 0.0
        self.calls.append(Call("dense", bool(causal), tuple(q.shape), self._phase()))
        return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        assert tuple(window_size) == (-1, -1) and not softcap and dropout_p == 0.0
        cq, ck = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
        self.calls.append(Call("varlen", bool(causal), tuple(q.shape), self._phase(), cq, ck))
        assert cq[-1] == q.shape[0] and ck[-1] == k.shape[0], "cu_seqlens do not cover the tokens"
        assert max(b - a for a, b in zip(cq, cq[1:])) <= int(max_seqlen_q)
        out = torch.empty_like(q)
        for i in range(len(cq) - 1):
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], causal,
                                           softmax_scale)
        return out

    def _lazy_imports(self, implementation, attention_wrapper=None, allow_all_kernels=False):
        from transformers import modeling_flash_attention_utils as fa

        self.names.append(implementation)
        if implementation != KERNEL:  # what transformers does with any other name (the hub loader fails)
            raise ValueError(f"Could not find the currently requested flash attention implementation at "
                             f"`{implementation}`.")
        return self.flash_attn_func, self.flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input

    def install(self, monkeypatch) -> FlashStandIn:
        from transformers import modeling_flash_attention_utils as fa

        monkeypatch.setattr(fa, "_lazy_imports", self._lazy_imports)
        monkeypatch.setattr(fa, "_loaded_implementation", None)
        return self


def use_flash(adapter, monkeypatch) -> None:
    """Run `adapter`'s layers with flash_attention_2 in its next sessions. This deliberately goes
    around `set_attn_implementation`, whose check refuses flash_attention_2 without flash-attn
    (users keep that clear error; tests/test_attn_implementation.py checks it)."""
    monkeypatch.setattr(adapter, "attn_implementation", KERNEL)
