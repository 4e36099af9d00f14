"""Model-free runs on synthetic signals: a pipeline's token schedule without a model.

`SyntheticSignals` answers every signal request with a random tensor of its documented
shape (each request class's `synthetic`, nuwa_graph/signals.py) for a model geometry, so a pipeline can be executed with no
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
        """The request's own synthetic form (signals.py), for the tokens present in `sample`."""
        return req.synthetic(self.geom, int(self.state.present[sample].numel()), self._rand)


def simulate(pipeline: Pipeline, geom: ModelGeometry = LLAVA_15, seed: int = 0) -> tuple[RunState, list[int]]:
    """Run a pipeline on synthetic signals; returns the state and tokens per LLM layer."""
    ex = Executor(pipeline)
    state = ex.start([Geometry(geom.grid, image_start=geom.image_start)])
    reader = SyntheticSignals(geom, state, seed)
    for site in ex.sites():
        ex.run_site(state, site, reader)
    return state, tokens_per_layer(state.actions[0], geom.n_visual, geom.n_layers)
