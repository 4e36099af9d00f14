"""Signal nodes inside the LLM: hand the language model's state on as typed `Tokens`.

`signal.llm-hidden` reads the hidden states of the image tokens present at an `llm.K` site
(the input of layer K), so a merger acting there (SparseVLM's recycling) stays model-free.
"""

from __future__ import annotations

from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import LLMSiteName, Site
from nuwa_graph.types import Tokens


class LLMHiddenParams(NodeParams):
    site: LLMSiteName = Field(description="the 'llm.K' site read: hidden states at the input of layer K")


@register
class LLMHidden(Node[LLMHiddenParams]):
    """Hidden states of the image tokens present at an LLM site, in stream order."""

    type_name = "signal.llm-hidden"
    outputs = {"tokens": Port(Tokens, "(n_present, d_llm) hidden states, ids = the tokens present, space llm")}

    def site(self) -> Site:
        return Site(self.params.site)

    def requests(self):
        return [SignalRequest.make("llm.hidden", self.params.site, layer=Site(self.params.site).layer)]

    def run(self, ctx):
        hidden = ctx.signal(self.requests()[0])
        n = ctx.present.numel()
        if hidden.dim() != 2 or hidden.shape[0] != n:
            raise ValueError(f"llm.hidden: expected ({n}, d) for the {n} tokens present, got {tuple(hidden.shape)}")
        return {"tokens": Tokens(hidden, ctx.present.clone(), "llm")}
