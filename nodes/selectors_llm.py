"""A top-k selector with the count rules the official LLM-side codes use.

The official codes do not agree on how a budget becomes a count:
- PDrop: int(576 * ratio[stage]) - the ORIGINAL image size, at every stage;
- FEATHER: int(n * (1 - r)) at stage 1 and int(n1 * (1 - r)**2) at stage 2, n = tokens present;
- SparseVLM: min(schedule[stage], n_present - 1).
`selector.top-k-int` expresses all three; Python's int() truncation is kept on purpose
(e.g. int(576 * (1 - 0.7)) = 172, not 172.8 rounded).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Scores, Selection


def count_for(n_present: int, n_grid: int, k: int | None, ratio: float | None, base: str, leave_one: bool) -> int:
    """The number of tokens to keep, with the official int() truncation."""
    if k is None:
        assert ratio is not None  # the params give exactly one of k and ratio
        k = int((n_grid if base == "grid" else n_present) * ratio)
    if leave_one:
        k = min(k, n_present - 1)
    return max(k, 0)


class TopKIntParams(NodeParams):
    k: int | None = Field(None, ge=1, description="tokens to keep (give k or ratio)")
    ratio: float | None = Field(None, gt=0, le=1, description="keep int(base * ratio) tokens (Python int() truncation)")
    base: Literal["present", "grid"] = Field(
        "present", description="what ratio multiplies: tokens present (FEATHER) or the full grid (PDrop: 576 at every stage)")
    leave_one: bool = Field(False, description="keep at most n_present - 1 tokens (SparseVLM: min(k, v_token_num - 1))")
    order: Literal["index", "score", "stream"] = Field(
        "index", description="index: ascending id; score: torch.topk order; stream: the order of the input scores "
        "(sequence order)")

    @model_validator(mode="after")
    def _one(self):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'k' or 'ratio'")
        return self


@register
class TopKInt(Node[TopKIntParams]):
    """Keep the top tokens by score; the count follows an official code's int() rule.

    Ties follow torch.topk on the given scores (as the official codes do)."""

    type_name = "selector.top-k-int"
    outputs = {"selection": Port(Selection, "the kept tokens")}

    def run(self, ctx, scores: Annotated[Scores, "one score per candidate token"]):
        p = self.params
        n = scores.values.numel()
        k = count_for(n, ctx.geometry.n_tokens, p.k, p.ratio, p.base, p.leave_one)
        if k > n:
            raise BudgetError(k, n, advice=f"lower the budget (at most {n})")
        idx = torch.topk(scores.values, k).indices
        if p.order == "stream":
            idx = torch.sort(idx).values
            ids = scores.ids[idx]
        elif p.order == "index":
            ids = torch.sort(scores.ids[idx]).values
        else:
            ids = scores.ids[idx]
        return {"selection": Selection(ids)}
