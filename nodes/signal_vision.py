"""Signal nodes: hand a model tensor on as typed `Tokens`, so mergers stay model-free.

Each node reads one signal (see nuwa_graph/signals.py) and returns it as `Tokens` over the
whole grid (ids = 0..n-1, raster order; the CLS row dropped where the tower has one), except
`signal.vision-cls-hidden`, one row with id CLS_ID. Layer numbers index Hugging Face
`hidden_states` the way LLaVA does: -2 is the output of CLIP-L encoder layer index 22.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.types import CLS_ID, Tokens


def _grid_tokens(ctx, values: torch.Tensor, space: str, what: str) -> Tokens:
    n = ctx.geometry.n_tokens
    if values.dim() != 2 or values.shape[0] != n:
        raise ValueError(f"{what}: expected ({n}, d) for a {ctx.geometry.grid[0]}x{ctx.geometry.grid[1]} grid, "
                         f"got {tuple(values.shape)}")
    return Tokens(values, torch.arange(n, device=values.device), space)


def grid_rows(tokens: Tokens, n: int, port: str) -> torch.Tensor:
    """The (n, d) values of Tokens that cover the whole grid in raster order (ValueError otherwise)."""
    values = tokens.grid_values(n)
    if values is None:
        raise ValueError(f"{port} must cover the {n} tokens of the grid in raster order (ids 0..{n - 1}), got "
                         f"{tokens.values.shape[0]} rows; connect a signal node (signal.vision-hidden, ...)")
    return values


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


class KeyParams(NodeParams):
    layer: int = Field(-2, description="vision layer whose key states are read (VisionZip: -2 = layer 22)")


@register
class VisionKeyMean(Node[KeyParams]):
    """Key states of one vision layer averaged over heads, without CLS (VisionZip's similarity metric)."""

    type_name = "signal.vision-key-mean"
    paper = "https://arxiv.org/abs/2412.04467"
    outputs = {"tokens": Port(Tokens, "(n, head_dim) head-averaged keys, space vision")}

    def requests(self):
        return [SignalRequest.make("vision.keys", "vision", layer=self.params.layer)]

    def run(self, ctx):
        keys = ctx.signal(self.requests()[0])  # (heads, n + cls, head_dim)
        if keys.dim() != 3:
            raise ValueError(f"vision.keys must be (heads, n + cls, head_dim), got {tuple(keys.shape)}")
        # the official `raw_key_states.mean(1)` reduces a contiguous (1, heads, n + 1, head_dim) tensor;
        # the same layout gives the same bits (a strided view could sum the heads in another order)
        mean = keys.contiguous()[None].mean(dim=1)[0]
        n = ctx.geometry.n_tokens
        return {"tokens": _grid_tokens(ctx, mean[mean.shape[0] - n:], "vision", self.type_name)}


class SingleHeadKeyParams(NodeParams):
    layer: int = Field(-1, description="vision layer whose q/k are read as one head (PruMerge+: -1)")


@register
class VisionKeySingleHead(Node[SingleHeadKeyParams]):
    """Key states of one vision layer as one head over the full width, without CLS (PruMerge+'s metric)."""

    type_name = "signal.vision-key-single-head"
    paper = "https://arxiv.org/abs/2403.15388"
    outputs = {"tokens": Port(Tokens, "(n, d_vision) keys, space vision")}

    def requests(self):
        return [SignalRequest.make("vision.qk_single_head", "vision", layer=self.params.layer)]

    def run(self, ctx):
        qk = ctx.signal(self.requests()[0])  # (2, n + cls, d): q, then k
        if qk.dim() != 3 or qk.shape[0] != 2:
            raise ValueError(f"vision.qk_single_head must be (2, n + cls, d), got {tuple(qk.shape)}")
        n = ctx.geometry.n_tokens
        return {"tokens": _grid_tokens(ctx, qk[1][qk.shape[1] - n:], "vision", self.type_name)}


@register
class VisionClsHidden(Node[HiddenParams]):
    """The CLS row of one vision layer's hidden states (VisionZip keeps it first)."""

    type_name = "signal.vision-cls-hidden"
    paper = "https://arxiv.org/abs/2412.04467"
    outputs = {"tokens": Port(Tokens, "(1, d_vision) the CLS token, id CLS_ID (-1), space vision")}

    def requests(self):
        return [SignalRequest.make("vision.cls_hidden", "vision", layer=self.params.layer)]

    def run(self, ctx):
        cls = ctx.signal(self.requests()[0]).reshape(1, -1)
        return {"tokens": Tokens(cls, torch.tensor([CLS_ID], device=cls.device), "vision")}
