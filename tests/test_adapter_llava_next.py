"""LLaVA-NeXT (tiny-llava-next, fp32, CPU, offline): the invariants on an image made of parts,
per-crop vision signals in stream ids, and VisionZip's official per-crop path end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph import RunError, load, load_text
from nuwa_graph.adapters import load_adapter
from nuwa_graph.adapters.tiny_tiled import wide_image
from nuwa_graph.part_views import CropSignals

PROMPT = "what is left of the red circle ?"
PROMPT2 = "how many shapes are there ?"


@pytest.fixture(scope="module")
def nxt():
    return load_adapter("tiny-llava-next")


@pytest.fixture(scope="module")
def img():
    return wide_image()  # 200 x 150: 2x2 tiles, the 16x16 canvas cut to 12 rows


def stock(adapter, images, prompts):
    enc = adapter.encode(images, prompts)
    with torch.no_grad():
        return adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             pixel_values=enc.vision_inputs["pixel_values"],
                             image_sizes=enc.vision_inputs["image_sizes"]).logits


def test_geometry_is_the_stock_packing(nxt, img):
    logits, run = nxt.forward_logits(load("pipelines/vanilla.yaml"), [img], [PROMPT])
    g = run.state.geometries[0]
    assert g.describe() == "grid 8x8, tiles 12x16 (4 crops), newline 12x1"
    assert run.layouts[0].n_image == g.n_tokens == 64 + 12 * 17
    # the stock rows at the newline slots are the model's image_newline
    rows = run.vision_out.projected_rows(0)
    assert torch.equal(rows[g.newline_ids()], nxt.model.model.image_newline.expand(12, -1))
    assert nxt.model_variables()["crops"] == 5 and nxt.model_variables()["crop_tokens"] == 64
    assert "grid_tokens" not in nxt.model_variables()  # the count depends on the image: budgets are counts


def test_keep_everything_is_the_stock_model(nxt, img):
    ref = stock(nxt, [img], [PROMPT])
    logits, _ = nxt.forward_logits(load("pipelines/vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(logits, ref)
    rep = nxt.generate(load("pipelines/vanilla.yaml"), [img], [PROMPT], max_new_tokens=4, stop_at_eos=False)
    enc = nxt.encode([img], [PROMPT])
    with torch.no_grad():
        out = nxt.model.generate(**{"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                                    **enc.vision_inputs}, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert rep.new_tokens[0] == out[0, enc.input_ids.shape[1]:].tolist()


def test_per_crop_signals_follow_the_stock_token_order(nxt, img):
    """vision.hidden of each crop, mapped to stream ids, projected, equals the stock row there."""
    seen = {}
    pipe = load("pipelines/visionzip.yaml", {"budget": 320})
    logits, run = nxt.forward_logits(pipe, [img], [PROMPT])
    g = run.state.geometries[0]
    reader = nxt._reader(run)
    req = next(r for r in run.ex.requests() if r.kind == "vision.hidden")
    per_crop = reader(req, 0)
    assert isinstance(per_crop, CropSignals) and len(per_crop) == 5
    stock_rows = run.vision_out.projected_rows(0)
    for c, h in enumerate(per_crop):
        ids = g.crop_ids(c)
        inside = ids < g.n_tokens
        proj = nxt.project(h[inside][None])[0]
        assert torch.allclose(proj, stock_rows[ids[inside]], atol=1e-6), f"crop {c}"
        seen[c] = int((~inside).sum())
    assert seen == {0: 0, 1: 16, 2: 16, 3: 16, 4: 16}  # 2 rows of 8 cut off every tile


def reference_visionzip(nxt, img, dominant: int, contextual: int) -> torch.Tensor:
    """The official multi-crop VisionZip block on this model, written out plainly in the test:
    per crop top-(d-1) CLS attention (layer -2, summed over heads), contextual merge by head-mean
    keys, then [base crop] [tile dominants in canvas raster order] [tile CLS] [tile contextual]."""
    enc = nxt.encode([img], [PROMPT])
    n_crops = 5
    pix = enc.vision_inputs["pixel_values"][0, :n_crops]
    tower = nxt.vision_tower()
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pix, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    attn = out.attentions[-2][:, :, 0, 1:].sum(dim=1)  # (crops, 64)
    hidden = out.hidden_states[-2]  # (crops, 65, d)
    layer = nxt.vision_layers()[-2]
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    heads = layer.self_attn.num_heads
    metric = k.view(n_crops, 65, heads, -1).mean(dim=2)
    crops = []
    for c in range(n_crops):
        top = torch.topk(attn[c], dominant - 1).indices + 1
        keep = torch.zeros(65, dtype=torch.bool)
        keep[0] = True
        keep[top] = True
        dom_rows = hidden[c][keep]
        rest = torch.nonzero(~keep).flatten()
        m = metric[c][rest]
        m = m / m.norm(dim=-1, keepdim=True)
        step = max(1, rest.numel() // contextual)
        tpos = torch.arange(0, rest.numel(), step)[:contextual]
        is_t = torch.zeros(rest.numel(), dtype=torch.bool)
        is_t[tpos] = True
        sim = m[~is_t] @ m[tpos].T
        assign = torch.zeros(sim.shape[0], contextual)
        assign[torch.arange(sim.shape[0]), sim.argmax(dim=1)] = 1
        cnt = assign.sum(0).clamp(min=1)[:, None]
        ctx = hidden[c][rest][tpos] + (assign.T @ hidden[c][rest][~is_t]) / cnt
        crops.append((dom_rows, torch.sort(top).values - 1, ctx))
    canvas = []
    for c in range(1, n_crops):
        tr, tc = divmod(c - 1, 2)
        for row, t in zip(crops[c][0][1:], crops[c][1].tolist()):
            r, cc = divmod(t, 8)
            canvas.append(((tr * 8 + r) * 16 + tc * 8 + cc, row))
    canvas.sort(key=lambda x: x[0])
    block = [torch.cat([crops[0][0], crops[0][2]])] + [torch.stack([r for _, r in canvas])]
    block += [torch.stack([crops[c][0][0] for c in range(1, n_crops)])] + [crops[c][2] for c in range(1, n_crops)]
    return nxt.project(torch.cat(block)[None])[0]


def test_visionzip_per_crop_end_to_end(nxt, img):
    pipe = load("pipelines/visionzip.yaml", {"budget": 320})  # 320 * 64 // 576 // 5 = 7 per crop: 4 + 2 + CLS
    logits, run = nxt.forward_logits(pipe, [img], [PROMPT])
    block = run.blocks[0]
    assert block.ids.numel() == 5 * 7
    ref = reference_visionzip(nxt, img, dominant=5, contextual=2)
    assert (block.rows - ref).abs().max().item() <= 1e-5
    rep = nxt.generate(pipe, [img], [PROMPT], max_new_tokens=2)
    assert rep.visual_tokens_per_layer == [[35] * 4]
    assert rep.schedule["model"]["crops"] == 5


@pytest.mark.parametrize("pipeline,overrides", [("visionzip.yaml", {"budget": 320}), ("fastv.yaml", {"budget": 64}),
                                                ("random.yaml", {"budget": 64})])
def test_cached_decoding_equals_recompute(nxt, img, pipeline, overrides):
    pipe = load(f"pipelines/{pipeline}", overrides)
    T = 4
    rep = nxt.generate(pipe, [img], [PROMPT], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    full, _ = nxt.forward_logits(pipe, [img], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -T:].float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pipeline,budget", [("visionzip.yaml", 320), ("fastv.yaml", 64)])
def test_left_padded_batch_of_different_crop_counts_equals_singles(nxt, img, pipeline, budget):
    other = wide_image(200, 90, seed=3)  # 1x2 tiles: 3 crops
    pipe = load(f"pipelines/{pipeline}", {"budget": budget})
    T = 3
    batch = nxt.generate(pipe, [img, other], [PROMPT, PROMPT2], max_new_tokens=T, stop_at_eos=False,
                         return_logits=True)
    assert batch.visual_tokens_full_per_sample[0] != batch.visual_tokens_full_per_sample[1]
    for b, (im, pr) in enumerate([(img, PROMPT), (other, PROMPT2)]):
        single = nxt.generate(pipe, [im], [pr], max_new_tokens=T, stop_at_eos=False, return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        assert single.visual_tokens_per_layer[0] == batch.visual_tokens_per_layer[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5


def test_error_inside_a_run_removes_the_hooks(nxt, img):
    ref = stock(nxt, [img], [PROMPT])
    mods = list(nxt.decoder_layers()) + list(nxt.vision_attention_modules())
    before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods]
    bad = load("pipelines/downsample.yaml", {"budget": 100000})
    with pytest.raises(RunError):
        nxt.generate(bad, [img], [PROMPT])
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods] == before
    assert torch.equal(stock(nxt, [img], [PROMPT]), ref)


def test_saved_folder_loads_through_the_same_path(nxt, img, tmp_path):
    nxt.model.save_pretrained(tmp_path)
    nxt.processor.save_pretrained(tmp_path)
    again = load_adapter(str(tmp_path))
    assert type(again).__name__ == "LlavaNextAdapter"
    pipe = load("pipelines/vanilla.yaml")
    a, _ = again.forward_logits(pipe, [img], [PROMPT])
    b, _ = nxt.forward_logits(pipe, [img], [PROMPT])
    assert torch.equal(a, b)


def test_spatial_pipeline_runs_per_part(nxt, img):
    rep = nxt.generate(load("pipelines/downsample.yaml", {"budget": 16}), [img], [PROMPT], max_new_tokens=1)
    kept = rep.kept[0]["vision"]
    assert len(kept) == 2 * 16  # a count per spatial part (base grid, stitched tiles)
    assert not set(kept) & set(range(64 + 16, 64 + 12 * 17, 17))  # no newline slot


def test_flat_text_yaml_is_refused_with_a_clear_error(nxt, img):
    text = """
name: flat-downsample
nodes:
  - {name: g, type: selector.uniform-count, per: image, params: {k: 4}}
  - {name: keep, type: applier.keep, params: {site: vision}, inputs: {selection: g.selection}}
"""
    with pytest.raises(RunError, match="'g'.*made of parts"):
        nxt.generate(load_text(text), [img], [PROMPT], max_new_tokens=1)


PIPES = Path(__file__).resolve().parents[1] / "pipelines"


def test_positions_from_ids_are_refused_for_tokens_outside_the_stream(nxt, img):
    """VisionZip-fix (RPME) on LLaVA-NeXT: the crops' CLS rows and the cut cells VisionZip keeps have
    no stream position, so a position from the id would be a silent wrong meaning."""
    encoded = []
    nxt.encode = lambda *a, _encode=nxt.encode, **k: encoded.append(1) or _encode(*a, **k)
    try:
        with pytest.raises(RunError, match=r"(?s)'positions'.*policy 'rpme'.*no stream position.*use policy perc"
                                           r".*hint: shipped files that run.*pipelines/nuwa.yaml"):
            nxt.generate(load(PIPES / "visionzip_fix.yaml", {"budget": 320}), [img], [PROMPT], max_new_tokens=1)
    finally:
        del nxt.encode
    assert not encoded  # refused before the image was encoded


def test_eval_records_the_crop_views_and_draws_them(nxt, tmp_path):
    """`nuwa-graph eval`'s loop on a tiled model: results carry the image's views (base crop,
    tile canvas) and the kept-token picture has a panel per view."""
    from nuwa_graph.apps.evaluate import evaluate, load_data, plan_runs, sample_data
    from nuwa_graph.apps.viz import write_pictures

    tasks = load_data(sample_data(tmp_path / "data", n_images=1, seed=3), limit=1)
    runs = plan_runs([PIPES / "fastv.yaml"], {"budget": [64]})
    result = evaluate(nxt, runs, tasks, batch=1, max_new_tokens=2, warmup=False)
    (res,) = result["results"]
    assert [label for label, _ in res["views"]] == ["base", "tiles"] and res["grid"] is None
    assert res["flops"]["prefill_ratio"] < 1 if "flops" in res else True
    pics = write_pictures(result, tmp_path / "out")
    assert pics and pics[0].stat().st_size > 0
