"""Graph propagation over a similarity graph of the tokens (G-Prune, AAAI'25, arXiv 2501.02268;
jytmelon/G-Prune @ 762c6377, LLaVA-NeXT/llava/model/llava_arch.py:239-290).

Nodes are the tokens; an edge joins two tokens whose feature cosine reaches `threshold`. The
rows of the thresholded, temperature-scaled cosine matrix go through a softmax (a random walk
that stays on the edges), each token starts with its feature norm as mass, and after `steps`
steps of propagation a token's score is the mass that reached it divided by its degree.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Scores, Tokens


class GraphParams(NodeParams):
    threshold: float = Field(0.5, description="cosine below which two tokens are not connected (official 0.5)")
    temperature: float = Field(0.03, gt=0, description="softmax temperature of the edge weights (official 0.03)")
    steps: int = Field(5, ge=1, description="propagation steps, the power of the transition matrix (official 5)")
    propagate: Literal["matrix-power", "vector"] = Field(
        "vector", description="vector: steps vector-matrix products w A A ... A (O(steps n^2)); matrix-power: w @ "
        "torch.matrix_power(A, steps) as the official code (O(n^3), the same scores up to float rounding)")


def propagation_scores(x: torch.Tensor, threshold: float, temperature: float, steps: int,
                       propagate: str = "vector") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, degree) of G-Prune's propagation for features x (n, d), float32: A = cos(x, x);
    A[A < threshold] = 0; A /= temperature; A[|A| < 1e-6] = -5000 (what removes the
    thresholded edges); row softmax; degree = entries > 0 per row (self included);
    scores = (||x|| @ A^steps) / degree, i.e. the mass flowing INTO each token."""
    x = x.float()
    xn = torch.nn.functional.normalize(x, p=2, dim=1)
    a = xn @ xn.t()
    a[a < threshold] = 0
    a = a / temperature
    a[a.abs() < 1e-6] = -5000
    a = torch.softmax(a, dim=1)
    degree = torch.sum(a > 0, dim=1)
    w = torch.norm(x, dim=-1).view(1, -1)
    if propagate == "matrix-power":
        mass = w @ torch.matrix_power(a, steps)
    else:
        mass = w
        for _ in range(steps):
            mass = mass @ a
    return (mass / degree)[0], degree


@register
class GraphPropagation(Node[GraphParams]):
    """Score tokens by information propagated over their similarity graph (G-Prune): the
    feature-norm mass each token receives after `steps` random-walk steps, divided by its
    degree. Any features (G-Prune: the projected visual tokens, signal.pre-llm-visual)."""

    type_name = "scorer.graph-propagation"
    paper = "https://arxiv.org/abs/2501.02268"
    outputs = {"scores": Port(Scores, "propagated mass / degree per token")}

    def run(self, ctx, features: Annotated[Tokens, "one feature row per token"]):
        p = self.params
        scores, _ = propagation_scores(features.values, p.threshold, p.temperature, p.steps, p.propagate)
        return {"scores": Scores(scores, features.ids.clone())}
