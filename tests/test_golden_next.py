"""VisionZip on LLaVA-NeXT (AnyRes) against the official multi-crop path, node by node and
end to end (golden files visionzip_next_b{160,320,640}; /work/shared/golden/README.md).

The shipped pipelines/visionzip.yaml runs unedited on the golden geometry (640x480 image ->
2x2 tiles -> base crop + 4 tile crops of 24x24, the tile canvas cut to rows 6..41 by unpad,
a newline slot per canvas row: 2340 stream tokens) with the per-crop inputs fed as the signals
of each crop. Per crop, the dominant top-k (in topk order) and the crop's output rows; then
the stitched block (base crop, tile dominants in canvas raster order including cells the
stock model unpads away, tile CLS rows, tile contextual rows; no newline rows) against the
official block to 1e-5, its ids against the recorded provenance, and PERC positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nuwa_graph.executor import Executor
from nuwa_graph.family_geometries import anyres_geometry
from nuwa_graph.part_views import CropSignals
from nuwa_graph.pipeline import load
from tests.test_golden_vision import TOL, golden, multihead_keys

PIPES = Path(__file__).resolve().parents[1] / "pipelines"
NEXT_7B = {"crops": 5, "crop_tokens": 576, "visual_tokens": 2928, "grid_tokens": 576}


def next_geometry(t: dict) -> object:
    w, h = (int(x) for x in t["image_size"])
    gw, gh = (int(x) for x in t["expected_grid_shape"])
    return anyres_geometry((24, 24), (gh, gw), (h, w), image_start=35)


def crop_signals(t: dict, budget: int) -> dict[str, CropSignals]:
    n = t["hidden"].shape[0]
    return {
        "vision.cls_attention": CropSignals([t["attn_cls"][c, :, 1:] for c in range(n)]),
        "vision.hidden": CropSignals([t["hidden"][c, 1:] for c in range(n)]),
        "vision.cls_hidden": CropSignals([t["hidden"][c, 0] for c in range(n)]),
        "vision.keys": CropSignals([multihead_keys(t["metric"][c], budget + c) for c in range(n)]),
    }


def run_next(pipeline: str, budget: int, t: dict):
    ex = Executor(load(PIPES / pipeline, {"budget": budget}, NEXT_7B))
    sig = crop_signals(t, budget)
    geom = next_geometry(t)
    state = ex.run_all([geom], signals={r.key: [sig[r.kind]] for r in ex.requests()})
    return state, geom


@pytest.mark.parametrize("budget", [160, 320, 640])
def test_visionzip_next_per_crop_and_stitched(budget):
    t, meta = golden(f"visionzip_next_b{budget}")
    params = json.loads(meta["params"])
    state, geom = run_next("visionzip.yaml", budget, t)
    assert geom.n_tokens == params["vanilla_llava_next_visual_tokens"] == 2340
    k = params["dominant_num_topk"]
    # node by node: the dominant top-k of each crop, in topk order, as block ids
    dominant = state.values[("dominant", "selection")][0].ids
    assert dominant.numel() == 5 * k
    for c in range(5):
        want = geom.crop_ids(c)[t["expected_all_indices"][c, 1:] - 1]
        assert torch.equal(dominant[c * k:(c + 1) * k], want), f"crop {c}"
    # each crop's tower output: [CLS, dominant ascending, contextual in target order]
    zipped = state.values[("zip", "tokens")][0]
    per = params["per_crop_tokens"]
    assert zipped.values.shape[0] == 5 * per
    for c in range(5):
        rows = zipped.values[c * per:(c + 1) * per]
        assert (rows - t["expected_crop_tokens"][c]).abs().max().item() <= TOL, f"crop {c}"
        ids = zipped.ids[c * per:(c + 1) * per]
        assert int(ids[0]) == geom.cls_id(c)
        assert torch.equal(ids[1:k + 1], geom.crop_ids(c)[t["derived_dominant_token_ids_sorted"][c] - 1])
        assert torch.equal(ids[k + 1:], geom.crop_ids(c)[t["derived_contextual_target_token_ids"][c] - 1])
    # end to end: the block the applier hands the LLM
    (keep,) = state.actions[0]
    assert keep.site == "vision" and keep.tokens.space == "vision"
    assert keep.ids.numel() == budget == params["total_visual_tokens"]
    assert (keep.tokens.values - t["expected_tokens"]).abs().max().item() <= TOL
    src = t["derived_row_source"]  # (crop, kind, token id, canvas row, col)
    want_ids = torch.tensor([geom.cls_id(int(c)) if int(kind) == 0 else int(geom.crop_ids(int(c))[int(tok) - 1])
                             for c, kind, tok, _, _ in src.tolist()])
    assert torch.equal(keep.ids, want_ids)
    assert not torch.isin(keep.ids, geom.newline_ids()).any()  # no newline rows
    # tile dominants the stock model would unpad away are kept (vision-only ids past the stream)
    cut = (keep.ids >= geom.n_tokens) & (keep.ids < geom.n_tokens + geom.vision_only)
    n_cut = int((cut & (src[:, 1] == 1) & (src[:, 0] > 0)).sum())
    assert n_cut == params["dominant_tile_tokens_in_padding"]
    assert keep.positions.policy == "perc" and torch.equal(keep.positions.offsets, torch.arange(budget))


def test_visionzip_next_counts_follow_the_crops():
    """The official count is (1 + tiles) x per-crop tokens: a 1x2 image gets 3 crops x 64."""
    t, _ = golden("visionzip_next_b320")
    geom = anyres_geometry((24, 24), (1, 2), (336, 672), image_start=35)
    sig = crop_signals(t, 320)
    sig = {k: CropSignals(v[:3]) for k, v in sig.items()}
    ex = Executor(load(PIPES / "visionzip.yaml", {"budget": 320}, NEXT_7B))
    state = ex.run_all([geom], signals={r.key: [sig[r.kind]] for r in ex.requests()})
    (keep,) = state.actions[0]
    assert keep.ids.numel() == 3 * 64
