"""A geometry made of parts (nuwa_graph/geometry.py) and nodes run per crop or part
(nuwa_graph/part_views.py), model-free: spatial nodes work inside a part and refuse a part
that is not a grid (never a silent 1-D meaning), newline policies, per-crop budgets, ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph.errors import PipelineError, RunError
from nuwa_graph.executor import Executor
from nuwa_graph.family_geometries import anyres_geometry, flat_geometry, tiled_geometry
from nuwa_graph.geometry import CLS_ID, GeometryError
from nuwa_graph.part_views import CropSignals
from nuwa_graph.pipeline import load, load_text

PIPES = Path(__file__).resolve().parents[1] / "pipelines"


def test_one_grid_is_unchanged():
    from nuwa_graph.types import Geometry

    g = Geometry((24, 24), 35)
    assert g.simple and g.grid == (24, 24) and g.n_tokens == 576 and g.cls_id(0) == CLS_ID
    assert g == Geometry((24, 24), 35)


def test_anyres_ids_follow_the_stock_packing():
    """Base crop first, then unpadded canvas rows each followed by a newline slot."""
    g = anyres_geometry((4, 4), (2, 2), (60, 120), image_start=3)  # wide: canvas 8x8 -> rows 2..5
    assert g.describe() == "grid 4x4, tiles 4x8 (4 crops), newline 4x1"
    assert g.n_tokens == 16 + 4 * 9
    assert g.newline_ids().tolist() == [16 + 8, 16 + 17, 16 + 26, 16 + 35]
    # tile 1 (top-left): canvas rows 0..3, only rows 2, 3 are in the stream
    ids = g.crop_ids(1).reshape(4, 4)
    assert (ids[:2] >= g.n_tokens).all()
    assert ids[2].tolist() == [16, 17, 18, 19] and ids[3].tolist() == [25, 26, 27, 28]
    crop, row, col = g.locate(torch.tensor([16, 24, 29]))
    assert crop.tolist() == [1, -1, 2] and row.tolist() == [2, -1, 3] and col.tolist() == [0, -1, 4]
    with pytest.raises(GeometryError, match="made of parts"):
        _ = g.grid


def downsample(k: int, per: str | None = None):
    text = (PIPES / "downsample.yaml").read_text()
    if per:
        text = text.replace("    type: selector.uniform-count\n", f"    type: selector.uniform-count\n    per: {per}\n")
    return Executor(load_text(text, "downsample", {"budget": k}))


def test_spatial_nodes_run_per_part():
    g = anyres_geometry((4, 4), (2, 2), (60, 120))
    state = downsample(4).run_all([g])  # k = 4 per part
    (keep,) = state.actions[0]
    base = keep.ids[keep.ids < 16]
    assert base.tolist() == [5, 7, 13, 15]  # the 4x4 grid's [1::2, 1::2]
    tiles = keep.ids[keep.ids >= 16]
    assert tiles.numel() == 4 and not torch.isin(tiles, g.newline_ids()).any()
    assert ((tiles - 16) // 9).tolist() == [2, 2, 2, 2]  # 4 of the stitched 4x8 grid: its middle row,
    assert ((tiles - 16) % 9).tolist() == [1, 3, 5, 7]  # spread over its columns


def test_spatial_node_on_a_flat_sequence_is_refused():
    with pytest.raises(RunError, match="'grid'.*per part.*no spatial part"):
        downsample(64).run_all([flat_geometry(50)])


def test_spatial_node_per_image_on_parts_is_refused():
    with pytest.raises(RunError, match="'grid'.*made of parts"):
        downsample(64, per="image").run_all([anyres_geometry((4, 4), (2, 2), (60, 120))])


def test_applier_per_crop_is_refused_at_load():
    text = (PIPES / "downsample.yaml").read_text().replace("    type: applier.keep\n",
                                                          "    type: applier.keep\n    per: crop\n")
    with pytest.raises(PipelineError, match="per: crop is not allowed"):
        load_text(text, "x")


def test_vision_signal_image_wise_on_crops_is_refused():
    text = (PIPES / "visionzip.yaml").read_text().replace(
        "    type: scorer.cls-attention\n", "    type: scorer.cls-attention\n    per: image\n")
    ex = Executor(load_text(text, "x", model_vars={"crops": 5, "crop_tokens": 576}))
    g = anyres_geometry((4, 4), (2, 2), (60, 120))
    gen = torch.Generator().manual_seed(0)
    sig = {"vision.cls_attention": CropSignals([torch.rand(2, 16, generator=gen) for _ in range(5)])}
    with pytest.raises(RunError, match="gives per crop.*per: crop"):
        ex.run_all([g], signals={r.key: [sig[r.kind]] for r in ex.requests() if r.kind in sig})


FASTV = """
name: fastv-newlines
variables: {k: 6, nl: compete}
nodes:
  - {name: s, type: scorer.external, params: {name: s}}
  - {name: top, type: selector.top-k, per: "${per}", params: {k: "${k}", order: index}, inputs: {scores: s.scores}}
  - {name: keep, type: applier.keep, params: {site: llm.2, newlines: "${nl}"}, inputs: {selection: top.selection}}
"""


def run_newlines(nl: str, per: str = "image", k: int = 6):
    pipe = load_text(FASTV.replace('per: "${per}"', f"per: {per}"), "x", {"k": k, "nl": nl})
    g = anyres_geometry((2, 2), (2, 2), None)  # 4 base + 4x4 tiles with newlines = 4 + 4 * 5 = 24
    s = torch.zeros(g.n_tokens)
    s[g.newline_ids()] = 10.0  # newline slots score highest
    s[[0, 1]] = 5.0
    return Executor(pipe).run_all([g], {"external(name=s)": s}).actions[0][0], g


def test_newline_policies():
    compete, g = run_newlines("compete")
    nl = g.newline_ids()
    assert torch.isin(nl, compete.ids).all() and compete.ids.numel() == 6  # they competed and won
    drop, _ = run_newlines("drop")
    assert not torch.isin(drop.ids, nl).any() and drop.ids.numel() == 2
    # keep: pinned outside the budget; here the top-k ran per crop (newlines never compete)
    keep, _ = run_newlines("keep", per="crop", k=2)
    assert torch.isin(nl, keep.ids).all()
    assert keep.ids.numel() == 5 * 2 + nl.numel()
    assert torch.equal(keep.ids, torch.sort(keep.ids).values)


def test_budget_per_crop_resolves_per_model():
    """One file, three counting conventions: LLaVA-1.5 64 of 576, LLaVA-NeXT 320 over 5 crops."""
    p15 = load(PIPES / "visionzip.yaml", {"budget": 64})
    assert p15.nodes["zip"].params.contextual + p15.nodes["dominant"].params.k + 1 == 64
    pn = load(PIPES / "visionzip.yaml", {"budget": 320}, {"crops": 5, "crop_tokens": 576})
    assert pn.nodes["dominant"].params.k == 53 and pn.nodes["zip"].params.contextual == 10
    assert pn.nodes["dominant"].per == "crop"


def test_tiles_then_thumbnail():
    g = tiled_geometry((2, 2), 3, thumbnail=True)
    assert [p.kind for p in g.parts] == ["tile", "tile", "tile", "thumbnail"]
    assert g.n_tokens == 16 and len(g.units("part")) == 4 and len(g.units("crop")) == 4
    assert g.cls_id(3) != g.cls_id(0) and g.cls_id(0) >= g.n_tokens
    assert tiled_geometry((2, 2), 1, thumbnail=False).simple


def test_views_cover_the_picture_for_kept_token_pictures(tmp_path):
    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.apps.viz import draw_kept

    g = anyres_geometry((2, 2), (1, 2), None)
    assert g.views() == [("base", [[0, 1], [2, 3]]), ("tiles", [[4, 5, 6, 7], [9, 10, 11, 12]])]
    t = tiled_geometry((2, 2), 2, thumbnail=True, layout=(1, 2))
    assert t.views() == [("tiles", [[0, 1, 4, 5], [2, 3, 6, 7]]), ("thumbnail", [[8, 9], [10, 11]])]
    path = draw_kept(synthetic_image(64), {"vision": [0, 5, 8, 13]}, None, tmp_path / "k.png", views=g.views())
    assert path.stat().st_size > 0
