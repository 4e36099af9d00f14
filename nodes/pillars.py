"""Pillar selectors: split a kept set into pillars (kept as themselves) and collectors."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Roles, Scores, Selection


class QuantileParams(NodeParams):
    quantile: float = Field(0.55, ge=0, le=1, description="pillars: score >= this quantile of the kept "
                            "tokens' scores (linear interpolation)")


@register
class QuantileSplit(Node[QuantileParams]):
    """Pillars are kept tokens whose score reaches a quantile of the kept tokens' scores.

    Nüwa (arXiv 2602.02951): score = CLS salience (main code path), the hidden-state L2
    norm (ablation path) or the key norm (paper text); quantile 0.55 in the LLaVA code.
    """

    type_name = "pillar-selector.quantile"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"roles": Port(Roles)}

    def run(self, ctx, selection: Annotated[Selection, "the kept set to split"], scores: Annotated[Scores, "score per token"]):
        lookup = torch.full((int(scores.ids.max()) + 2,), -1, dtype=torch.long, device=scores.ids.device)
        lookup[scores.ids] = torch.arange(scores.ids.numel(), device=scores.ids.device)
        pos = lookup[selection.ids]
        if (pos < 0).any():
            raise ValueError("some selected tokens have no score")
        vals = scores.values[pos]
        thr = torch.quantile(vals.double(), self.params.quantile).to(vals.dtype)
        return {"roles": Roles(selection.ids, vals >= thr)}
