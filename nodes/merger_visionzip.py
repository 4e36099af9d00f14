"""VisionZip's contextual merge (CVPR'25; dvlab-research/VisionZip @ 3151f6df).

Given the dominant tokens (top CLS-attention patches), the output is
`[CLS] + dominant (ascending) + contextual`: the remaining patches, in ascending order,
are split into `contextual` targets taken uniformly by position in that list
(step = max(1, R // contextual)) and the rest, each of which joins the target whose
head-averaged key (L2-normalised) is most cosine-similar; contextual token j = hidden of
target j + mean of the hidden states that joined it. The model tensors arrive on ports from
signal nodes: the features (vision hidden states before the projector), the head-averaged keys
and the CLS row; the merger itself reads nothing from the model.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import CLS_ID, Selection, Tokens

from .signal_vision import grid_rows


class VisionZipParams(NodeParams):
    contextual: int = Field(ge=1, description="number of contextual (merged) tokens")


@register
class VisionZipMerger(Node[VisionZipParams]):
    """VisionZip: dominant tokens kept as they are, the rest merged into uniform contextual
    targets by key similarity."""

    type_name = "merger.visionzip"
    paper = "https://arxiv.org/abs/2412.04467"
    outputs = {
        "tokens": Port(Tokens, "CLS, dominant (ascending), contextual (target order); space vision"),
        "selection": Port(Selection, "ids of those tokens in the same order (CLS = -1, contextual = target id)"),
    }

    def run(self, ctx,
            dominant: Annotated[Selection, "the dominant patches (any order)"],
            features: Annotated[Tokens, "features kept and merged, whole grid (LLaVA: signal.vision-hidden, -2)"],
            keys: Annotated[Tokens, "similarity metric per patch, whole grid (signal.vision-key-mean, -2)"],
            cls: Annotated[Tokens | None, "the CLS token put first, as the official code does "
                           "(signal.vision-cls-hidden); absent = no CLS"] = None):
        p = self.params
        n = features.values.shape[0]
        hidden = grid_rows(features, n, "features")  # (n, d), no CLS
        metric = grid_rows(keys, n, "keys")  # (n, head_dim), head-averaged
        keep = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        keep[dominant.ids] = True
        dom_ids = torch.nonzero(keep).reshape(-1)  # ascending, as masked_select
        rest = torch.nonzero(~keep).reshape(-1)
        r = rest.numel()
        c = p.contextual
        if r < c:
            raise ValueError(f"VisionZip: only {r} tokens remain for {c} contextual tokens (the official code fails "
                             "here); lower `contextual` or the dominant count")
        m = metric[rest]
        m = m / m.norm(dim=-1, keepdim=True)
        step = max(1, r // c)
        target_pos = torch.arange(0, r, step, device=hidden.device)[:c]
        is_target = torch.zeros(r, dtype=torch.bool, device=hidden.device)
        is_target[target_pos] = True
        # (1, r - c, d) x (1, d, c) as the official bmm: near-equal similarities resolve alike
        sim = torch.bmm(m[~is_target][None], m[target_pos][None].transpose(1, 2))[0]
        assign = torch.zeros(sim.shape[0], c, dtype=hidden.dtype, device=hidden.device)
        if sim.shape[0]:
            assign.scatter_(1, sim.argmax(dim=1, keepdim=True), 1)  # first maximum, as argmax(dim=2) there
        counts = assign.sum(dim=0).clamp(min=1).unsqueeze(-1)
        h_rest = hidden[rest]
        contextual = h_rest[target_pos] + (assign.transpose(0, 1) @ h_rest[~is_target]) / counts
        parts = [hidden[dom_ids], contextual]
        ids = [dom_ids, rest[target_pos]]
        if cls is not None:
            parts.insert(0, cls.values.reshape(1, -1).to(hidden.dtype))
            ids.insert(0, torch.tensor([CLS_ID], device=hidden.device))
        ids_t = torch.cat(ids).long()
        return {"tokens": Tokens(torch.cat(parts), ids_t, "vision"), "selection": Selection(ids_t)}
