"""Model-free runs on synthetic signals: a pipeline's token schedule without a model.

`SyntheticSignals` answers every signal request with random tensors of the documented
shape (nuwa_graph/signals.py) for a model geometry, so a pipeline can be executed with no
weights. What comes out is exactly the token schedule (tokens per LLM layer), which does
not depend on the values for fixed-budget methods (it does for adaptive ones such as
PruMerge+, so those numbers are examples). Used by docs/methods.md and by tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .executor import Executor, RunState, tokens_per_layer
from .pipeline import Pipeline
from .signals import SignalRequest
from .types import Geometry


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a model family gives its signals."""

    name: str
    grid: tuple[int, int]
    n_layers: int
    llm_heads: int = 32
    llm_width: int = 64
    vision_heads: int = 16
    vision_width: int = 64
    vision_head_dim: int = 64
    has_cls: bool = True
    image_start: int = 35
    text_after: int = 40

    @property
    def n_visual(self) -> int:
        return self.grid[0] * self.grid[1]


LLAVA_15 = ModelGeometry("llava-1.5-7b", (24, 24), 32)
QWEN25_VL = ModelGeometry("qwen2.5-vl-7b (28x28 merged grid)", (28, 28), 28, llm_heads=28, vision_heads=16,
                          has_cls=False, image_start=15)


class SyntheticSignals:
    """A reader for `Executor.run_site` that makes seeded random signals of the right shape."""

    def __init__(self, geom: ModelGeometry, state: RunState, seed: int = 0):
        self.geom = geom
        self.state = state
        self.gen = torch.Generator().manual_seed(seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen)

    def __call__(self, req: SignalRequest, sample: int) -> torch.Tensor:
        g = self.geom
        n = g.n_visual
        present = int(self.state.present[sample].numel())
        cls = 1 if g.has_cls else 0
        kind = req.kind
        if kind in ("vision.hidden", "vision.hidden_mean"):
            return self._rand(n, g.vision_width)
        if kind == "vision.merged_hidden_mean":
            return self._rand(n, g.llm_width)
        if kind == "vision.cls_hidden":
            return self._rand(g.vision_width)
        if kind == "vision.cls_attention":
            return torch.softmax(self._rand(g.vision_heads, n) * 8, dim=-1)
        if kind == "vision.attention_received":
            return self._rand(n)
        if kind == "vision.keys":
            return self._rand(g.vision_heads, n + cls, g.vision_head_dim)
        if kind == "vision.qk_single_head":
            return self._rand(2, n + cls, g.vision_width)
        if kind == "pre_llm.visual":
            return self._rand(present, g.llm_width)
        if kind == "pre_llm.text":
            return self._rand(g.text_after, g.llm_width)
        if kind == "llm.hidden":
            return self._rand(present, g.llm_width)
        if kind == "llm.attention":
            q = str(req.arg("queries", "last"))
            nq = 1 if q == "last" else g.text_after if q == "text" else int(q.split(":")[1])
            return torch.softmax(self._rand(g.llm_heads, nq, present) * 8, dim=-1)
        if kind == "external":
            return self._rand(present)
        raise ValueError(f"no synthetic form for signal {req.key}")


def simulate(pipeline: Pipeline, geom: ModelGeometry = LLAVA_15, seed: int = 0) -> tuple[RunState, list[int]]:
    """Run a pipeline on synthetic signals; returns the state and tokens per LLM layer."""
    ex = Executor(pipeline)
    state = ex.start([Geometry(geom.grid, image_start=geom.image_start)])
    reader = SyntheticSignals(geom, state, seed)
    for site in ex.sites():
        ex.run_site(state, site, reader)
    return state, tokens_per_layer(state.actions[0], geom.n_visual, geom.n_layers)
