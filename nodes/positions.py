"""Position re-encoders: which position ids the kept visual tokens get (Nüwa Sec. 2.3).

- PESP (sparse preservation): each kept token keeps its original id, gaps included; text
  after the image keeps its unpruned ids (FastV, FEATHER, SparseVLM v2, Nüwa).
- PERC (range compression): fresh contiguous ids; text follows the last kept token
  (VisionZip, PruMerge+, PDrop, SparseVLM v1.5: what dropping tokens does by default).
- RPME (relative position mapping extension, Nüwa Algorithm 3): with I the sorted
  original indices and the full image range [s, e], new[0] = s and
  new[j] = ceil(I[j] * (e - s) / I[k-1]) + s: the kept set is stretched over the range.
Merged tokens use their anchor's index; a kept CLS token (id -1) counts as index 0.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.positions import rpme_offsets
from nuwa_graph.registry import register
from nuwa_graph.types import PositionPlan, Selection


def plan_positions(ids: torch.Tensor, policy: str, n_image: int) -> PositionPlan:
    """Offsets, in the order of `ids`, for a policy over an image of n_image tokens."""
    index = ids.clamp(min=0)
    if policy == "pesp":
        return PositionPlan(ids, index.clone(), "pesp", "original")
    if policy == "perc":
        return PositionPlan(ids, torch.arange(ids.numel(), device=ids.device), "perc", "compact")
    if policy == "rpme":
        order = torch.argsort(index, stable=True)
        offs = torch.empty_like(index)
        offs[order] = rpme_offsets(index[order], n_image - 1)
        return PositionPlan(ids, offs, "rpme", "original")
    raise ValueError(f"unknown position policy {policy!r}; valid: pesp, perc, rpme")


class ReencodeParams(NodeParams):
    policy: Literal["pesp", "perc", "rpme"] = Field(description="pesp: original ids; perc: contiguous; rpme: stretched")


@register
class PositionReencoder(Node[ReencodeParams]):
    """Choose position ids for a kept set (PESP, PERC or RPME)."""

    type_name = "position-reencoder.policy"
    paper = "https://arxiv.org/abs/2602.02951"
    outputs = {"positions": Port(PositionPlan)}

    def check_model(self, model_vars, sources):
        if self.params.policy == "perc" or model_vars.get("crops", 1) <= 1:
            return None
        if any(p.off_stream for p in sources.get("selection", [])):
            return (f"policy {self.params.policy!r} places each token by its id, but on this model's images of "
                    f"several crops the selection holds tokens with no stream position (each crop's CLS row, cells "
                    f"the stock model cuts away); use policy perc (as VisionZip's official LLaVA-NeXT path)")
        return None

    def run(self, ctx, selection: Annotated[Selection, "the kept tokens, in sequence order"]):
        n = ctx.geometry.n_tokens
        if self.params.policy != "perc" and bool((selection.ids >= n).any()):
            # a tiled image: a crop's CLS or a cell the stock model cuts away has no stream position
            raise ValueError(f"policy {self.params.policy!r} gives each token a position from its id, but "
                             f"{int((selection.ids >= n).sum())} kept tokens have no place in the {n}-token stream (a "
                             f"crop's CLS, cells cut away by unpad); hint: use policy perc (as VisionZip's official "
                             f"LLaVA-NeXT path), or keep stream tokens only")
        return {"positions": plan_positions(selection.ids, self.params.policy, n)}
