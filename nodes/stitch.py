"""Putting the per-crop outputs of a tiled image back into one block, in a method's order.

A vision-space method run per crop (`per: crop`) hands on its rows crop by crop (crop 0 =
LLaVA-NeXT's base image, then the tiles). Official codes order them differently:

- `crops`: as they come, crop by crop (InternVL-style concatenation; on a one-crop image
  every order is this one);
- `visionzip-anyres`: VisionZip's official LLaVA-NeXT path (dvlab-research/VisionZip @
  3151f6df, `restore_image_features_sorted` and the multi-crop branch of
  `prepare_inputs_labels_for_multimodal_visionzip`): the base crop's rows as they are, then
  the tiles' dominant tokens read in raster order of the stitched tile canvas (a canvas row
  runs through every tile of its tile row; no unpadding, so cells the stock model would cut
  away stay), then the tiles' CLS rows in tile order, then the tiles' other (contextual)
  rows, tile by tile in the order given. No newline rows.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Selection, Tokens


class StitchParams(NodeParams):
    order: Literal["crops", "visionzip-anyres"] = Field(
        "crops", description="crops: crop by crop as given; visionzip-anyres: VisionZip's official LLaVA-NeXT order "
        "(base crop, tile dominants in canvas raster order, tile CLS rows, tile contextual rows)")


@register
class StitchCrops(Node[StitchParams]):
    """Order the rows a per-crop method made into the block the LLM receives."""

    type_name = "merger.stitch-crops"
    paper = "https://arxiv.org/abs/2412.04467"
    outputs = {
        "tokens": Port(Tokens, "the same rows in the block's order", off_stream=True),
        "selection": Port(Selection, "their ids in that order", off_stream=True),
    }

    def run(self, ctx,
            tokens: Annotated[Tokens, "rows made per crop (block ids, crop by crop)"],
            dominant: Annotated[Selection | None, "the tokens kept as themselves (visionzip-anyres: the dominant "
                                "set); the other rows of a tile are its contextual rows"] = None):
        geom = ctx.geometry
        if self.params.order == "crops" or geom.simple:
            return {"tokens": tokens, "selection": Selection(tokens.ids.clone())}
        if dominant is None:
            raise ValueError("order visionzip-anyres needs the 'dominant' selection")
        ids = tokens.ids
        crop, row, col = geom.locate(ids)
        cls_of = {geom.cls_id(c.index): c.index for _, c in geom.crops}
        cls_crop = torch.tensor([cls_of.get(int(i), -1) for i in ids.tolist()], dtype=torch.long, device=ids.device)
        crop = torch.where(cls_crop >= 0, cls_crop, crop)
        if bool((crop < 0).any()):
            bad = ids[crop < 0][:5].tolist()
            raise ValueError(f"rows {bad} belong to no crop of this image (newline slots or pooled tokens)")
        is_cls = cls_crop >= 0
        is_dom = torch.isin(ids, dominant.ids.to(ids.device)) & ~is_cls
        pos = torch.arange(ids.numel(), device=ids.device)
        base = pos[crop == 0]
        tile = crop > 0
        dom = pos[tile & is_dom]
        width = int(col.max()) + 1 if col.numel() else 1
        dom = dom[torch.argsort(row[dom] * width + col[dom], stable=True)]
        tile_cls = pos[tile & is_cls]
        tile_cls = tile_cls[torch.argsort(crop[tile_cls], stable=True)]
        rest = pos[tile & ~is_dom & ~is_cls]
        rest = rest[torch.argsort(crop[rest], stable=True)]
        order = torch.cat([base, dom, tile_cls, rest])
        out = Tokens(tokens.values[order], ids[order].clone(), tokens.space)
        return {"tokens": out, "selection": Selection(out.ids.clone())}
