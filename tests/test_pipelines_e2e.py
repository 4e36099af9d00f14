"""Every shipped pipeline end to end on tiny LLaVA and the tiny Qwen-VL presets (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL): SDPA, KV cache, schedules.

The tiny models have 64 (LLaVA, 8x8) visual tokens and 4 LLM layers. Budgets are LLaVA-1.5
counts scaled by grid_tokens / 576 (budget 144 -> 16 of 64 tokens); layer schedules written
for 32 layers follow the model's depth by themselves (scale32); the files are unedited and,
in tests/test_matrix.py, run without any override on every model.
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
    "fastv": ({"budget": 144}, True),
    "fastv_fix": ({"budget": 144}, True),
    "pdrop": ({"budget": 64}, True),
    "sparsevlm": ({"budget": 64}, False),
    "sparsevlm_v2": ({"budget": 64}, False),
    "visionzip": ({"budget": 144}, True),
    "visionzip_fix": ({"budget": 144}, True),
    "prumerge_plus": ({}, False),
    "feather": ({"budget": 64}, False),  # union size depends on the scores
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
    "fastv": {"budget": 16},
    "fastv_fix": {"budget": 16},
    "pdrop": {"budget": 64},
    "sparsevlm": {"budget": 64},
    "sparsevlm_v2": {"budget": 64},
    "feather": {"budget": 64},
    "nuwa_qwen": {"keep": 50},
    "nuwa": {},  # runs nuwa_qwen.yaml (family_files)
}


QWEN_PRESETS = ["tiny-qwen", "tiny-qwen2-vl", "tiny-qwen3-vl"]  # Qwen2.5-VL, Qwen2-VL, Qwen3-VL


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def tiny_qwen(request):
    """A tiny Qwen-VL preset (each generation in turn) and a 6 x 8 merged-grid image for it."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import tiny_qwen_image
    from nuwa_graph.adapters.tiny_qwen_vl import unit_pixels

    adapter = load_adapter(request.param)
    return adapter, tiny_qwen_image((6, 8), seed=1, unit=unit_pixels(adapter))


@pytest.mark.parametrize("name", list(QWEN_CASES))
def test_pipeline_on_tiny_qwen(tiny_qwen, name):
    """On Qwen3-VL, FastV (K=1) and PDrop / SparseVLM prune inside the DeepStack layers 0-2."""
    adapter, image = tiny_qwen
    pipe = load(ROOT / "pipelines" / f"{name}.yaml", QWEN_CASES[name])
    rep = _check_cached_equals_recompute(adapter, pipe, image)
    counts = rep.visual_tokens_per_layer[0]
    assert counts == _expected_counts(rep, rep.visual_tokens_full, adapter.n_layers)
    if name != "vanilla":
        assert min(counts) < rep.visual_tokens_full


# Every shipped file, unchanged, on every model (run, or refused before any forward with a hint
# naming a file that runs): tests/test_matrix.py, over every preset in PRESETS and the embedded model.


@pytest.fixture(scope="module")
def big_qwen_image(tiny_qwen):
    """A 12x12 merged grid (144 tokens): room for the default budget of 64 (a count on Qwen)."""
    from nuwa_graph.adapters.tiny import tiny_qwen_image
    from nuwa_graph.adapters.tiny_qwen_vl import unit_pixels

    return tiny_qwen_image((12, 12), seed=2, unit=unit_pixels(tiny_qwen[0]))


def test_nuwa_on_qwen_says_which_file_and_signal_it_used(tiny_qwen, big_qwen_image):
    adapter, _ = tiny_qwen
    rep = adapter.generate(load(ROOT / "pipelines/nuwa.yaml"), [big_qwen_image], [PROMPT], max_new_tokens=1)
    d = rep.to_dict()
    assert d["schedule"]["instead_of"].endswith("nuwa.yaml") and d["schedule"]["chosen_for_family"] == adapter.family
    assert d["schedule"]["variables"]["keep"] == {"value": 25, "from": "file default"}
    assert "llm.3" in d["schedule"]["sites"]  # llm_layers // 2 + 1 on 4 layers
    assert any(s.startswith("vision.attention_received(layer=-1)") for s in d["signals"])


def test_a_variable_of_the_other_family_file_is_refused_with_its_name(tiny_qwen, big_qwen_image):
    from nuwa_graph import RunError

    adapter, _ = tiny_qwen
    with pytest.raises(RunError, match=r"runs nuwa_qwen.yaml.*no variable 'budget'.*keep"):
        adapter.generate(load(ROOT / "pipelines/nuwa.yaml", {"budget": 128}), [big_qwen_image], [PROMPT],
                         max_new_tokens=1)


def test_llava_run_reports_schedule_and_signals(tiny_llava, tiny_image):
    rep = tiny_llava.generate(load(ROOT / "pipelines/pdrop.yaml"), [tiny_image], [PROMPT], max_new_tokens=1)
    layers = rep.schedule["variables"]["layers"]
    assert layers == {"value": [1, 2, 3], "from": "scale32([2, 10, 20]) on 4 LLM layers"}
    assert rep.schedule["model"]["llm_layers"] == 4 and rep.schedule["model"]["family"] == "llava"
    assert [s.split(" at ")[1] for s in rep.signals] == ["llm.1", "llm.2", "llm.3"]


def test_a_layer_error_names_the_variable(tiny_llava, tiny_image):
    from nuwa_graph import RunError

    with pytest.raises(RunError, match=r"llm.9 is past the last LLM layer \(this model has 4 LLM layers: llm.0 .. llm.3\); "
                                       r"change K \(now 9\), e.g. --set K="):
        tiny_llava.generate(load(ROOT / "pipelines/fastv.yaml", {"K": 9}), [tiny_image], [PROMPT], max_new_tokens=1)
    with pytest.raises(RunError, match=r"change layers \(now \[1, 2, 8\]\)"):
        tiny_llava.generate(load(ROOT / "pipelines/pdrop.yaml", {"layers": [1, 2, 8]}), [tiny_image], [PROMPT],
                            max_new_tokens=1)


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


def test_run_json_and_table_say_which_schedule_and_signals(capsys):
    """`nuwa-graph run FILE --model ... --json`: the schedule and the signals used, also in the table."""
    import json

    from nuwa_graph.apps.runner import run_command

    assert run_command(ROOT / "pipelines/feather.yaml", model="tiny-llava", max_new_tokens=1, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schedule"]["variables"]["K"] == {"value": [1, 2], "from": "scale32([8, 16]) on 4 LLM layers"}
    assert data["schedule"]["sites"] == ["vision", "llm.1", "llm.2"]  # the uniform grid is chosen at vision
    assert [s.split("(")[0] for s in data["signals"]] == ["llm.attention", "llm.attention"]
    assert run_command(ROOT / "pipelines/feather.yaml", model="tiny-llava", max_new_tokens=1) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "schedule" in out and "signals" in out and "scale32([8, 16])" in out


def test_family_files_route_by_family_then_by_group(tmp_path):
    """A key names a family or a family group; the family's entry wins; a family named alone is
    its own group; a file that would send the model on again is an error."""
    from nuwa_graph import PipelineError

    body = "\nnodes:\n  - {name: s, type: selector.uniform-grid, params: {stride: 1}}\n" \
           "  - {name: k, type: applier.keep, params: {site: vision}, inputs: {selection: s.selection}}\n"
    (tmp_path / "a.yaml").write_text("name: a\nfamily_files: {qwen-vl: b.yaml, qwen2_vl: c.yaml}" + body)
    (tmp_path / "b.yaml").write_text("name: b" + body)
    (tmp_path / "c.yaml").write_text("name: c" + body)
    a = tmp_path / "a.yaml"
    assert load(a, model_vars={"family": "qwen3_vl", "family_group": "qwen-vl"}).name == "b"
    assert load(a, model_vars={"family": "qwen2_vl", "family_group": "qwen-vl"}).name == "c"
    assert load(a, model_vars={"family": "llava", "family_group": "llava"}).name == "a"
    assert load(a, model_vars={"family": "qwen3_vl"}).name == "a"  # no group given: the family alone
    bound = load(a).bind_model({"family": "qwen2_5_vl", "family_group": "qwen-vl", "llm_layers": 4})
    assert bound.name == "b" and bound.chosen_from == str(a)
    (tmp_path / "b.yaml").write_text("name: b\nfamily_files: {qwen-vl: a.yaml}" + body)
    with pytest.raises(PipelineError, match="sends qwen3_vl models on to a.yaml; name the final file"):
        load(a, model_vars={"family": "qwen3_vl", "family_group": "qwen-vl"})
