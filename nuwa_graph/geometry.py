"""The geometry of one image's visual block: an ordered list of PARTS, each made of CROPS.

A block is what one image puts into the prompt: a run of `n_tokens` slots with ids
0..n-1 in stream order (the order the stock model feeds them). Its parts say what the ids
mean (docs/families.md draws each family's):

- `grid`: a rows x cols grid of tokens (LLaVA-1.5, Qwen2.5-VL: the only part; LLaVA-NeXT:
  the base crop);
- `tiles`: several crops stitched into one grid, possibly cropped (LLaVA-NeXT's AnyRes
  canvas after `unpad_image`); its rows may be separated by newline slots (`row_stride`);
- `tile` / `thumbnail`: one crop of a tiled image (InternVL's tiles, its thumbnail last);
- `newline`: slots with no vision row (LLaVA-NeXT's learned `image_newline` per row);
- `sequence`: tokens of unknown layout (a family that gives no structure).

Stream id of cell (r, c) of a part = offset + r * row_stride + c. A `Crop` is one pass of
the vision tower (one batch row: LLaVA-NeXT's base image and each tile); its cells sit on
the part's uncut canvas at `at`, and the part's stream window starts at canvas cell `cut`.
A crop cell outside the window (cut away by unpad) has no stream slot: it is VISION-ONLY and
gets an id >= n_tokens, so that a vision-space method that keeps it (VisionZip's official
LLaVA-NeXT path does) still names it. On a geometry of several crops the CLS token of crop
c and a pooled token of crop c get ids of their own past those (`cls_id`, `pooled_id`); a
geometry of one crop keeps CLS_ID / POOLED_ID, so single-grid families are unchanged.

`grid` is the shape of the single grid part; on a geometry of several parts (or a flat one)
reading it is an error (GeometryError): a node that needs a grid runs per part or per crop
(the executor's `per`), never with a silent 1-D meaning.

Later work (several blocks per prompt: multi-image, video frames) composes blocks = ordered
parts with id offsets the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

CLS_ID = -1  # the id a kept CLS token carries (VisionZip keeps it)
POOLED_ID = -2  # the id of a token pooled from dropped tokens with no anchor (PruMerge+'s extra token)

PART_KINDS = ("grid", "tiles", "tile", "thumbnail", "newline", "sequence")
SPATIAL_KINDS = frozenset({"grid", "tiles", "tile", "thumbnail"})


class GeometryError(ValueError):
    """A node asked the geometry for something this image's parts do not have (a grid)."""


@dataclass(frozen=True)
class Crop:
    """One crop of the vision pass (its batch row `index`) and where it sits in its part."""

    index: int
    shape: tuple[int, int]  # the crop's cell grid (vision side)
    at: tuple[int, int] = (0, 0)  # its top-left cell on the part's uncut canvas


@dataclass(frozen=True)
class Part:
    """A contiguous piece of the block's geometry (see the module docstring)."""

    kind: str
    offset: int  # stream id of cell (0, 0)
    shape: tuple[int, int]  # (rows, cols) of the cells in the stream
    row_stride: int | None = None  # stream id step between rows (default cols)
    crops: tuple[Crop, ...] = ()
    cut: tuple[int, int] = (0, 0)  # canvas cell of stream cell (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in PART_KINDS:
            raise ValueError(f"part kind {self.kind!r}; valid: {', '.join(PART_KINDS)}")
        if self.shape[0] < 0 or self.shape[1] < 0:
            raise ValueError(f"part shape {self.shape} must be non-negative")

    @property
    def spatial(self) -> bool:
        return self.kind in SPATIAL_KINDS

    @property
    def stride(self) -> int:
        return self.shape[1] if self.row_stride is None else self.row_stride

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]

    def stream_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stream ids of the part's cells in raster order."""
        r = torch.arange(self.shape[0], device=device)[:, None]
        c = torch.arange(self.shape[1], device=device)[None, :]
        return (self.offset + r * self.stride + c).reshape(-1)

    def window_id(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Stream ids of canvas cells (row, col); -1 where the cell is outside the stream window."""
        r, c = row - self.cut[0], col - self.cut[1]
        inside = (r >= 0) & (r < self.shape[0]) & (c >= 0) & (c < self.shape[1])
        return torch.where(inside, self.offset + r * self.stride + c, torch.full_like(r, -1))


@dataclass(frozen=True, eq=False)
class Unit:
    """What a node running `per: crop` or `per: part` sees as its whole image: a grid of
    `shape` whose local raster id l is block id `block_ids[l]`."""

    kind: str  # crop | part
    index: int  # crop index (kind crop) or part index (kind part)
    shape: tuple[int, int]
    block_ids: torch.Tensor
    crop: int | None  # the vision crop whose signals this unit reads (None: several or none)
    cls_id: int | None
    pooled_id: int | None
    id_space: int = 0  # every block id is below this (stream, vision-only, CLS and pooled ids)

    # set by Geometry.units: {"tables": Geometry.unit_tables, "row": this unit's index in its `per`}
    shared: dict = field(default_factory=dict, repr=False)

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """This unit's lookup `name` on `device` (`table`: block id -> local id, -100 where not in
        this unit; `block_ids`), from the geometry's tables (copied to a device once)."""
        t = self.shared["tables"](device)[self.kind]
        row = self.shared["row"]
        return t["table"][row] if name == "table" else t["bids"][row, :self.block_ids.numel()]

    def owners(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner, local), indexed by block id: which unit of this `per` holds an id (-1: none;
        a `per`'s units are disjoint) and its local id there (CLS_ID / POOLED_ID for a unit's own
        CLS and pooled ids), on `device`."""
        t = self.shared["tables"](device)[self.kind]
        return t["owner"], t["local"]

    def to_local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of `ids` that belong to this unit, their local ids). Picking them is a host sync
        (how many belong here is data); the executor avoids it between nodes of the same `per`."""
        table = self._on("table", ids.device)
        inside = (ids >= 0) & (ids < table.numel())
        local = torch.where(inside, table[ids.clamp(0, max(table.numel() - 1, 0))], torch.full_like(ids, -100))
        for special, marker in ((self.cls_id, CLS_ID), (self.pooled_id, POOLED_ID)):
            if special is not None:
                local = torch.where(ids == special, torch.full_like(ids, marker), local)
        keep = local != -100
        return keep, local[keep]

    def to_block(self, local: torch.Tensor) -> torch.Tensor:
        """Block ids of local ids (CLS_ID / POOLED_ID -> this unit's own; no host sync). A unit
        with no CLS (a part stitched from several crops) cannot give its nodes a CLS marker: its
        inputs never carry one (`to_local`) and it reads no vision signal (`unit_reader`)."""
        bids = self._on("block_ids", local.device)
        out = torch.where(local >= 0, bids[local.clamp(min=0, max=max(bids.numel() - 1, 0))], local)
        for special, marker in ((self.cls_id, CLS_ID), (self.pooled_id, POOLED_ID)):
            if special is not None:
                out = torch.where(local == marker, torch.full_like(local, special), out)
        return out


class Geometry:
    """Static facts of one sample that any node may read (not a signal: no site).

    `Geometry((24, 24), image_start=35)` is one grid of one crop (LLaVA-1.5); families with
    tiles pass `parts` (see the module docstring). `grid` is only defined for one grid part.
    """

    def __init__(self, grid: tuple[int, int] | None = None, image_start: int = 0,
                 parts: tuple[Part, ...] | list[Part] | None = None):
        if not parts:
            if grid is None:
                raise ValueError("Geometry needs a grid (rows, cols) or its parts")
            g = (int(grid[0]), int(grid[1]))
            parts = (Part("grid", 0, g, crops=(Crop(0, g),)),)
        self.parts: tuple[Part, ...] = tuple(parts)
        self.image_start = int(image_start)  # sequence position of the first image token
        self._units: dict = {}  # per -> its units; ("same", a, b) -> same_units(a, b)
        # pictures: (label, rows x cols block ids) each covering the whole image (`views`)
        self._views: list[tuple[str, torch.Tensor]] | None = None

    def __repr__(self) -> str:
        return f"Geometry({self.describe()}, image_start={self.image_start})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Geometry) and self.parts == other.parts
                and self.image_start == other.image_start)

    # ---- the single-grid view ------------------------------------------------------------
    @property
    def simple(self) -> bool:
        """One grid part holding one crop that fills it: every node runs as on LLaVA-1.5."""
        p = self.parts[0]
        return (len(self.parts) == 1 and p.kind == "grid" and len(p.crops) == 1 and p.crops[0].shape == p.shape
                and p.cut == (0, 0) and p.stride == p.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        if not self.simple:
            raise GeometryError(f"this image is made of parts ({self.describe()}), not one grid; a node that needs "
                                f"a grid runs per part or per crop (per: part | crop), never over the flat sequence")
        return self.parts[0].shape

    @property
    def n_tokens(self) -> int:
        """Slots in the stream (the stock model's image tokens)."""
        return max((p.offset + (p.shape[0] - 1) * p.stride + p.shape[1] for p in self.parts if p.n), default=0)

    def describe(self) -> str:
        return ", ".join(f"{p.kind} {p.shape[0]}x{p.shape[1]}" + (f" ({len(p.crops)} crops)" if len(p.crops) > 1 else "")
                         for p in self.parts)

    # ---- crops and ids ---------------------------------------------------------------------
    @cached_property
    def crops(self) -> list[tuple[Part, Crop]]:
        """Every crop with its part, by crop index (the vision pass's batch order)."""
        return sorted(((p, c) for p in self.parts for c in p.crops), key=lambda pc: pc[1].index)

    @cached_property
    def _crop_ids(self) -> dict[int, torch.Tensor]:
        """Block id of every cell of every crop (raster within the crop); vision-only cells get
        ids n_tokens, n_tokens + 1, ... in crop order."""
        out = {}
        nxt = self.n_tokens
        for part, crop in self.crops:
            h, w = crop.shape
            rows = (crop.at[0] + torch.arange(h, device="cpu"))[:, None].expand(h, w).reshape(-1)
            cols = (crop.at[1] + torch.arange(w, device="cpu"))[None, :].expand(h, w).reshape(-1)
            ids = part.window_id(rows, cols)
            vo = ids < 0
            k = int(vo.sum())
            ids[vo] = torch.arange(nxt, nxt + k, device="cpu")
            nxt += k
            out[crop.index] = ids
        return out

    @cached_property
    def vision_only(self) -> int:
        """Crop cells with no stream slot (cut away), each with an id >= n_tokens."""
        return sum(int((ids >= self.n_tokens).sum()) for ids in self._crop_ids.values())

    @property
    def id_space(self) -> int:
        """One past the largest block id: stream slots, vision-only cells, then a CLS and a pooled id per crop."""
        return self.n_tokens + self.vision_only + 2 * len(self.crops)

    def crop_ids(self, crop: int) -> torch.Tensor:
        return self._crop_ids[crop]

    def cls_id(self, crop: int) -> int:
        """The id of crop `crop`'s CLS token (CLS_ID on a one-crop geometry)."""
        if len(self.crops) <= 1:
            return CLS_ID
        return self.n_tokens + self.vision_only + [c.index for _, c in self.crops].index(crop)

    def pooled_id(self, crop: int) -> int:
        if len(self.crops) <= 1:
            return POOLED_ID
        return self.n_tokens + self.vision_only + len(self.crops) + [c.index for _, c in self.crops].index(crop)

    @cached_property
    def _cell_table(self) -> torch.Tensor:
        """(id_space, 3): crop index, canvas row, canvas col of every block id (-1: not a crop cell)."""
        table = torch.full((self.id_space, 3), -1, dtype=torch.long, device="cpu")
        for _part, c in self.crops:
            local = torch.arange(c.shape[0] * c.shape[1], device="cpu")
            rows = torch.stack([torch.full_like(local, c.index), c.at[0] + local // c.shape[1],
                                c.at[1] + local % c.shape[1]], dim=1)
            table[self._crop_ids[c.index]] = rows
        return table

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crop index, canvas row, canvas col) of block ids (-1 where an id is no crop cell:
        newline slots, CLS and pooled ids, markers)."""
        cache = self.__dict__.setdefault("_cell_tables", {})
        if str(ids.device) not in cache:  # copied to a device once per geometry
            cache[str(ids.device)] = self._cell_table.to(ids.device)
        table = cache[str(ids.device)]
        inside = (ids >= 0) & (ids < table.shape[0])
        got = torch.where(inside[:, None], table[ids.clamp(0, table.shape[0] - 1)], torch.full_like(table[:1], -1))
        return got[:, 0], got[:, 1], got[:, 2]

    def newline_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stream ids of the newline slots."""
        parts = [p.stream_ids(device) for p in self.parts if p.kind == "newline"]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def views(self) -> list[tuple[str, list[list[int]]]]:
        """How the block covers the picture: (label, rows x cols ids), each spread over the whole
        image (kept-token pictures draw one panel per view). Default: every spatial part."""
        views = self._views
        if views is None:
            views = [(p.kind, p.stream_ids("cpu").reshape(p.shape)) for p in self.parts if p.spatial]
        return [(label, ids.tolist()) for label, ids in views]

    # ---- units a node runs over (`per: crop | part`) ------------------------------------------
    def unit_tables(self, device: torch.device | str) -> dict[str, dict[str, torch.Tensor]]:
        """The id lookups of every unit of both `per`s (crop, part) on `device`: per `per`,
        `table` (units, ids): local id of a block id in each unit (-100: not there), `bids`
        (units, cells): block id of each local id, `owner` (ids): the unit holding an id (-1:
        none), `local` (ids): its local id there (CLS_ID / POOLED_ID for a unit's own CLS and
        pooled ids). Built on the CPU and copied to a device in ONE copy, once per geometry."""
        key = ("tables", str(device))
        if key in self._units:
            return self._units[key]
        built: dict[str, dict[str, torch.Tensor]] = {}
        for per in ("crop", "part"):
            units = self.units(per)
            size = max([self.id_space] + [int(u.block_ids.max()) + 1 for u in units if u.block_ids.numel()])
            width = max([1] + [u.block_ids.numel() for u in units])
            t = {"table": torch.full((len(units), size), -100, dtype=torch.long, device="cpu"),
                 "bids": torch.zeros((len(units), width), dtype=torch.long, device="cpu"),
                 "owner": torch.full((size,), -1, dtype=torch.long, device="cpu"),
                 "local": torch.full((size,), -100, dtype=torch.long, device="cpu")}
            for i, u in enumerate(units):
                cells = torch.arange(u.block_ids.numel(), device="cpu")
                t["table"][i, u.block_ids] = cells
                t["bids"][i, :u.block_ids.numel()] = u.block_ids
                t["owner"][u.block_ids] = i
                t["local"][u.block_ids] = cells
                for special, marker in ((u.cls_id, CLS_ID), (u.pooled_id, POOLED_ID)):
                    if special is not None and special >= 0:
                        t["owner"][special], t["local"][special] = i, marker
            built[per] = t
        flat = torch.cat([v.reshape(-1) for t in built.values() for v in t.values()]).to(device)  # the one copy
        at = 0
        for t in built.values():
            for name, v in t.items():
                t[name] = flat[at:at + v.numel()].view(v.shape)
                at += v.numel()
        self._units[key] = built
        return built

    def same_units(self, a: str, b: str) -> bool:
        """Whether `per: a` and `per: b` cut this image into the same units, in the same order, with
        the same ids (InternVL: every tile and the thumbnail is a part of one crop), so values made
        per unit of one are the other's as they are."""
        if a == b:
            return True
        if "image" in (a, b):
            return False
        key = ("same", *sorted((a, b)))
        if key not in self._units:
            ua, ub = self.units(a), self.units(b)
            same = len(ua) == len(ub) and all(
                x.shape == y.shape and x.cls_id == y.cls_id and x.pooled_id == y.pooled_id
                and torch.equal(x.block_ids, y.block_ids) for x, y in zip(ua, ub))
            self._units[key] = same
        return bool(self._units[key])

    def units(self, per: str) -> list[Unit]:
        """The crops (vision passes) or the spatial parts of the block, as Units."""
        if per in self._units:
            return self._units[per]
        out: list[Unit] = []
        if per == "crop":
            for _part, c in self.crops:
                out.append(Unit("crop", c.index, c.shape, self._crop_ids[c.index], c.index, self.cls_id(c.index),
                                self.pooled_id(c.index), self.id_space))
        elif per == "part":
            for i, p in enumerate(self.parts):
                if not p.spatial:
                    continue
                one = p.crops[0] if len(p.crops) == 1 else None
                whole = one is not None and one.shape == p.shape and one.at == p.cut
                crop = one.index if whole and one is not None else None
                out.append(Unit("part", i, p.shape, p.stream_ids(), crop,
                                self.cls_id(crop) if crop is not None else None,
                                self.pooled_id(crop) if crop is not None else None, self.id_space))
        else:
            raise ValueError(f"per {per!r}; valid: image, crop, part")
        out = [replace(u, shared={"tables": self.unit_tables, "row": i}) for i, u in enumerate(out)]
        self._units[per] = out
        return out
