"""InternVL3.5 shape (tiny-internvl: InternViT with CLS, pixel shuffle, Qwen3 LLM with QK-norm; fp32,
CPU, offline): the invariants on tiles + thumbnail, per-crop signals in stream ids checked against
the stock model's own token order, QK-norm rows, and Nüwa's regions per tile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _probes import registered, signal_probe

from nuwa_graph import RunError, load, load_text
from nuwa_graph.adapters import load_adapter
from nuwa_graph.adapters.tiny_tiled import wide_image
from nuwa_graph.part_views import CropSignals

PROMPT = "what is left of the red circle ?"
PROMPT2 = "how many shapes are there ?"
PIPES = Path(__file__).resolve().parents[1] / "pipelines"
SEEN: list = []


Probe = signal_probe("scorer.test-probe-internvl", lambda name, value: SEEN.append(value))


@pytest.fixture(scope="module", autouse=True)
def _probe():
    with registered(Probe):
        yield


@pytest.fixture(scope="module")
def ivl():
    return load_adapter("tiny-internvl")


@pytest.fixture(scope="module")
def img():
    return wide_image(160, 64)  # 1 x 3 tiles + thumbnail: 4 crops of 8x8 = 256 tokens


def stock(adapter, images, prompts, **kw):
    enc = adapter.encode(images, prompts)
    with torch.no_grad():
        return adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             pixel_values=enc.vision_inputs["pixel_values"], **kw)


def test_keep_everything_is_the_stock_model(ivl, img):
    ref = stock(ivl, [img], [PROMPT]).logits
    logits, run = ivl.forward_logits(load("pipelines/vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(logits, ref)
    g = run.state.geometries[0]
    assert [p.kind for p in g.parts] == ["tile"] * 3 + ["thumbnail"] and g.n_tokens == 256
    enc = ivl.encode([img], [PROMPT])
    rep = ivl.generate(load("pipelines/vanilla.yaml"), [img], [PROMPT], max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        out = ivl.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 pixel_values=enc.vision_inputs["pixel_values"], max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False)
    assert rep.new_tokens[0] == out[0, enc.input_ids.shape[1]:].tolist()


def _probe_yaml(kind: str, site: str, **args) -> str:
    return f"""
name: probe
nodes:
  - {{name: p, type: scorer.test-probe-internvl, params: {{kind: {kind}, site: "{site}", args: {args}}}}}
  - {{name: k, type: selector.top-k, per: image, params: {{ratio: 1.0, order: index}}, inputs: {{scores: p.scores}}}}
  - {{name: a, type: applier.keep, params: {{site: "{site}"}}, inputs: {{selection: k.selection}}}}
"""


def test_per_crop_signals_follow_the_stock_token_order(ivl, img):
    """vision.hidden(-1) of each crop, projected, is the stock row at the crop's stream ids, and
    vision.cls_attention per unit is the eager CLS row summed over the unit's 4 patches."""
    _, run = ivl.forward_logits(load_text(_probe_yaml("vision.hidden", "vision", layer=-1).replace("per: image",
                                                                                                   "per: crop")),
                                [img], [PROMPT])
    g = run.state.geometries[0]
    hidden = CropSignals(SEEN[:4])
    SEEN.clear()
    rows = run.vision_out.projected_rows(0)
    for c, h in enumerate(hidden):
        assert torch.allclose(ivl.project(h[None])[0], rows[g.crop_ids(c)], atol=1e-6), f"crop {c}"
    ivl.forward_logits(load_text(_probe_yaml("vision.cls_attention", "vision", layer=-2).replace("per: image",
                                                                                                 "per: crop")),
                       [img], [PROMPT])
    got = torch.stack(SEEN[:4])  # (crops, heads, 64)
    tower = ivl.vision_tower()
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixel_values=ivl.encode([img], [PROMPT]).vision_inputs["pixel_values"], output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    cls = out.attentions[-2][:, :, 0, 1:]  # (crops, heads, 256 patches) raster 16 x 16
    ref = cls.reshape(4, -1, 8, 2, 8, 2).sum(dim=(3, 5)).reshape(4, -1, 64)  # 2x2 units, raster
    assert (got - ref).abs().max().item() <= 1e-6


def test_qk_norm_rows_at_the_layer_input_equal_eager(ivl, img):
    """llm.attention computed in the layer pre-hook (L == K, PDrop's case) applies Qwen3's q/k norm."""
    ivl.forward_logits(load_text(_probe_yaml("llm.attention", "llm.2", layer=2)), [img], [PROMPT])
    got = SEEN.pop()[:, 0]  # (heads, n_image) of the last query
    ivl.set_attn_implementation("eager")
    try:
        out = stock(ivl, [img], [PROMPT], output_attentions=True)
    finally:
        ivl.set_attn_implementation("sdpa")
    ids = ivl.encode([img], [PROMPT]).input_ids[0]
    img_idx = (ids == ivl.image_token_id).nonzero().flatten()
    ref = out.attentions[2][0][:, -1, img_idx]
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pipeline", ["nuwa.yaml", "fastv.yaml", "random.yaml"])
def test_cached_decoding_equals_recompute(ivl, img, pipeline):
    pipe = load(PIPES / pipeline)
    T = 4
    rep = ivl.generate(pipe, [img], [PROMPT], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    full, _ = ivl.forward_logits(pipe, [img], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -T:].float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pipeline", ["nuwa.yaml", "pdrop.yaml"])
def test_left_padded_batch_of_different_tile_counts_equals_singles(ivl, img, pipeline):
    other = wide_image(60, 60, seed=3)  # one tile, no thumbnail: 64 tokens
    pipe = load(PIPES / pipeline)
    T = 3
    batch = ivl.generate(pipe, [img, other], [PROMPT, PROMPT2], max_new_tokens=T, stop_at_eos=False,
                         return_logits=True)
    assert batch.visual_tokens_full_per_sample == [256, 64]
    for b, (im, pr) in enumerate([(img, PROMPT), (other, PROMPT2)]):
        single = ivl.generate(pipe, [im], [pr], max_new_tokens=T, stop_at_eos=False, return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        assert single.visual_tokens_per_layer[0] == batch.visual_tokens_per_layer[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5


def test_nuwa_runs_its_regions_per_tile(ivl, img):
    rep = ivl.generate(load(PIPES / "nuwa.yaml"), [img], [PROMPT], max_new_tokens=1)
    kept = torch.tensor(rep.kept[0]["vision"])
    # top-k-per-region keeps at most n = 1 token of every 2x2 region of every tile (16 regions per 8x8 tile)
    tile, local = kept // 64, kept % 64
    region = tile * 16 + (local // 8 // 2) * 4 + (local % 8) // 2
    assert region.unique().numel() == region.numel()
    assert rep.schedule["resolved"]["align"]["ratio"] == pytest.approx(112 / 576)
    assert len(kept) == round(256 * 112 / 576)  # K1 of the whole image (ratio of its stream tokens)


def test_error_inside_a_run_removes_the_hooks(ivl, img):
    ref = stock(ivl, [img], [PROMPT]).logits
    mods = list(ivl.decoder_layers()) + list(ivl.vision_attention_modules())
    before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods]
    with pytest.raises(RunError):
        ivl.generate(load(PIPES / "downsample.yaml", {"budget": 100000}), [img], [PROMPT])
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods] == before
    assert torch.equal(stock(ivl, [img], [PROMPT]).logits, ref)


def test_saved_folder_loads_through_the_same_path(ivl, img, tmp_path):
    ivl.model.save_pretrained(tmp_path)
    ivl.processor.tokenizer.save_pretrained(tmp_path)  # a checkpoint's files (no video processor here)
    ivl.processor.image_processor.save_pretrained(tmp_path)
    again = load_adapter(str(tmp_path))
    assert type(again).__name__ == "InternVLAdapter"
    a, _ = again.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    b, _ = ivl.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(a, b)
