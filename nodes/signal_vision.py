"""Signal nodes: hand a model tensor on as typed `Tokens`, so mergers stay model-free.

Each node reads one signal (see nuwa_graph/signals.py) and returns it as `Tokens` over the
whole grid (ids = 0..n-1, raster order). Layer numbers index Hugging Face
`hidden_states` the way LLaVA does: -2 is the output of CLIP-L encoder layer index 22.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.types import Tokens


def _grid_tokens(ctx, values: torch.Tensor, space: str, what: str) -> Tokens:
    n = ctx.geometry.n_tokens
    if values.dim() != 2 or values.shape[0] != n:
        raise ValueError(f"{what}: expected ({n}, d) for a {ctx.geometry.grid[0]}x{ctx.geometry.grid[1]} grid, "
                         f"got {tuple(values.shape)}")
    return Tokens(values, torch.arange(n, device=values.device), space)


class HiddenParams(NodeParams):
    layer: int = Field(-2, description="index into the vision tower's hidden_states (LLaVA feeds -2)")


@register
class VisionHidden(Node[HiddenParams]):
    """Vision hidden states of one layer, without CLS (the features LLaVA projects)."""

    type_name = "signal.vision-hidden"
    outputs = {"tokens": Port(Tokens, "(n, d_vision) patch features, space vision")}

    def requests(self):
        return [SignalRequest.make("vision.hidden", "vision", layer=self.params.layer)]

    def run(self, ctx):
        return {"tokens": _grid_tokens(ctx, ctx.signal(self.requests()[0]), "vision", self.type_name)}


class _RangeParams(NodeParams):
    """A [start, stop) range of layers; stop must exceed start."""

    @model_validator(mode="after")
    def _range(self):
        if self.stop <= self.start:
            raise ValueError("stop must be larger than start")
        return self


class HiddenMeanParams(_RangeParams):
    start: int = Field(16, description="first hidden_states index averaged (Nüwa LLaVA: 16)")
    stop: int = Field(25, description="one past the last index averaged (Nüwa LLaVA: 25, i.e. 16..24)")


@register
class VisionHiddenMean(Node[HiddenMeanParams]):
    """Mean of vision hidden_states[start:stop] without CLS (Nüwa's similarity features)."""

    type_name = "signal.vision-hidden-mean"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"tokens": Port(Tokens, "(n, d_vision) averaged patch features, space vision")}

    def requests(self):
        return [SignalRequest.make("vision.hidden_mean", "vision", start=self.params.start, stop=self.params.stop)]

    def run(self, ctx):
        return {"tokens": _grid_tokens(ctx, ctx.signal(self.requests()[0]), "vision", self.type_name)}


class MergedMeanParams(_RangeParams):
    start: int = Field(7, description="first vision block whose output is averaged (Nüwa Qwen: 7)")
    stop: int = Field(24, description="one past the last block averaged (Nüwa Qwen: 24, i.e. blocks 7..23)")


@register
class VisionMergedHiddenMean(Node[MergedMeanParams]):
    """Qwen2.5-VL: the patch merger applied to the mean of vision blocks [start, stop),
    per merged token in raster order (Nüwa's Qwen similarity features)."""

    type_name = "signal.vision-merged-hidden-mean"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"tokens": Port(Tokens, "(n, d_llm) merged features, space llm")}

    def requests(self):
        return [SignalRequest.make("vision.merged_hidden_mean", "vision", start=self.params.start, stop=self.params.stop)]

    def run(self, ctx):
        return {"tokens": _grid_tokens(ctx, ctx.signal(self.requests()[0]), "llm", self.type_name)}


@register
class PreLlmVisual(Node):
    """The projected visual tokens the LLM would receive (Qwen: the merger's output)."""

    type_name = "signal.pre-llm-visual"
    outputs = {"tokens": Port(Tokens, "(n, d_llm) projected tokens, space llm")}

    def requests(self):
        return [SignalRequest.make("pre_llm.visual", "pre_llm")]

    def run(self, ctx):
        return {"tokens": _grid_tokens(ctx, ctx.signal(self.requests()[0]), "llm", self.type_name)}
