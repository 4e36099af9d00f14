"""Model-free budget check of the vision-side pipelines: the Keep actions of each shipped
pipeline give the documented visual-token count at every LLM layer (LLaVA-1.5 geometry:
24x24 grid, 32 layers; Qwen2.5-VL: a 15x21 merged grid, 28 layers), with synthetic signals
of the right shapes. Nüwa also runs unedited on other grid sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph import registry
from nuwa_graph.executor import Executor, tokens_per_layer
from nuwa_graph.pipeline import load
from nuwa_graph.types import Geometry

PIPES = Path(__file__).resolve().parents[1] / "pipelines"


def synthetic_run(pipeline: Path, overrides: dict, grid=(24, 24), seed: int = 0, model_vars=None):
    """Run every site in order; signals are random tensors shaped as SIGNAL_KINDS says."""
    ex = Executor(load(pipeline, overrides, model_vars))
    geom = Geometry(tuple(grid), 35)
    state = ex.start([geom])
    n = geom.n_tokens
    g = torch.Generator().manual_seed(seed)

    def reader(req, sample):
        k = req.kind
        if k == "vision.cls_attention":
            return torch.softmax(torch.randn(16, n, generator=g) * 3, dim=-1)
        if k in ("vision.hidden", "vision.hidden_mean", "vision.merged_hidden_mean", "pre_llm.visual"):
            return torch.randn(n, 32, generator=g)
        if k == "vision.cls_hidden":
            return torch.randn(32, generator=g)
        if k == "vision.keys":
            return torch.randn(16, n + 1, 8, generator=g)
        if k == "vision.qk_single_head":  # peaky CLS attention, so that outliers exist
            qk = torch.randn(2, n + 1, 32, generator=g) * 0.1
            qk[0, 0] = 0
            qk[0, 0, 0] = 1.0
            logits = torch.randn(n, generator=g) * 5
            logits[torch.randperm(n, generator=g)[: n // 30]] += 40  # a few dominant tokens
            qk[1, 1:, 0] = logits
            return qk
        if k == "vision.attention_received":
            return torch.rand(n, generator=g)
        if k == "llm.attention":
            q = 3 if req.arg("queries", "last").startswith("last:") else 1
            return torch.softmax(torch.randn(32, q, state.present[sample].numel(), generator=g), dim=-1)
        raise AssertionError(f"no synthetic tensor for {req.kind}")

    for site in ex.sites():
        ex.run_site(state, site, reader)
    return state


def needs_llm_scorer():
    if "scorer.llm-attention" not in registry.all_types():
        pytest.skip("scorer.llm-attention (nodes/scorer_llm.py) is not available yet")


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("name", ["random", "downsample", "visionzip", "visionzip_fix"])
def test_single_stage_budget_is_tokens_entering_the_llm(name, budget):
    state = synthetic_run(PIPES / f"{name}.yaml", {"budget": budget})
    assert tokens_per_layer(state.actions[0], 576, 32) == [budget] * 32


def test_vanilla_keeps_everything():
    state = synthetic_run(PIPES / "vanilla.yaml", {})
    (keep,) = state.actions[0]
    assert torch.equal(keep.ids, torch.arange(576)) and torch.equal(keep.positions.offsets, torch.arange(576))
    assert tokens_per_layer(state.actions[0], 576, 32) == [576] * 32


def test_prumerge_plus_count_is_adaptive_and_reported():
    state = synthetic_run(PIPES / "prumerge_plus.yaml", {})
    (keep,) = state.actions[0]
    counts = tokens_per_layer(state.actions[0], 576, 32)
    assert counts == [keep.ids.numel()] * 32 and 1 < counts[0] < 576


NUWA = {64: (112, 16), 128: (224, 32), 192: (336, 48)}


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("name", ["nuwa.yaml", "ablations/nuwa_pillar_l2norm.yaml", "ablations/nuwa_no_region.yaml",
                                  "ablations/nuwa_no_pillar.yaml", "ablations/nuwa_random_stage2.yaml",
                                  "ablations/nuwa_distance.yaml", "ablations/nuwa_rpme.yaml"])
def test_nuwa_average_is_the_budget(name, budget):
    needs_llm_scorer()
    state = synthetic_run(PIPES / name, {"budget": budget})
    k1, k2 = NUWA[budget]
    counts = tokens_per_layer(state.actions[0], 576, 32)
    assert counts == [k1] * 16 + [k2] * 16
    assert sum(counts) / 32 == budget


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_nuwa_stage1_only(budget):
    state = synthetic_run(PIPES / "ablations" / "nuwa_stage1_only.yaml", {"budget": budget})
    assert tokens_per_layer(state.actions[0], 576, 32) == [NUWA[budget][0]] * 32


@pytest.mark.parametrize("distance", [0, 18, 148, 280, 412, 544, 676, 808, 940, 1058])
def test_nuwa_distance_sweep_runs(distance):
    needs_llm_scorer()
    state = synthetic_run(PIPES / "ablations" / "nuwa_distance.yaml", {"distance": distance})
    assert torch.isfinite(state.actions[0][0].tokens.values).all()


@pytest.mark.parametrize("grid", [(16, 16), (27, 27), (13, 19), (32, 32)])
def test_nuwa_runs_on_other_grids_unedited(grid):
    """Other grids (and, through llm_layers / vision_layers, other depths) need no edit."""
    needs_llm_scorer()
    state = synthetic_run(PIPES / "nuwa.yaml", {"budget": 64}, grid=grid)
    n = grid[0] * grid[1]
    stage1, stage2 = state.actions[0]
    k1 = min(round(n * 112 / 576), len(state.values[("candidates", "selection")][0]))
    assert stage1.ids.numel() == k1
    assert stage2.ids.numel() == int(k1 * (1 / 7))


@pytest.mark.parametrize("keep,s1,s2", [(25, 0.35, 0.42), (50, 0.6, 0.66), (75, 0.85, 0.7)])
def test_nuwa_qwen_average_percentage(keep, s1, s2):
    needs_llm_scorer()
    import math

    grid = (15, 21)
    n = 315
    state = synthetic_run(PIPES / "nuwa_qwen.yaml", {"keep": keep}, grid=grid,
                          model_vars={"llm_layers": 28, "vision_layers": 32})
    k1 = math.ceil(n * s1)
    k2 = int(k1 * s2)
    counts = tokens_per_layer(state.actions[0], n, 28)
    assert counts == [k1] * 15 + [k2] * 13
    assert abs(sum(counts) / 28 / n - keep / 100) < 0.02


def test_nuwa_follows_the_model_depth():
    needs_llm_scorer()
    state = synthetic_run(PIPES / "nuwa.yaml", {"budget": 64}, grid=(8, 8),
                          model_vars={"llm_layers": 4, "vision_layers": 4})
    assert [a.site for a in state.actions[0]] == ["vision", "llm.2"]
    ex = Executor(load(PIPES / "nuwa.yaml", {"budget": 64}, {"llm_layers": 4, "vision_layers": 4}))
    mean = [r for r in ex.requests() if r.kind == "vision.hidden_mean"][0]
    assert mean.args == (("start", 2), ("stop", 5))
