"""Which query rows an `llm.attention` signal reads, as sequence indices of a segment.

The `queries` argument itself is parsed and checked once, when the pipeline loads
(`signals.Queries`); this turns the parsed value into indices.
"""

from __future__ import annotations

import torch

from ..signals import Queries
from .layout import Segment


def query_index(seg: Segment, b: int, queries: Queries, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sequence indices of the query rows, made on `device` (no copy from the host); "last" is
    the last PROMPT token, also in a cache-free recompute that appends generated tokens (so
    both select the same)."""
    L = seg.valid.shape[1] - (seg.n_extra[b] if seg.n_extra else 0)
    if queries.which == "last":
        return torch.arange(L - 1, L, device=device)
    if queries.which == "last_n":
        n = min(queries.n, L - seg.post_start[b])
        return torch.arange(L - n, L, device=device)
    return torch.arange(seg.post_start[b], L, device=device)
