"""Appliers: change the token stream at a site (the only nodes with effects)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.context import Keep
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.sites import VALID_SITES, Site, SiteName
from nuwa_graph.types import Applied, PositionPlan, Selection, Tokens


class KeepParams(NodeParams):
    site: SiteName = Field(description=f"where the token set changes: {VALID_SITES}")
    newlines: Literal["compete", "keep", "drop"] = Field(
        "compete", description="newline slots of a tiled image (LLaVA-NeXT's image_newline rows): compete = kept "
        "when the selection names them, like any image token (FastV-style LLM methods); keep = always kept in "
        "place, outside the budget; drop = never kept (VisionZip's official LLaVA-NeXT path). No effect on "
        "images without newline slots")


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
        if self.params.newlines != "compete":
            ids, tokens, positions = self._newlines(ctx, ids, tokens, positions)
        ctx.apply(Keep(self.params.site, ids, tokens, positions))
        return {"applied": Applied(self.params.site, int(ids.numel()))}

    def _newlines(self, ctx, ids: torch.Tensor, tokens: Tokens | None, positions: PositionPlan | None):
        """Apply the newline policy (keep | drop) to the kept ids, rows and positions."""
        nl = ctx.geometry.newline_ids(ids.device)
        if nl.numel() == 0:
            return ids, tokens, positions
        is_nl = torch.isin(ids, nl)
        if self.params.newlines == "drop":
            keep = ~is_nl
            if tokens is not None:
                tokens = Tokens(tokens.values[keep], tokens.ids[keep], tokens.space)
            if positions is not None:
                positions = PositionPlan(positions.ids[keep], positions.offsets[keep], positions.policy,
                                         positions.text_follows)
            return ids[keep], tokens, positions
        # keep: every newline slot present stays where it is, whatever the selection says
        if tokens is not None:
            raise ValueError("newlines: keep needs a selection (merged tokens have no newline rows); use drop")
        if positions is not None and positions.policy != "pesp":
            raise ValueError(f"newlines: keep works with PESP positions (a newline keeps its own id), not "
                             f"{positions.policy!r}; use compete or drop")
        present = ctx.present.to(ids.device)
        wanted = torch.isin(present, ids) | torch.isin(present, nl)
        if not torch.equal(ids, present[torch.isin(present, ids)]):
            raise ValueError("newlines: keep needs the selection in sequence order (order: index)")
        new_ids = present[wanted]
        if positions is not None:
            positions = PositionPlan(new_ids, new_ids.clamp(min=0).clone(), "pesp", positions.text_follows)
        return new_ids, None, positions
