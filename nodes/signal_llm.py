"""Signal nodes inside the LLM: hand the language model's state on as typed `Tokens`.

`signal.llm-hidden` reads the hidden states of the image tokens present at an `llm.K` site
(the input of layer K), so a merger acting there (SparseVLM's recycling) stays model-free; with
`norm: final` / `tokens: text` the final-norm states of the image or text tokens (DART).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import LLMSiteName, Site
from nuwa_graph.types import Tokens, text_ids


class LLMHiddenParams(NodeParams):
    site: LLMSiteName = Field(description="the 'llm.K' site read: hidden states at the input of layer K")
    tokens: Literal["image", "text"] = Field("image", description="the image tokens present, or the prompt tokens "
                                             "after the image (ids TEXT_ID_BASE + j, never kept)")
    norm: Literal["none", "final"] = Field("none", description="final: through the language model's final norm "
                                           "(DART's similarity features); none: as they are")


@register
class LLMHidden(Node[LLMHiddenParams]):
    """Hidden states at an LLM site (the input of layer K = the output of layer K-1) of the
    image tokens present, in stream order, or of the text after the image; optionally
    through the model's final norm (DART: `self.norm(layer_outputs[0])`)."""

    type_name = "signal.llm-hidden"
    outputs = {"tokens": Port(Tokens, "(n, d_llm) hidden states, ids = the tokens present (or text ids), space llm")}

    def site(self) -> Site:
        return Site(self.params.site)

    def requests(self):
        p = self.params
        layer = Site(p.site).layer
        if p.tokens == "image" and p.norm == "none":
            return [SignalRequest.make("llm.hidden", p.site, layer=layer)]
        return [SignalRequest.make("llm.token_hidden", p.site, layer=layer, tokens=p.tokens, norm=p.norm)]

    def run(self, ctx):
        hidden = ctx.signal(self.requests()[0])
        if hidden.dim() != 2:
            raise ValueError(f"llm hidden states must be (n, d), got {tuple(hidden.shape)}")
        if self.params.tokens == "text":
            return {"tokens": Tokens(hidden, text_ids(hidden.shape[0], hidden.device), "llm")}
        n = ctx.present.numel()
        if hidden.shape[0] != n:
            raise ValueError(f"llm.hidden: expected ({n}, d) for the {n} tokens present, got {tuple(hidden.shape)}")
        return {"tokens": Tokens(hidden, ctx.present.clone(), "llm")}
