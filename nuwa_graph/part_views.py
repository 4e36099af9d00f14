"""Running a node per crop or per part of an image (the executor's `per`).

On an image made of several crops or parts (nuwa_graph/geometry.py) a node with `per: crop`
runs once per vision crop and `per: part` once per spatial part, each time as if that unit
were the whole image: its geometry is the unit's grid, the ids it sees are local raster ids
0..h*w-1 (its CLS is CLS_ID), its signals are the unit's own (a vision signal: the crop's;
a signal over the present tokens: the columns of the unit's tokens). Its outputs are mapped
back to block ids and joined in unit order, so an image-wise node downstream sees one value
over the whole block. Values without ids (Regions) stay per unit (`PerUnit`) and feed only
nodes run over the same units.

Which nodes run how (`scope_of`): the file's `per:` when given; otherwise a node that
declares itself spatial (`Node.spatial`) runs per part, a node that reads a vision signal
runs per crop, every other node image-wise. On a one-grid image (LLaVA-1.5, Qwen2.5-VL) every
node runs image-wise, as it always did.

On a prompt of several images (prompt_geometry.py) `per: image` (the default of a node that
is neither spatial nor a vision reader) runs the node once per image, with that image's own
geometry and ids; `per: prompt` (or `Node.prompt_wide`) once over every image's tokens
together (a global top-k). Appliers always run once over the prompt. A node whose outputs
only mean something per image (`Node.per_image_only`: position plans, whose offsets count
from their image's start) refuses `per: prompt` there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import RunError
from .geometry import Unit
from .signals import SignalRequest
from .types import Applied, PositionPlan, Regions, Roles, Scores, Selection, Tokens

PER_CHOICES = ("image", "crop", "part", "prompt")
# signal kind -> the axis of its SHAPE that runs over the image tokens present (signals.py): a
# node run per crop or part reads the columns of its own tokens; `vision.*` signals come per
# crop (CropSignals); other kinds (pre_llm.text) are not per token and pass as they are
PRESENT_AXIS = {"external": 0, "pre_llm.visual": 0, "llm.attention": -1, "llm.hidden": 0, "llm.keys": 1,
                "llm.token_hidden": 0}
PER_TOKEN_FREE = {"pre_llm.text"}


class PerUnit(list):
    """A node output that has no ids (Regions): one value per unit, for nodes run per the same units."""

    def __init__(self, values: list[Any], per: str):
        super().__init__(values)
        self.per = per


class CropSignals(list):
    """A vision signal of an image of several crops: one tensor per crop, by crop index
    (each shaped as the signal's SHAPE on that crop's grid). Adapters return it; a node
    running per crop reads its crop's tensor."""

    def to(self, device: torch.device | str) -> CropSignals:
        """Every crop's tensor on `device` (signals come back on the model's device; a no-op there)."""
        return CropSignals([v.to(device) for v in self])


def scope_of(node: Any, per: str | None) -> str:
    """How a node runs on an image of several parts or a prompt of several images: an applier
    once over the whole prompt; else the file's `per`, else its default (`Node.prompt_wide`:
    over every image of the prompt at once; a spatial node per part; a node reading a vision
    signal per crop; the rest per image)."""
    if getattr(node, "family", "") == "applier":
        return "prompt"
    if per is not None:
        return per
    if getattr(node, "prompt_wide", False):
        return "prompt"
    if getattr(node, "spatial", False):
        return "part"
    if any(r.kind.startswith("vision.") for r in node.requests()):
        return "crop"
    return "image"


def to_local(value: Any, unit: Unit, units: list[Unit], port: str, node: str) -> Any:
    """A value that is not a tensor of ids (values per unit, regions, anything else) as the unit
    sees it; ids are cut into units by `split_to_units`."""
    if isinstance(value, list) and not isinstance(value, PerUnit):
        return [to_local(v, unit, units, port, node) for v in value]
    if isinstance(value, PerUnit):
        if len(value) != len(units):
            raise RunError(f"node {node!r}: input {port!r} was made per {value.per}, this node runs per {unit.kind}; "
                           f"give both the same `per`")
        return value[units.index(unit)]
    if isinstance(value, Regions):
        raise RunError(f"node {node!r}: input {port!r} holds regions of the whole image, which has several parts; "
                       f"make them per part (a region node runs per part by default)")
    return value


def split_to_units(value: Any, units: list[Unit], port: str, node: str, markers: bool = True) -> list[Any]:
    """`value` (block ids) cut into every unit's share, in local ids, order kept within each
    unit: one host sync for all the units (how many ids fall in each is data), where
    `to_local` unit by unit would make one per unit. `markers=False`: a unit's CLS and pooled
    tokens are left out (the present tokens a unit's grid holds)."""
    if isinstance(value, list) and not isinstance(value, PerUnit):
        per_item = [split_to_units(v, units, port, node, markers) for v in value]
        return [[item[i] for item in per_item] for i in range(len(units))]
    if isinstance(value, PerUnit) or isinstance(value, Regions) or not isinstance(
            value, (Scores, Selection, Tokens, Roles, PositionPlan)):
        return [to_local(value, u, units, port, node) for u in units]
    ids = value.ids
    owner_of, local_of = units[0].owners(ids.device)
    special = [(u.cls_id, i) for i, u in enumerate(units) if u.cls_id is not None and u.cls_id < 0]
    special += [(u.pooled_id, i) for i, u in enumerate(units) if u.pooled_id is not None and u.pooled_id < 0]
    inside = (ids >= 0) & (ids < owner_of.numel())
    at = ids.clamp(0, max(owner_of.numel() - 1, 0))
    owner = torch.where(inside, owner_of[at], torch.full_like(ids, -1))
    local = torch.where(inside, local_of[at], torch.full_like(ids, -100))
    for marker, i in special:  # a one-crop geometry's CLS / pooled marker belongs to that crop's unit
        owner = torch.where(ids == marker, torch.full_like(ids, i), owner)
        local = torch.where(ids == marker, ids, local)
    held = owner >= 0 if markers else (owner >= 0) & (local >= 0)
    key = torch.where(held, owner, torch.full_like(owner, len(units)))  # ids in no unit go last
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(len(units) + 1, dtype=torch.long, device=ids.device).index_add_(
        0, key, torch.ones_like(key)).tolist()  # the one host sync
    pieces = lambda t: torch.split(t[order], counts)[:len(units)]  # noqa: E731
    locals_ = pieces(local)
    if isinstance(value, Scores):
        return [Scores(v, i) for v, i in zip(pieces(value.values), locals_)]
    if isinstance(value, Selection):
        return [Selection(i) for i in locals_]
    if isinstance(value, Tokens):
        return [Tokens(v, i, value.space) for v, i in zip(pieces(value.values), locals_)]
    if isinstance(value, Roles):
        return [Roles(i, p) for p, i in zip(pieces(value.pillar), locals_)]
    return [PositionPlan(i, o, value.policy, value.text_follows) for o, i in zip(pieces(value.offsets), locals_)]


def to_block(values: list[Any], units: list[Unit], port: str, node: str) -> Any:
    """One value over the block from the per-unit outputs of a node (ids mapped, joined in unit order)."""
    first = values[0]
    if isinstance(first, Regions) or not isinstance(first, (Scores, Selection, Tokens, Roles, PositionPlan)):
        if isinstance(first, Applied):
            raise RunError(f"node {node!r}: an applier runs once for the whole image (per: image)")
        return PerUnit(values, units[0].kind)
    ids = torch.cat([u.to_block(v.ids) for u, v in zip(units, values)]) if values else first.ids
    if isinstance(first, Scores):
        return Scores(torch.cat([v.values for v in values]), ids)
    if isinstance(first, Selection):
        return Selection(ids)
    if isinstance(first, Tokens):
        spaces = {v.space for v in values}
        if len(spaces) > 1:
            raise RunError(f"node {node!r}: output {port!r} is in different spaces per unit ({sorted(spaces)})")
        return Tokens(torch.cat([v.values for v in values]), ids, first.space)
    if isinstance(first, Roles):
        return Roles(ids, torch.cat([v.pillar for v in values]))
    assert isinstance(first, PositionPlan)
    return PositionPlan(ids, torch.cat([v.offsets for v in values]), first.policy, first.text_follows)


def unit_cells(unit: Unit, device: torch.device) -> torch.Tensor:
    """Every cell of the unit as local ids: its present tokens at the vision site before any Keep
    (vision signals cover them all, cut cells included)."""
    return torch.arange(unit.shape[0] * unit.shape[1], device=device)


def memo_reader(reader: Callable[[SignalRequest, int], Any] | None) -> Callable[[SignalRequest, int], Any] | None:
    """`reader` reading each (signal, sample) once: the units of one node share what it returns."""
    if reader is None:
        return None
    seen: dict[tuple[str, str, int], Any] = {}

    def read(req: SignalRequest, b: int) -> Any:
        key = (req.key, req.site, b)
        if key not in seen:
            seen[key] = reader(req, b)
        return seen[key]

    return read


def unit_reader(reader: Callable[[SignalRequest, int], Any] | None, unit: Unit, present: torch.Tensor,
                node: str) -> Callable[[SignalRequest, int], torch.Tensor] | None:
    """A signal reader that gives the unit's part of every signal."""
    if reader is None:
        return None

    def read(req: SignalRequest, b: int) -> torch.Tensor:
        v = reader(req, b)
        if isinstance(v, CropSignals):
            if unit.crop is None:
                raise RunError(f"node {node!r} reads {req.kind} per {unit.kind}, but {unit.kind} {unit.index} stitches "
                               f"several vision crops; read vision signals per crop (per: crop)")
            return v[unit.crop]
        if req.kind.startswith("vision.") or req.kind in PER_TOKEN_FREE or req.arg("tokens", "image") == "text":
            return v  # not per image token (the text after the image: llm.keys / llm.token_hidden tokens=text)
        axis = PRESENT_AXIS.get(req.kind)
        if axis is None:
            raise RunError(f"node {node!r} runs per {unit.kind} and reads {req.kind}, whose per-token axis is not "
                           f"known (part_views.PRESENT_AXIS); run it per image")
        keep, local = unit.to_local(present)
        cols = torch.nonzero(keep).reshape(-1)[local >= 0]
        return v.index_select(axis if axis >= 0 else v.dim() + axis, cols.to(v.device))

    return read


def image_reader(reader: Callable[[SignalRequest, int], Any] | None, node: str, per: str | None
                 ) -> Callable[[SignalRequest, int], torch.Tensor] | None:
    """The image-wise reader: a one-crop image's vision signal is that crop's; a per-crop vision
    signal of several crops is refused (it has no block-wide form)."""
    if reader is None:
        return None

    def read(req: SignalRequest, b: int) -> torch.Tensor:
        v = reader(req, b)
        if isinstance(v, CropSignals) and len(v) == 1:
            return v[0]
        if isinstance(v, CropSignals):
            how = "it says per: image" if per == "image" else "it runs image-wise"
            raise RunError(f"node {node!r} reads {req.kind}, which this image gives per crop ({len(v)} crops), but "
                           f"{how}; run it per crop (per: crop)")
        return v

    return read
