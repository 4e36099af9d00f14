"""Random droppers: seeded random subsets (the random baseline, Nüwa's random ablation)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Selection


class RandomParams(NodeParams):
    keep: int | None = Field(None, ge=1, description="tokens kept (give keep or ratio)")
    ratio: float | None = Field(None, gt=0, le=1, description="fraction kept, int(n * ratio)")
    order: Literal["index", "input"] = Field("index", description="index: ascending ids; input: keep input order")

    @model_validator(mode="after")
    def _one(self):
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'keep' or 'ratio'")
        return self


@register
class RandomDropper(Node[RandomParams]):
    """Keep a uniformly random subset of the candidates, reproducible from the run's seed.

    Candidates are the input selection, or every image token present at the node's site.
    """

    type_name = "random-dropper.uniform"
    outputs = {"selection": Port(Selection)}

    def run(self, ctx, selection: Annotated[Selection | None, "candidates (default: all tokens present)"] = None):
        ids = selection.ids if selection is not None else ctx.present
        n = ids.numel()
        k = self.params.keep if self.params.keep is not None else int(n * self.params.ratio)
        if k > n:
            raise BudgetError(k, n, param="keep", what="candidates")
        # drawn on the CPU so a seed picks the same tokens on every device; k ids cross once per site
        pick = torch.randperm(n, generator=ctx.generator(), device="cpu")[:k].to(ids.device)
        pick = torch.sort(pick).values
        out = ids[pick]
        if self.params.order == "index":
            out = torch.sort(out).values
        return {"selection": Selection(out)}
