"""A max-min diversity selector, after DivPrune (Alvar et al., CVPR'25, arXiv 2503.02175).

Greedy farthest-point selection under cosine distance, in the spirit of DivPrune's max-min
diversity objective: start from the token whose nearest neighbour is farthest away, then
repeatedly add the token farthest from the chosen set. It reads no attention, so it works
with any attention backend. An example node, not a checked reimplementation of DivPrune.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.errors import BudgetError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Selection, Tokens


class MaxMinParams(NodeParams):
    k: int = Field(ge=1, description="tokens to keep")
    order: Literal["index", "pick"] = Field("index", description="index: ascending ids; pick: greedy order")


@register
class MaxMinDiversity(Node[MaxMinParams]):
    """Keep k tokens that are as different from each other as possible (cosine distance)."""

    type_name = "selector.max-min-diversity"
    paper = "https://arxiv.org/abs/2503.02175"
    outputs = {"selection": Port(Selection)}

    def run(self, ctx, features: Annotated[Tokens, "one feature row per candidate token"]):
        x = torch.nn.functional.normalize(features.values.float(), dim=-1)
        n = x.shape[0]
        k = self.params.k
        if k > n:
            raise BudgetError(k, n, what="candidate tokens", advice="lower k")
        dist = 1.0 - x @ x.T
        off = dist + torch.eye(n, device=x.device) * 1e9  # ignore self-distance when taking minima
        first = int(torch.argmax(off.min(dim=1).values))
        picked = [first]
        closest = dist[first].clone()
        closest[first] = -1.0
        for _ in range(k - 1):
            nxt = int(torch.argmax(closest))
            picked.append(nxt)
            closest = torch.minimum(closest, dist[nxt])
            closest[picked] = -1.0
        ids = features.ids[torch.tensor(picked, dtype=torch.long, device=features.ids.device)]
        if self.params.order == "index":
            ids = torch.sort(ids).values
        return {"selection": Selection(ids)}
