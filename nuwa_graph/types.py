"""Semantic port types: what flows along the edges of a pipeline.

Every value describes ONE sample (the executor carries a list of them for a batch), and
every value that talks about tokens carries their original indices (`ids`): the index of
the token in the image grid, row-major, without CLS (a merged token keeps its anchor's id,
a CLS token, where a method keeps it, has id -1). Selections in original indices are what
lets nodes at different sites compose. On an image made of several crops or parts (LLaVA-NeXT,
InternVL) ids are stream ids of the whole block; nuwa_graph/geometry.py says how they map to
crops and cells.

Port types are compared by identity when two nodes are connected: a `Scores` output never
feeds a `Selection` input, and nothing is converted silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .geometry import CLS_ID, POOLED_ID, Crop, Geometry, GeometryError, Part  # noqa: F401  (the block's geometry)

# Text tokens after the image block, where a node handles them next to image tokens (DART's text
# pivots): the j-th prompt token after the image has id TEXT_ID_BASE + j. They never enter a Keep.
TEXT_ID_BASE = -(1 << 40)


def text_ids(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Ids of the first n text tokens after the image block (TEXT_ID_BASE + j)."""
    return torch.arange(n, device=device) + TEXT_ID_BASE


def is_text_id(ids: torch.Tensor) -> torch.Tensor:
    """True where an id names a text token after the image (not an image, CLS or pooled token)."""
    return ids < TEXT_ID_BASE // 2


def _check_ids(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
        raise TypeError(f"{name}.ids must be a 1-D int64 tensor, got {getattr(ids, 'shape', ids)!r}")


class PortType:
    """Base of every semantic port type; `doc` is shown by `nuwa-graph nodes`."""

    doc: ClassVar[str] = ""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


@dataclass
class Scores(PortType):
    """One score per token, higher = more important; `ids` are the tokens' original ids."""

    values: torch.Tensor
    ids: torch.Tensor
    doc: ClassVar[str] = "a score per token (higher keeps), with the tokens' original ids"

    def __post_init__(self) -> None:
        _check_ids("Scores", self.ids)
        if self.values.shape != self.ids.shape:
            raise ValueError(f"Scores: values {tuple(self.values.shape)} and ids {tuple(self.ids.shape)} differ")


@dataclass
class Selection(PortType):
    """A set of kept tokens as original ids, in the order the method produced them."""

    ids: torch.Tensor
    doc: ClassVar[str] = "kept tokens as original ids, in the method's order"

    def __post_init__(self) -> None:
        _check_ids("Selection", self.ids)

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class Roles(PortType):
    """A split of a token set into two roles (Nüwa: pillars vs collectors)."""

    ids: torch.Tensor
    pillar: torch.Tensor  # bool, True = pillar
    doc: ClassVar[str] = "tokens split into pillars (True) and collectors (False)"

    def __post_init__(self) -> None:
        _check_ids("Roles", self.ids)
        if self.pillar.dtype != torch.bool or self.pillar.shape != self.ids.shape:
            raise ValueError("Roles.pillar must be a bool tensor shaped like ids")


@dataclass
class Regions(PortType):
    """A partition of the image grid: `region[i]` is the region of original token i."""

    region: torch.Tensor
    grid: tuple[int, int]
    doc: ClassVar[str] = "region id of every grid token (e.g. 2x2 cells)"


@dataclass
class Mix:
    """How merged rows were made from the stream's own rows: row j = sum_i weights[j, i] *
    (the current features of token `sources[i]`). A merger inside the LLM sets it so that a
    replay on another prompt (question-agnostic pruning, docs/evaluation.md) recomputes the
    rows from that prompt's hidden states instead of reusing features it never computed."""

    sources: torch.Tensor  # (m,) original ids of the rows mixed
    weights: torch.Tensor  # (n, m): one row per merged token

    def __post_init__(self) -> None:
        _check_ids("Mix.sources", self.sources)
        if self.weights.dim() != 2 or self.weights.shape[1] != self.sources.numel():
            raise ValueError(f"Mix: weights must be (n, {self.sources.numel()}), got {tuple(self.weights.shape)}")


@dataclass
class Tokens(PortType):
    """Token features (`values`: n x d) with the original id of each row (merged: anchor's).

    `space` says where they live: `vision` (vision-encoder width, before the projector) or
    `llm` (after the projector / inside the language model). `mix`, where a merger gives it,
    says how each row was made from the tokens present (see Mix).
    """

    values: torch.Tensor
    ids: torch.Tensor
    space: str = "vision"
    mix: Mix | None = None
    doc: ClassVar[str] = "token features (n x d) with original ids; space vision|llm"

    def __post_init__(self) -> None:
        _check_ids("Tokens", self.ids)
        if self.values.dim() != 2 or self.values.shape[0] != self.ids.shape[0]:
            raise ValueError(
                f"Tokens: values must be (n, d) with n = len(ids); got {tuple(self.values.shape)} and {len(self.ids)}"
            )
        if self.mix is not None and self.mix.weights.shape[0] != self.ids.numel():
            raise ValueError(f"Tokens: mix has {self.mix.weights.shape[0]} rows for {self.ids.numel()} tokens")

    def grid_values(self, n: int) -> torch.Tensor | None:
        """The values in raster order when the rows are exactly the grid's n tokens (ids a
        permutation of 0..n-1; rows of a tiled image's part may come crop by crop), else None."""
        if self.values.shape[0] != n:
            return None
        ar = torch.arange(n, device=self.ids.device)
        if torch.equal(self.ids, ar):
            return self.values
        order = torch.argsort(self.ids)
        return self.values[order] if torch.equal(self.ids[order], ar) else None


@dataclass
class PositionPlan(PortType):
    """Position ids for the kept visual tokens, relative to the image's first id.

    `offsets[j]` is the position offset of kept token j (in the order of `ids`); `policy`
    names how they were made (pesp, perc, rpme); `text_follows` says whether text after
    the image keeps its unpruned ids (`original`) or follows the last kept token
    (`compact`).
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    policy: str
    text_follows: str = "original"
    doc: ClassVar[str] = "position offsets of kept visual tokens (PESP, PERC or RPME)"

    def __post_init__(self) -> None:
        _check_ids("PositionPlan", self.ids)
        if self.text_follows not in ("original", "compact"):
            raise ValueError("PositionPlan.text_follows must be 'original' or 'compact'")


@dataclass
class Applied(PortType):
    """What an applier did; lets a later node depend on a prune having happened."""

    site: str
    kept: int
    doc: ClassVar[str] = "marker: the token set was changed at this site"
