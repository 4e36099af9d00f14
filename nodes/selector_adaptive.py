"""Adaptive selectors: the number kept follows from the scores (PruMerge / PruMerge+)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Scores, Selection


def outlier_ratio(values: torch.Tensor, whisker: float) -> float:
    """Fraction of values above Q3 + whisker * IQR, percentiles by linear interpolation on
    float32 (numpy, as PruMerge's `outlier_dectection`; torch in float64 without numpy)."""
    try:
        import numpy as np

        arr = values.detach().to(torch.float32).cpu().numpy().reshape(-1)
        q1 = np.percentile(arr, 25)
        q3 = np.percentile(arr, 75)
        upper = q3 + whisker * (q3 - q1)
        return int((arr > upper).sum()) / arr.size
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        v = values.detach().double().reshape(-1)
        q1, q3 = torch.quantile(v, 0.25), torch.quantile(v, 0.75)
        return int((v > q3 + whisker * (q3 - q1)).sum()) / v.numel()


class IqrParams(NodeParams):
    whisker: float = Field(1.5, gt=0, description="outliers: score > Q3 + whisker * IQR (PruMerge: 1.5)")
    supplement: Literal["none", "prumerge-plus"] = Field(
        "prumerge-plus", description="prumerge-plus: add raster indices arange(0, n - 1, int(int(1/ratio) / 3)) "
        "not already chosen (PruMerge+); none: outliers only (PruMerge)")


@register
class IqrOutliers(Node[IqrParams]):
    """Keep the top int(n * ratio) tokens, ratio = fraction of IQR outliers (PruMerge's
    adaptive ratio), in torch.topk order; PruMerge+ then appends a spatially uniform
    supplement in raster order.

    Where the official code crashes this raises a ValueError: no outlier (ratio 0, a
    division by zero there) or ratio > 1/3 with the supplement (a zero stride there; with
    IQR outliers, all above Q3, the ratio cannot exceed 1/4, so this is only a guard).
    Like the official `arange(0, 575, ...)`, the supplement stops before the last token.
    """

    type_name = "selector.iqr-outliers"
    paper = "https://arxiv.org/abs/2403.15388"
    outputs = {"selection": Port(Selection, "outliers in topk order, then the supplement ascending")}

    def run(self, ctx, scores: Annotated[Scores, "CLS attention per token (scorer.cls-attention-qk)"]):
        n = scores.values.numel()
        ratio = outlier_ratio(scores.values, self.params.whisker)
        k = int(n * ratio)
        if ratio == 0 or k == 0:
            raise ValueError(
                "PruMerge+: no score is an outlier (> Q3 + whisker*IQR), so the adaptive keep ratio is 0 "
                "(the official code divides by zero here); lower `whisker` or use a fixed count with selector.top-k")
        idx = torch.topk(scores.values, k).indices
        ids = scores.ids[idx]
        if self.params.supplement == "prumerge-plus":
            stride = int(int(1 / ratio) / 3)
            if stride <= 0:
                raise ValueError(
                    f"PruMerge+: outlier ratio {ratio:.3f} > 1/3 gives a zero stride for the spatial supplement "
                    "(the official arange fails here); use supplement: none or a fixed count with selector.top-k")
            grid = torch.arange(0, n - 1, stride, device="cpu")  # a small Python list, once per site
            chosen = set(idx.tolist())
            extra = torch.tensor([int(x) for x in grid.tolist() if x not in chosen], dtype=torch.long,
                                 device=scores.ids.device)
            ids = torch.cat([ids, scores.ids[extra]])
        return {"selection": Selection(ids)}
