"""docs/authoring.md, checked: YAML-only variants and a node from an outside package."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nuwa_graph import load, load_text, registry
from nuwa_graph.simulate import LLAVA_15, simulate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "nuwa_graph_diversity"


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_visionzip_with_regions_keeps_budget_and_spreads_over_regions(budget):
    p = load(ROOT / "pipelines/variants/visionzip_regions.yaml", {"budget": budget})
    state, counts = simulate(p, LLAVA_15)
    assert counts == [budget] * LLAVA_15.n_layers
    dominant = state.values[("dominant", "selection")][0].ids
    regions = state.values[("cells", "regions")][0].region
    per_region = torch.bincount(regions[dominant], minlength=144)
    n = 1 if budget <= 128 else 2
    assert int(per_region.max()) <= n  # the region constraint holds for the dominant set


def test_visionzip_with_regions_differs_from_visionzip():
    a, _ = simulate(load(ROOT / "pipelines/variants/visionzip_regions.yaml"), LLAVA_15, seed=3)
    b, _ = simulate(load(ROOT / "pipelines/visionzip.yaml"), LLAVA_15, seed=3)
    assert not torch.equal(a.actions[0][0].ids, b.actions[0][0].ids)


def test_fastv_fix_is_fastv_with_rpme_positions():
    fix, _ = simulate(load(ROOT / "pipelines/fastv_fix.yaml"), LLAVA_15, seed=1)
    plain, _ = simulate(load(ROOT / "pipelines/fastv.yaml"), LLAVA_15, seed=1)
    (a,), (b,) = fix.actions[0], plain.actions[0]
    assert torch.equal(a.ids, b.ids)  # same tokens kept
    assert b.positions is None or b.positions.policy == "pesp"
    ids = torch.sort(a.ids).values
    assert a.positions.policy == "rpme" and int(a.positions.offsets.max()) == LLAVA_15.n_visual - 1
    assert int(a.positions.offsets[torch.argsort(a.ids)][0]) == 0 and len(ids) == 64


def test_variants_run_on_a_real_model(tiny_llava, tiny_image):
    p = load(ROOT / "pipelines/variants/visionzip_regions.yaml", {"budget": 144, "positions": "rpme"})
    rep = tiny_llava.generate(p, [tiny_image], ["what is here?"], max_new_tokens=2)
    assert rep.visual_tokens_per_layer[0] == [16] * tiny_llava.n_layers


@pytest.fixture
def diversity_package(tmp_path, monkeypatch):
    """The example outside package, made visible as an installed distribution."""
    registry.ensure_loaded()
    info = tmp_path / "nuwa_graph_diversity-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nuwa-graph-diversity\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [nuwa_graph.nodes]
        diversity = nuwa_graph_diversity.nodes
        """))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_load_errors", [])
    monkeypatch.setattr(registry, "_loaded", False)
    yield
    for mod in [m for m in sys.modules if m.startswith("nuwa_graph_diversity")]:
        sys.modules.pop(mod)


def test_outside_package_node_registers_and_runs(diversity_package):
    assert "selector.max-min-diversity" in registry.all_types()
    assert not registry.load_errors()
    p = load(EXAMPLE / "divprune.yaml")
    state, counts = simulate(p, LLAVA_15)
    kept = state.actions[0][0].ids
    assert counts == [64] * LLAVA_15.n_layers and len(torch.unique(kept)) == 64
    # max-min diversity: the kept features are farther apart than a top-k of the same size
    feats = torch.nn.functional.normalize(state.values[("features", "tokens")][0].values, dim=-1)

    def min_pair_distance(ids):
        x = feats[ids]
        d = 1 - x @ x.T + torch.eye(len(ids)) * 9
        return float(d.min())

    assert min_pair_distance(kept) > min_pair_distance(torch.arange(64))


def test_outside_node_params_are_validated(diversity_package):
    with pytest.raises(Exception, match="greater than or equal to 1"):
        load_text(textwrap.dedent("""
            name: bad
            nodes:
              - {name: f, type: signal.vision-hidden, params: {layer: -2}}
              - {name: d, type: selector.max-min-diversity, params: {k: 0}, inputs: {features: f.tokens}}
            """))
