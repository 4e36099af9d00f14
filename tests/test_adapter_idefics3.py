"""Idefics3 / SmolVLM (tiny-smolvlm: SigLIP without CLS, pixel shuffle, Llama; image splitting on;
fp32, CPU, offline): an image is 2x2 tiles + the global image, each crop its own run of `<image>`
tokens with text between them. The invariants, the runs as one image's parts, per-crop signals
against the stock model's token order and its eager attention, positions per run, and loading
checkpoint folders of both model types."""

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


Probe = signal_probe("scorer.test-probe-idefics3", lambda name, value: SEEN.append(value))


@pytest.fixture(scope="module", autouse=True)
def _probe():
    with registered(Probe):
        yield


@pytest.fixture(scope="module")
def smol():
    return load_adapter("tiny-smolvlm")


@pytest.fixture(scope="module")
def img():
    return wide_image(200, 150)  # 2 x 2 tiles + global: 5 runs of 8x8 = 320 tokens


def stock(adapter, images, prompts, **kw):
    enc = adapter.encode(images, prompts)
    with torch.no_grad():
        return adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs, **kw)


def test_keep_everything_is_the_stock_model(smol, img):
    ref = stock(smol, [img], [PROMPT]).logits
    logits, run = smol.forward_logits(load("pipelines/vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(logits, ref)
    g, lay = run.state.geometries[0], run.layouts[0]
    assert [p.kind for p in g.parts] == ["tile"] * 4 + ["thumbnail"] and g.n_tokens == 320
    assert [im.n for im in lay.images] == [64] * 5  # five runs ...
    assert [t.numel() for t in lay.texts[1:-1]] == [2, 3, 2, 4]  # ... with the tile markers and \n between them
    enc = smol.encode([img], [PROMPT])
    rep = smol.generate(load("pipelines/vanilla.yaml"), [img], [PROMPT], max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        out = smol.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs,
                                  max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert rep.new_tokens[0] == out[0, enc.input_ids.shape[1]:].tolist()


def _probe_yaml(kind: str, site: str, per: str = "image", **args) -> str:
    return f"""
name: probe
nodes:
  - {{name: p, type: scorer.test-probe-idefics3, per: {per}, params: {{kind: {kind}, site: "{site}", args: {args}}}}}
  - {{name: k, type: selector.top-k, per: image, params: {{ratio: 1.0, order: index}}, inputs: {{scores: p.scores}}}}
  - {{name: a, type: applier.keep, params: {{site: "{site}"}}, inputs: {{selection: k.selection}}}}
"""


def test_per_crop_signals_follow_the_stock_token_order(smol, img):
    """vision.hidden(-1) of each crop, projected, is the stock row at the crop's stream ids (tile
    k's run in the prompt); vision.attention_received per unit is the eager map's column sum
    (head mean), averaged over the unit's 2x2 patches."""
    SEEN.clear()
    _, run = smol.forward_logits(load_text(_probe_yaml("vision.hidden", "vision", "crop", layer=-1)), [img], [PROMPT])
    g = run.state.geometries[0]
    hidden = CropSignals(SEEN[:5])
    SEEN.clear()
    enc = smol.encode([img], [PROMPT])
    with torch.no_grad():
        feats = smol.model.model.get_image_features(enc.vision_inputs["pixel_values"],
                                                   enc.vision_inputs["pixel_attention_mask"]).pooler_output[0]
    for c, h in enumerate(hidden):
        assert torch.allclose(smol.project(h[None])[0], feats[g.crop_ids(c)], atol=1e-6), f"crop {c}"
    smol.forward_logits(load_text(_probe_yaml("vision.attention_received", "vision", "crop", layer=-2)),
                        [img], [PROMPT])
    got = torch.stack(SEEN[:5])  # (crops, 64)
    SEEN.clear()
    tower = smol.vision_tower()
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixel_values=enc.vision_inputs["pixel_values"][0], output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    received = out.attentions[-2].mean(1).sum(1)  # (crops, 256 patches) raster 16 x 16
    ref = received.reshape(5, 8, 2, 8, 2).mean(dim=(2, 4)).reshape(5, 64)
    assert (got - ref).abs().max().item() <= 1e-5


def test_a_budget_per_image_counts_the_tiles_and_the_global_image_together(smol, img):
    """`per: image`: one node run over the whole image (its five runs); `per: part`: one per crop."""
    pipe = load_text("""
name: budget
nodes:
  - {name: k, type: random-dropper.uniform, per: image, params: {keep: 36, order: index}}
  - {name: a, type: applier.keep, params: {site: vision}, inputs: {selection: k.selection}}
""")
    rep = smol.generate(pipe, [img], [PROMPT], max_new_tokens=1)
    assert rep.visual_tokens_per_layer[0][0] == 36  # 36 of the image's 320, not 36 per run
    run = smol.forward_logits(load(PIPES / "downsample.yaml"), [img], [PROMPT])[1]
    assert len(run.state.geometries[0].units("part")) == 5


@pytest.mark.parametrize("pipeline", ["fastv.yaml", "pdrop.yaml", "downsample.yaml"])
def test_cached_decoding_equals_recompute(smol, img, pipeline):
    pipe = load(PIPES / pipeline)
    T = 4
    rep = smol.generate(pipe, [img], [PROMPT], max_new_tokens=T, stop_at_eos=False, return_logits=True)
    full, _ = smol.forward_logits(pipe, [img], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -T:].float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", ["pesp", "perc", "rpme"])
def test_positions_are_planned_per_run(smol, img, policy):
    """Keep-all with PESP is the stock model; with any policy, cached decoding == recompute, and the
    kept tokens of each run sit in that run's original range (PESP: their own positions)."""
    yaml_text = f"""
name: pos
nodes:
  - {{name: k, type: random-dropper.uniform, params: {{keep: 150, order: index}}}}
  - {{name: p, type: position-reencoder.policy, params: {{policy: {policy}}}, inputs: {{selection: k.selection}}}}
  - {{name: a, type: applier.keep, params: {{site: pre_llm}}, inputs: {{selection: k.selection, positions: p.positions}}}}
"""
    pipe = load_text(yaml_text)
    rep = smol.generate(pipe, [img], [PROMPT], max_new_tokens=3, stop_at_eos=False, return_logits=True)
    full, run = smol.forward_logits(pipe, [img], [PROMPT], extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -3:].float()).abs().max().item() <= 1e-5
    seg, lay = run.segments[0], run.layouts[0]
    ids = seg.img_ids[0]
    pos = seg.pos[0, 0, seg.img_idx[0]]
    if policy == "pesp":
        orig = lay.pos_image[0, ids]
        assert torch.equal(pos, orig)
    else:
        starts = torch.tensor([im.start for im in lay.images])
        run_of = ids // 64
        assert bool((pos >= starts[run_of] - 320).all())
        assert bool((torch.diff(pos) > 0).all())  # increasing through the stream: runs and text in order


def test_keep_all_with_pesp_is_the_stock_model(smol, img):
    pipe = load_text("""
name: pesp_all
nodes:
  - {name: k, type: random-dropper.uniform, params: {keep: 320, order: index}}
  - {name: p, type: position-reencoder.policy, params: {policy: pesp}, inputs: {selection: k.selection}}
  - {name: a, type: applier.keep, params: {site: pre_llm}, inputs: {selection: k.selection, positions: p.positions}}
""")
    logits, _ = smol.forward_logits(pipe, [img], [PROMPT])
    assert (logits - stock(smol, [img], [PROMPT]).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pipeline", ["fastv.yaml", "pdrop.yaml"])
def test_left_padded_batch_of_different_tile_counts_equals_singles(smol, img, pipeline):
    other = wide_image(200, 60, seed=3)  # 1 x 2 tiles + global: 192 tokens
    pipe = load(PIPES / pipeline)
    T = 3
    batch = smol.generate(pipe, [img, other], [PROMPT, PROMPT2], max_new_tokens=T, stop_at_eos=False,
                          return_logits=True)
    assert batch.visual_tokens_full_per_sample == [320, 192]
    for b, (im, pr) in enumerate([(img, PROMPT), (other, PROMPT2)]):
        single = smol.generate(pipe, [im], [pr], max_new_tokens=T, stop_at_eos=False, return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        assert single.visual_tokens_per_layer[0] == batch.visual_tokens_per_layer[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5


def test_error_inside_a_run_removes_the_hooks(smol, img):
    ref = stock(smol, [img], [PROMPT]).logits
    mods = list(smol.decoder_layers()) + list(smol.vision_attention_modules())
    before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods]
    with pytest.raises(RunError):
        smol.generate(load(PIPES / "downsample.yaml", {"budget": 100000}), [img], [PROMPT])
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods] == before
    assert torch.equal(stock(smol, [img], [PROMPT]).logits, ref)


@pytest.mark.parametrize("model_type", ["smolvlm", "idefics3"])
def test_saved_folders_load_through_the_same_path(img, tmp_path, model_type):
    """A checkpoint folder (model, tokenizer, image processor) of either model type loads by its
    config's model_type and is the stock model of its class."""
    from nuwa_graph.adapters.tiny_idefics3 import build_smolvlm

    model, proc = build_smolvlm(model_type=model_type)
    model.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    again = load_adapter(str(tmp_path))
    assert type(again).__name__ == "Idefics3Adapter" and type(again.model).__name__ == type(model).__name__
    a, _ = again.forward_logits(load(PIPES / "vanilla.yaml"), [img], [PROMPT])
    assert torch.equal(a, stock(again, [img], [PROMPT]).logits)


def test_flops_count_every_crop_without_cls_and_one_linear_connector(smol):
    """The tower per crop on its patches (no CLS), the connector one linear layer on the s x s units."""
    from nuwa_graph.flops import layer_shape, vision_flops

    cfg = smol.model.config
    one, five = vision_flops(cfg, None, 1), vision_flops(cfg, None, 5)
    assert five == {k: 5 * v for k, v in one.items()}
    units, width = 64, 4 * int(cfg.vision_config.hidden_size)
    assert one["projector"] == units * width * int(cfg.text_config.hidden_size)
    s = layer_shape(cfg.vision_config)
    assert one["vision"] == 4 * s.prefill(256) + 256 * 3 * 4 ** 2 * s.d  # 16 x 16 patches, no CLS row


# a chat template in the shape of the released SmolVLM checkpoints' (written here): `User:` / `Assistant:`
# turns, each closed by <end_of_utterance>
SMOLVLM_STYLE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def test_prompts_and_later_turns_follow_the_chat_template(img):
    """With a chat template the prompt, the placeholders and every later turn come from it (read
    off the template); without one, SmolVLM's form; a continued dialog equals the recompute of
    the same ids with turn 1's pruning replayed, in both."""
    from nuwa_graph.adapters.conversation import Conversation

    a = load_adapter("tiny-smolvlm", "float32", "cpu")
    assert a.turn_text("what ?") == "\nUser:what ?<end_of_utterance>\nAssistant:"
    assert a.with_placeholders("is <image> red ?") == "<|im_start|>User:is <image> red ?<end_of_utterance>\nAssistant:"
    pipe = load(PIPES / "fastv.yaml", {"budget": 64})
    for template in (None, SMOLVLM_STYLE):
        a.processor.chat_template = template
        if template:
            assert a.format_prompt("what ?") == "<|im_start|>User:<image>what ?<end_of_utterance>\nAssistant:"
            assert a.with_placeholders("is <image> red ?") == \
                "<|im_start|>User: is <image> red ?<end_of_utterance>\nAssistant:"
            assert a.turn_text("what ?") == "\nUser: what ?<end_of_utterance>\nAssistant:"
        assert a.turn_end_id() == a._tokenizer().convert_tokens_to_ids("<end_of_utterance>")
        conv = Conversation()
        r1 = a.generate(pipe, [img], [PROMPT], max_new_tokens=3, conversation=conv)
        rep = a.generate(pipe, [img], [PROMPT2], max_new_tokens=3, conversation=conv, return_logits=True)
        logits, _ = a.forward_logits(pipe, [img], [PROMPT], extra_ids=conv.history, replay=r1.keeps)
        assert (logits[:, -1].float() - rep.step_logits[0]).abs().max() < 1e-4
        assert rep.visual_tokens_per_layer == r1.visual_tokens_per_layer  # nothing pruned again
        turn = a.turn_ids(PROMPT2)
        assert conv.history[0][-len(turn):] == turn
