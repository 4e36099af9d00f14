"""LLaVA-OneVision (tiny-llava-onevision: SigLIP without CLS, Qwen2, anyres_max_4; fp32, CPU,
offline): the invariants, an interpolated tile canvas as a grid with no crop, per-crop hidden
states in stream ids where the canvas is not interpolated, CLS methods refused with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph import RunError, load
from nuwa_graph.adapters import load_adapter
from nuwa_graph.adapters.tiny_tiled import wide_image
from nuwa_graph.part_views import CropSignals
from nuwa_graph.signals import SignalRequest

PROMPT = "what is left of the red circle ?"
PROMPT2 = "how many shapes are there ?"
PIPES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(scope="module")
def ov():
    return load_adapter("tiny-llava-onevision")


@pytest.fixture(scope="module")
def img():
    return wide_image()  # 200 x 150: 2x2 tiles, cut to 12 rows, not interpolated


@pytest.fixture(scope="module")
def big():
    return wide_image(330, 300, seed=2)  # 3x3 tiles: the canvas is interpolated (anyres_max_4)


def stock(adapter, images, prompts):
    enc = adapter.encode(images, prompts)
    with torch.no_grad():
        return adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs).logits


@pytest.mark.parametrize("which", ["img", "big"])
def test_keep_everything_is_the_stock_model(ov, img, big, which):
    image = img if which == "img" else big
    logits, run = ov.forward_logits(load(PIPES / "vanilla.yaml"), [image], [PROMPT])
    assert torch.equal(logits, stock(ov, [image], [PROMPT]))
    g = run.state.geometries[0]
    tiles = g.parts[1]
    assert tiles.kind == "tiles" and (len(tiles.crops) == 4 if which == "img" else tiles.crops == ())


def test_per_crop_hidden_states_follow_the_stock_token_order(ov, img):
    _, run = ov.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    g = run.state.geometries[0]
    hidden = ov.read_vision_signal(run, SignalRequest.make("vision.hidden", "vision", layer=-1), 0)
    assert isinstance(hidden, CropSignals) and len(hidden) == 5
    rows = run.vision_out.projected_rows(0)
    for c, h in enumerate(hidden):
        ids = g.crop_ids(c)
        inside = ids < g.n_tokens
        assert torch.allclose(ov.project(h[inside][None])[0], rows[ids[inside]], atol=1e-6), f"crop {c}"


@pytest.mark.parametrize("pipeline,budget", [("fastv.yaml", 64), ("random.yaml", 64), ("downsample.yaml", 16)])
def test_cached_decoding_equals_recompute(ov, big, pipeline, budget):
    pipe = load(PIPES / pipeline, {"budget": budget})
    T = 4
    rep = ov.generate(pipe, [big], [PROMPT], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    full, _ = ov.forward_logits(pipe, [big], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -T:].float()).abs().max().item() <= 1e-5


def test_left_padded_batch_of_different_crop_counts_equals_singles(ov, img, big):
    pipe = load(PIPES / "pdrop.yaml", {"budget": 64})
    T = 3
    batch = ov.generate(pipe, [img, big], [PROMPT, PROMPT2], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    assert batch.visual_tokens_full_per_sample[0] != batch.visual_tokens_full_per_sample[1]
    for b, (im, pr) in enumerate([(img, PROMPT), (big, PROMPT2)]):
        single = ov.generate(pipe, [im], [pr], max_new_tokens=T, stop_at_eos=False, return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5


def test_cls_methods_are_refused_with_a_hint_before_any_forward(ov, img):
    with pytest.raises(RunError, match="no CLS token.*\n.*hint:.*fastv"):
        ov.generate(load(PIPES / "nuwa.yaml"), [img], [PROMPT])


def test_error_inside_a_run_removes_the_hooks(ov, img):
    ref = stock(ov, [img], [PROMPT])
    mods = list(ov.decoder_layers()) + list(ov.vision_attention_modules())
    before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods]
    with pytest.raises(RunError):
        ov.generate(load(PIPES / "downsample.yaml", {"budget": 100000}), [img], [PROMPT])
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods] == before
    assert torch.equal(stock(ov, [img], [PROMPT]), ref)


def test_saved_folder_loads_through_the_same_path(ov, img, tmp_path):
    ov.model.save_pretrained(tmp_path)
    ov.processor.tokenizer.save_pretrained(tmp_path)
    ov.processor.image_processor.save_pretrained(tmp_path)
    again = load_adapter(str(tmp_path))
    assert type(again).__name__ == "LlavaOnevisionAdapter"
    a, _ = again.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    b, _ = ov.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(a, b)
