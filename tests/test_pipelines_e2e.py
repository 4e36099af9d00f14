"""Every shipped pipeline end to end on tiny LLaVA / tiny Qwen: SDPA, KV cache, schedules.

The tiny models have 64 (LLaVA, 8x8) visual tokens and 4 LLM layers. Budgets are LLaVA-1.5
counts scaled by grid_tokens / 576 (budget 144 -> 16 of 64 tokens); layer schedules are
scaled down with --set-style overrides; the files themselves are unedited.
For each run: the per-layer visual-token counts measured in the layer hooks equal the
schedule the pipeline's own Keep actions imply (and, for fixed budgets, the schedule a
model-free run on the same geometry gives), and cached decoding equals a cache-free
recompute of the same pruned sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph import load, tokens_per_layer
from nuwa_graph.context import Keep
from nuwa_graph.simulate import ModelGeometry, simulate

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "what colour is the square ?"
TINY_LLAVA = ModelGeometry("tiny-llava", (8, 8), 4, llm_heads=4, has_cls=True, image_start=0)

# pipeline -> (overrides for a 64-token, 4-layer model, fixed schedule?)
LLAVA_CASES = {
    "vanilla": ({}, True),
    "random": ({"budget": 144}, True),
    "downsample": ({"budget": 144}, True),
    "fastv": ({"budget": 144, "K": 2}, True),
    "fastv_fix": ({"budget": 144, "K": 2}, True),
    "pdrop": ({"budget": 64, "layers": [1, 2, 3]}, True),
    "sparsevlm": ({"budget": 64, "layers": [0, 1, 2]}, False),
    "sparsevlm_v2": ({"budget": 64, "layers": [0, 1, 2]}, False),
    "visionzip": ({"budget": 144}, True),
    "visionzip_fix": ({"budget": 144}, True),
    "prumerge_plus": ({}, False),
    "feather": ({"budget": 64, "K": [2, 3]}, False),  # union size depends on the scores
    "nuwa": ({"budget": 64}, True),
    "ablations/nuwa_no_region": ({"budget": 64}, True),
    "ablations/nuwa_no_pillar": ({"budget": 64}, True),
    "ablations/nuwa_random_stage2": ({"budget": 64}, True),
    "ablations/nuwa_distance": ({"budget": 64, "distance": 18}, True),
    "ablations/nuwa_pillar_l2norm": ({"budget": 64}, True),
    "ablations/nuwa_stage1_only": ({"budget": 64}, True),
    "ablations/nuwa_rpme": ({"budget": 64}, True),
    "variants/visionzip_regions": ({"budget": 144, "positions": "rpme"}, True),
}


def _expected_counts(rep, n_visual: int, n_layers: int) -> list[int]:
    acts = [Keep(a["site"], torch.zeros(a["kept"], dtype=torch.long)) for a in rep.actions[0]]
    return tokens_per_layer(acts, n_visual, n_layers)


def _check_cached_equals_recompute(adapter, pipe, image, T=3):
    rep = adapter.generate(pipe, [image], [PROMPT], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    cached = torch.stack(rep.step_logits)[:, 0]
    full, _ = adapter.forward_logits(pipe, [image], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (cached - full[0, -T:].float()).abs().max().item() <= 1e-5
    return rep


@pytest.mark.parametrize("name", list(LLAVA_CASES))
def test_pipeline_on_tiny_llava(tiny_llava, tiny_image, name):
    overrides, fixed = LLAVA_CASES[name]
    pipe = load(ROOT / "pipelines" / f"{name}.yaml", overrides)
    rep = _check_cached_equals_recompute(tiny_llava, pipe, tiny_image)
    counts = rep.visual_tokens_per_layer[0]
    assert counts == _expected_counts(rep, 64, tiny_llava.n_layers)
    assert rep.visual_tokens_avg[0] == pytest.approx(sum(counts) / len(counts))
    if fixed:
        _, simulated = simulate(pipe.bind_model(tiny_llava.model_variables()), TINY_LLAVA)
        assert counts == simulated
    if name != "vanilla":
        assert min(counts) < 64  # something was pruned


def test_fastv_schedule_on_tiny_llava(tiny_llava, tiny_image):
    rep = tiny_llava.generate(load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2}), [tiny_image], [PROMPT],
                              max_new_tokens=1)
    assert rep.visual_tokens_per_layer[0] == [64, 64, 16, 16]


@pytest.mark.parametrize("budget, kept", [(64, 7), (144, 16), (576, 64)])
def test_fixed_count_budgets_scale_with_the_grid(tiny_llava, tiny_image, budget, kept):
    """`budget` is a LLaVA-1.5 count (of 576): on the 8x8 grid it keeps budget * 64 // 576."""
    assert tiny_llava.model_variables()["grid_tokens"] == 64
    for name in ("random", "downsample", "visionzip"):
        rep = tiny_llava.generate(load(ROOT / f"pipelines/{name}.yaml", {"budget": budget}), [tiny_image], [PROMPT],
                                  max_new_tokens=1)
        assert rep.visual_tokens_per_layer[0] == [kept] * 4, name


def test_nuwa_average_on_tiny_llava_is_its_budget_fraction(tiny_llava, tiny_image):
    rep = tiny_llava.generate(load(ROOT / "pipelines/nuwa.yaml"), [tiny_image], [PROMPT], max_new_tokens=1)
    counts = rep.visual_tokens_per_layer[0]
    k1 = round(112 / 576 * 64)  # K1 is the same fraction of the grid as 112 of 576
    assert counts == [k1, k1, int(k1 / 7), int(k1 / 7)]


QWEN_CASES = {
    "vanilla": {},
    "random": {"budget": 16},
    "downsample": {"budget": 16},
    "fastv": {"budget": 16, "K": 2},
    "fastv_fix": {"budget": 16, "K": 2},
    "pdrop": {"budget": 64, "layers": [1, 2, 3]},
    "feather": {"budget": 64, "K": [2, 3]},
    "nuwa_qwen": {"keep": 50},
}


@pytest.fixture(scope="module")
def tiny_qwen():
    from nuwa_graph.adapters.qwen import tiny_qwen, tiny_qwen_image

    return tiny_qwen(), tiny_qwen_image((6, 8), seed=1)


@pytest.mark.parametrize("name", list(QWEN_CASES))
def test_pipeline_on_tiny_qwen(tiny_qwen, name):
    adapter, image = tiny_qwen
    pipe = load(ROOT / "pipelines" / f"{name}.yaml", QWEN_CASES[name])
    rep = _check_cached_equals_recompute(adapter, pipe, image)
    counts = rep.visual_tokens_per_layer[0]
    assert counts == _expected_counts(rep, rep.visual_tokens_full, adapter.n_layers)
    if name != "vanilla":
        assert min(counts) < rep.visual_tokens_full


@pytest.mark.parametrize("name", ["visionzip", "prumerge_plus", "nuwa", "sparsevlm"])
def test_cls_based_pipelines_are_refused_on_qwen(tiny_qwen, name):
    from nuwa_graph import RunError

    adapter, image = tiny_qwen
    with pytest.raises(RunError, match="vision.attention_received|cannot run"):
        adapter.generate(load(ROOT / "pipelines" / f"{name}.yaml"), [image], [PROMPT], max_new_tokens=1)


def test_adaptive_prumerge_plus_in_a_batch(tiny_llava):
    """PruMerge+ keeps a per-image count; a left-padded batch equals the single runs."""
    from nuwa_graph.adapters.tiny import synthetic_image

    images = [synthetic_image(seed=s) for s in (0, 5)]
    prompts = [PROMPT, "how many shapes are there ?"]
    pipe = load(ROOT / "pipelines/prumerge_plus.yaml")
    batch = tiny_llava.generate(pipe, images, prompts, max_new_tokens=3, stop_at_eos=False, return_logits=True)
    for b in range(2):
        single = tiny_llava.generate(pipe, [images[b]], [prompts[b]], max_new_tokens=3, stop_at_eos=False,
                                     return_logits=True)
        assert batch.visual_tokens_per_layer[b] == single.visual_tokens_per_layer[0]
        assert batch.new_tokens[b] == single.new_tokens[0]
        diff = (torch.stack(batch.step_logits)[:, b] - torch.stack(single.step_logits)[:, 0]).abs().max()
        assert diff.item() <= 1e-4
