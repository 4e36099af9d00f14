"""Position arithmetic the engine and the node library share.

RPME (relative position mapping extension, Nüwa Algorithm 3): with I the sorted original
indices of the kept tokens and the full image range [s, e], new[0] = s and
new[j] = ceil(I[j] * (e - s) / I[k-1]) + s, i.e. the kept set is stretched over the range.
The node `position-reencoder.policy` (nodes/positions.py) plans 1-D offsets with it; the
Qwen adapter applies it per M-RoPE axis (adapters/qwen_geometry.py).
"""

from __future__ import annotations

import torch


def rpme_offsets(sorted_index: torch.Tensor, span: int) -> torch.Tensor:
    """RPME offsets (relative to s) for ascending indices I; span = e - s. Exact integer ceil."""
    k = sorted_index.numel()
    out = torch.zeros(k, dtype=torch.long, device=sorted_index.device)
    if k <= 1:
        return out
    last = int(sorted_index[-1])
    if last == 0:
        return out
    num = sorted_index[1:] * span
    out[1:] = (num + last - 1) // last
    return out
