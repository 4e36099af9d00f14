"""The `queries` argument of `llm.attention`: which query rows a signal reads.

One small module so the rule lives in one place: `queries_problem` checks the text when a
pipeline is bound, `query_index` turns it into sequence indices of a segment.
"""

from __future__ import annotations

import re

import torch

from .layout import Segment

_QUERIES = re.compile(r"^(last|text|last:(\d+))$")


def queries_problem(queries: str) -> str | None:
    """Why a `queries` argument is not valid (None when it is): last, last:N or text."""
    if not _QUERIES.match(queries):
        return f"queries must be last, last:N or text, got {queries!r}"
    return None


def query_index(seg: Segment, b: int, queries: str) -> torch.Tensor:
    """Sequence indices of the query rows; "last" is the last PROMPT token, also in a
    cache-free recompute that appends generated tokens (so both select the same)."""
    L = seg.valid.shape[1] - (seg.n_extra[b] if seg.n_extra else 0)
    if queries == "last":
        return torch.tensor([L - 1])
    if queries.startswith("last:"):
        n = int(queries.split(":")[1])
        n = min(n, L - seg.post_start[b])
        return torch.arange(L - n, L)
    return torch.arange(seg.post_start[b], L)
