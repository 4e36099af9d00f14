"""What a node sees while it runs one sample: geometry, signals, randomness, the stream."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .signals import SignalRequest
from .types import Geometry, PositionPlan, Tokens


@dataclass
class Keep:
    """An applier's instruction to the adapter: from `site` on, the image block is `ids`.

    - `ids`: original ids of the visual tokens that stay, in the order they will sit in
      the sequence (merged tokens carry their anchor's id; a kept CLS has id -1);
    - `tokens`: replacement features for those rows (merged tokens), in `tokens.space`;
      None keeps each token's own current features;
    - `positions`: the position plan; None keeps each token's current position id (at
      `llm.K`) or lets the model number the block contiguously (before the LLM).
    """

    site: str
    ids: torch.Tensor
    tokens: Tokens | None = None
    positions: PositionPlan | None = None
    node: str = ""


def node_seed(seed: int, node_name: str, sample: int | str) -> int:
    """A stable per-node, per-sample seed: reproducible, different across nodes and seeds.
    `sample`: the sample's content key (`sample_key`) in a model run, so a sample draws the
    same whatever its place in a batch or shard; its index in a model-free run."""
    h = hashlib.sha256(f"{seed}/{node_name}/{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_key(image: Any, prompt: str) -> str:
    """A key of one sample's content (its image's pixels and its prompt): what seeded draws are
    keyed on in a model run, so a sample's random choices do not depend on the batch it is in,
    its position there, or how an evaluation is sharded (hashed once per sample, on the host)."""
    h = hashlib.sha256(prompt.encode())
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):  # a PIL image
        h.update(f"{image.mode}/{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, torch.Tensor):
        h.update(f"{tuple(image.shape)}/{image.dtype}".encode())
        h.update(image.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(repr(image).encode())
    return h.hexdigest()[:32]


@dataclass
class SampleContext:
    """Per-sample, per-node view of a run.

    `present` holds the original ids of the image tokens present in the stream at the
    current site, in sequence order (all of them before any prune).
    """

    sample: int
    geometry: Geometry
    present: torch.Tensor
    seed: int = 0
    node_name: str = ""
    reader: Callable[[SignalRequest, int], torch.Tensor] | None = None
    actions: list[Keep] = field(default_factory=list)
    # the crop or part this run of the node covers (per: crop | part), else None; `geometry`
    # is then that unit's grid and ids are its local ids (nuwa_graph/part_views.py)
    unit: Any = None
    # the sample's content key (`sample_key`; a model run sets it): seeded draws are keyed on it
    # rather than on `sample`, the position in the batch
    key: str | None = None

    @property
    def device(self) -> torch.device:
        """Where this sample's tensors live (the model's device in a model run): a node makes
        its own tensors here (docs/CONTRACTS.md)."""
        return self.present.device

    def signal(self, request: SignalRequest) -> torch.Tensor:
        if self.reader is None:
            raise RuntimeError(f"node {self.node_name!r} asked for signal {request.key} but this run has no model or tensors")
        return self.reader(request, self.sample)

    def generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")
        name = self.node_name if self.unit is None else f"{self.node_name}/{self.unit.kind}{self.unit.index}"
        g.manual_seed(node_seed(self.seed, name, self.key if self.key is not None else self.sample))
        return g

    def apply(self, action: Keep) -> None:
        action.node = self.node_name
        self.actions.append(action)
