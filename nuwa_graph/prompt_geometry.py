"""The geometry of a prompt of several images: visual BLOCKS with text between them.

A prompt may hold several visual blocks (multi-image questions; later a video's frames, one
block per frame with its timestamp as text between; Idefics3's tiles). Each block is one
image with its own `Geometry` (its parts and crops, geometry.py). The prompt's geometry is
those blocks laid end to end in ONE id space, each block's ids an offset into it:

    stream ids     [ block 0: 0..n0-1 | block 1: n0..n0+n1-1 | ... ]      (stream order)
    vision-only    [ block 0's cut cells | block 1's | ... ]               (from N = sum n)
    CLS, pooled    one per crop, crops numbered across blocks (block 0's crops first)

which is exactly what `Geometry` gives for the concatenated parts (crop indices offset by
the crops of earlier blocks), so every `per: crop | part` rule works unchanged across the
blocks. `per: image` runs a node once per block (`units("image")`): it sees that block's own
Geometry and ids, as on a one-image prompt; `per: prompt` runs it once over every block.
A prompt of one image is that image's Geometry itself (nothing here is used).
"""

from __future__ import annotations

import torch

from .geometry import Crop, Geometry, Part, Unit


class PromptGeometry(Geometry):
    """Several images' geometries in one id space (module docstring); `blocks[i]` is image i's."""

    unit_kinds = ("crop", "part", "image")

    def __init__(self, blocks: list[Geometry] | tuple[Geometry, ...]):
        if len(blocks) < 2:
            raise ValueError("a PromptGeometry holds two or more images; one image is its own Geometry")
        parts: list[Part] = []
        stream, crops = 0, 0
        self.stream_offsets: list[int] = []
        self.crop_offsets: list[int] = []
        for g in blocks:
            self.stream_offsets.append(stream)
            self.crop_offsets.append(crops)
            for p in g.parts:
                moved = tuple(Crop(c.index + crops, c.shape, c.at) for c in p.crops)
                parts.append(Part(p.kind, p.offset + stream, p.shape, p.row_stride, moved, p.cut))
            stream += g.n_tokens
            crops += len(g.crops)
        super().__init__(image_start=blocks[0].image_start, parts=parts)
        self.blocks = tuple(blocks)
        self._views = [(f"image {i + 1} {label}", self.block_ids(i)[torch.tensor(ids, dtype=torch.long)])
                       for i, g in enumerate(blocks) for label, ids in g.views()]

    def describe(self) -> str:
        return " | ".join(f"image {i + 1}: {g.describe()}" for i, g in enumerate(self.blocks))

    def block_ids(self, i: int) -> torch.Tensor:
        """Prompt id of every id of block i's own id space (stream, vision-only, CLS and pooled
        ids of its crops, in that order), indexed by the block's id."""
        key = ("block_ids", i)
        if key in self._units:
            return self._units[key]
        g = self.blocks[i]
        n, vo, c = g.n_tokens, g.vision_only, len(g.crops)
        N, VO, C = self.n_tokens, self.vision_only, len(self.crops)
        vo_before = sum(b.vision_only for b in self.blocks[:i])
        out = torch.cat([self.stream_offsets[i] + torch.arange(n, device="cpu"),
                         N + vo_before + torch.arange(vo, device="cpu"),
                         N + VO + self.crop_offsets[i] + torch.arange(c, device="cpu"),
                         N + VO + C + self.crop_offsets[i] + torch.arange(c, device="cpu")])
        self._units[key] = out
        return out

    def block_table(self) -> torch.Tensor:
        """(id_space,) the block holding each prompt id (on the CPU; layout bookkeeping is host-side)."""
        if "block_table" not in self._units:
            table = torch.zeros(self.id_space, dtype=torch.long, device="cpu")
            for i in range(len(self.blocks)):
                table[self.block_ids(i)] = i
            self._units["block_table"] = table
        return self._units["block_table"]

    def image_local(self, ids: torch.Tensor) -> torch.Tensor:
        starts = torch.tensor(self.stream_offsets, dtype=ids.dtype, device=ids.device)
        block = torch.bucketize(ids, starts[1:], right=True)
        return ids - starts[block]

    def block_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The block of each prompt id (host ids)."""
        return self.block_table()[ids.long().clamp(0, self.id_space - 1)]

    def units(self, per: str) -> list[Unit]:
        if per != "image":
            return super().units(per)
        if per in self._units:
            return self._units[per]
        out = []
        for i, g in enumerate(self.blocks):
            one = len(g.crops) == 1
            crop = self.crop_offsets[i] if one else None
            out.append(Unit("image", i, (1, g.n_tokens), self.block_ids(i), crop,
                            self.cls_id(crop) if crop is not None else None,
                            self.pooled_id(crop) if crop is not None else None, self.id_space,
                            geometry=g, shared={"tables": self.unit_tables, "row": i}))
        self._units[per] = out
        return out


def prompt_geometry(blocks: list[Geometry]) -> Geometry:
    """The geometry of a prompt's images: one image's own Geometry, several composed."""
    return blocks[0] if len(blocks) == 1 else PromptGeometry(blocks)
