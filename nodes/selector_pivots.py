"""Pivot-conditioned dissimilarity: keep the tokens least similar to a few pivot tokens
(DART, EMNLP'25, arXiv 2502.11494; ZichenWen1/DART @ 5a19452f,
llava/model/language_model/modeling_llama_self.py:397-449 `get_retained_image_token`, and the
same function in Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py:1553-1597).

The pivots are chosen elsewhere (any selector over any scores; DART: top key L1 norms at layer
K-1, image and text tokens); this node visits them one by one and, for each, picks the
`per_pivot` candidates with the most NEGATIVE cosine to it (least similar, not smallest
|cos|), which leave the pool of the next pivot. Output: the pivots among the candidates plus
every pick. The cosines come from one product of unit rows by default (`similarity`), or from
the official per-pivot `cosine_similarity` calls.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import TEXT_ID_BASE, Selection, Tokens

from .selector_diversity import unit_rows


class PivotParams(NodeParams):
    per_pivot: int | None = Field(None, ge=0, description="tokens picked per pivot (DART's TOKEN_TOPK; give "
                                  "per_pivot or keep_ratio)")
    keep_ratio: float | None = Field(None, gt=0, le=1, description="per pivot int(n * keep_ratio / pivots) of the n "
                                     "candidates (DART's Qwen2.5-VL code: n_img * (1 - reduction_ratio) / (p + q))")
    visit: Literal["set", "given"] = Field(
        "set", description="set: the iteration order of a Python set of the pivots' sequence positions, "
        "list(set(image + text)), as the official loop (CPython hash order; it changes the result because each "
        "pivot's picks leave the pool of the next); given: image pivots, then the extra ones, in their input order")
    order: Literal["index", "pick"] = Field("index", description="index: ascending ids (what the LLM receives); "
                                            "pick: pivots, then the picks in visiting order")
    similarity: Literal["matmul", "cosine-similarity"] = Field(
        "matmul", description="matmul: the candidates' unit rows times the pivots' (one product; the same cosines up "
        "to float rounding, about 3e-7, and the same picks on the golden files); cosine-similarity: "
        "torch.nn.functional.cosine_similarity per pivot as the official loop, bit for bit (about 20x slower on a CPU)")

    @model_validator(mode="after")
    def _one(self):
        if (self.per_pivot is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of 'per_pivot' or 'keep_ratio'")
        return self


def visiting_order(positions: list[int], visit: str) -> list[int]:
    """Indices into `positions` in the order the official loop visits them."""
    first: dict[int, int] = {}
    for i, p in enumerate(positions):
        first.setdefault(p, i)
    # "set": CPython's own set order, as `list(set(image_indices + query_indices))` there
    return [first[p] for p in (list(set(positions)) if visit == "set" else list(first))]


def pivot_picks(features: torch.Tensor, pivot_rows: list[torch.Tensor], positions: list[int], pool: torch.Tensor,
                per: int, visit: str, similarity: str = "cosine-similarity") -> tuple[list[int], list[torch.Tensor]]:
    """(visiting order, picks of each visited pivot in topk order) of the official loop: for
    each pivot, `per` rows of the pool (bool mask over the candidate rows, updated in place)
    with the most negative cosine to the pivot's row, taken from the pool in ascending order.
    The cosine is computed against every candidate row and the pool's values taken from it (a
    row's cosine does not depend on the other rows: bit for bit the official values on the
    pool, checked on the golden files), which saves gathering the pool's rows per pivot."""
    order = visiting_order(positions, visit)
    picks: list[torch.Tensor] = []
    neg = None
    if similarity == "matmul" and pivot_rows:  # every pivot's cosines in one product
        neg = -(unit_rows(torch.stack(pivot_rows).float()) @ unit_rows(features.float()).t())
    for i in order:
        where = torch.nonzero(pool).reshape(-1)  # the pool in ascending stream order
        if where.numel() == 0 or per == 0:
            break
        if neg is not None:
            cos = neg[i][where]
        else:
            cos = -torch.nn.functional.cosine_similarity(pivot_rows[i], features, dim=-1)[where]
        chosen = where[cos.topk(min(per, int(where.numel()))).indices]
        picks.append(chosen)
        pool[chosen] = False
    return order, picks


@register
class PivotDissimilarity(Node[PivotParams]):
    """Keep pivot tokens and, for each pivot in turn, the candidates least similar to it
    (most negative cosine, `torch.nn.functional.cosine_similarity`, then `topk` over the pool
    in ascending stream order, as the official code). Pivots outside the candidates (DART's
    text pivots) condition the picks but are not kept."""

    type_name = "selector.pivot-dissimilarity"
    paper = "https://arxiv.org/abs/2502.11494"
    outputs = {"selection": Port(Selection, "the pivots among the candidates and every pick")}

    def run(self, ctx,
            features: Annotated[Tokens, "one row per candidate token, in stream order (DART: layer K-1's output "
                                "through the final norm, signal.llm-hidden {norm: final})"],
            pivots: Annotated[Selection, "pivots among the candidates (DART: top-4 key L1 norms)"],
            extra_pivots: Annotated[Selection | None, "pivots outside the candidates, e.g. text tokens (DART's "
                                    "text pivots)"] = None,
            extra_features: Annotated[Tokens | None, "feature rows of the extra pivots (same space)"] = None):
        p = self.params
        ids = features.ids
        n = int(ids.numel())
        index = {int(t): i for i, t in enumerate(ids.tolist())}
        piv = [int(t) for t in pivots.ids.tolist()]
        missing = [t for t in piv if t not in index]
        if missing:
            raise ValueError(f"pivots {missing[:5]} are not among the candidate features")
        rows = [features.values[index[t]] for t in piv]
        # sequence positions (official: indices into the current hidden states): candidates in
        # stream order from the image start, text tokens after the image block
        s = ctx.geometry.image_start
        positions = [s + index[t] for t in piv]
        if extra_pivots is not None:
            if extra_features is None:
                raise ValueError("extra_pivots need extra_features (their feature rows)")
            extra_index = {int(t): i for i, t in enumerate(extra_features.ids.tolist())}
            for t in extra_pivots.ids.tolist():
                if int(t) not in extra_index:
                    raise ValueError(f"extra pivot {t} has no row in extra_features")
                rows.append(extra_features.values[extra_index[int(t)]])
                positions.append(s + n + int(t) - TEXT_ID_BASE if int(t) < TEXT_ID_BASE // 2 else s + index.get(int(t), n))
        n_piv = len(positions)
        per = p.per_pivot if p.per_pivot is not None else int(n * p.keep_ratio / max(1, n_piv))  # type: ignore[operator]
        pool = torch.ones(n, dtype=torch.bool, device=ids.device)
        if piv:
            pool[torch.tensor([index[t] for t in piv], device=ids.device)] = False
        _, picks = pivot_picks(features.values, rows, positions, pool, per, p.visit, p.similarity)
        kept_rows = torch.cat([torch.tensor([index[t] for t in piv], dtype=torch.long, device=ids.device), *picks])
        out = ids[kept_rows]
        if p.order == "index":
            out = torch.sort(out).values
        return {"selection": Selection(out)}
