"""Appliers: change the token stream at a site (the only nodes with effects)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from nuwa_graph.context import Keep
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.sites import VALID_SITES, Site, SiteName
from nuwa_graph.types import Applied, PositionPlan, Selection, Tokens


class KeepParams(NodeParams):
    site: SiteName = Field(description=f"where the token set changes: {VALID_SITES}")


@register
class KeepTokens(Node[KeepParams]):
    """From `site` on, the image block holds only the selected (or merged) tokens.

    Before the LLM (`vision`, `pre_llm`) the block handed to the LLM is replaced; at
    `llm.K` the tokens are dropped from layer K on (hidden states, positions, mask, KV).
    Positions: the plan given, else current ids are kept (`llm.K`) or numbered
    contiguously by the model (before the LLM).
    """

    type_name = "applier.keep"
    outputs = {"applied": Port(Applied)}

    def site(self) -> Site:
        return Site(self.params.site)

    def run(self, ctx,
            selection: Annotated[Selection | None, "tokens kept, in sequence order"] = None,
            tokens: Annotated[Tokens | None, "merged replacement tokens (their ids say where they sit)"] = None,
            positions: Annotated[PositionPlan | None, "position ids of the kept tokens"] = None):
        if selection is None and tokens is None:
            raise ValueError("applier.keep needs a 'selection' or 'tokens' input")
        if tokens is not None:
            ids = tokens.ids
        else:
            assert selection is not None
            ids = selection.ids
        if selection is not None and tokens is not None and not torch.equal(selection.ids, tokens.ids):
            raise ValueError("'selection' and 'tokens' name different tokens; connect one of them")
        if positions is not None and not torch.equal(positions.ids, ids):
            raise ValueError("the position plan was made for a different token order than the kept tokens")
        present = set(ctx.present.tolist())
        if tokens is None and not set(ids.tolist()) <= present:
            raise ValueError(f"selection names tokens not present at {self.params.site}")
        ctx.apply(Keep(self.params.site, ids, tokens, positions))
        return {"applied": Applied(self.params.site, int(ids.numel()))}
