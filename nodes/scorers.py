"""Scorers that need no model: scores handed in by the caller.

Model-reading scorers (attention rows, norms, similarities) live in their own modules.
"""

from __future__ import annotations

from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import VALID_SITES, Site, SiteName
from nuwa_graph.types import Scores


class ExternalParams(NodeParams):
    name: str = Field(description="key of the tensor the caller provides (one score per present token)")
    site: SiteName = Field("vision", description=f"where the scores become available: {VALID_SITES}")


@register
class ExternalScores(Node[ExternalParams]):
    """Scores given from outside the model, one per token present at `site` (in stream order)."""

    type_name = "scorer.external"
    outputs = {"scores": Port(Scores)}

    def site(self) -> Site:
        return Site(self.params.site)

    def requests(self):
        return [SignalRequest.make("external", self.params.site, name=self.params.name)]

    def run(self, ctx):
        v = ctx.signal(self.requests()[0]).reshape(-1).float()
        if v.numel() != ctx.present.numel():
            raise ValueError(f"external scores {self.params.name!r} have {v.numel()} values for {ctx.present.numel()} tokens")
        return {"scores": Scores(v, ctx.present.clone())}
