"""What Qwen3-VL adds to the Qwen-VL line, checked against the stock model's own code:
DeepStack after the first decoder layers (also when tokens are pruned or merged before or
inside those layers), QK-norm in the attention rows computed in a layer's pre-hook, and
partial rotary in `apply_rope`. The invariants shared with Qwen2-VL / Qwen2.5-VL are in
tests/test_adapter_qwen.py (run there on all three generations)."""

from __future__ import annotations

import pytest
import torch

import nuwa_graph
from nuwa_graph.adapters import signal_rows
from nuwa_graph.adapters.signal_rows import apply_rope
from nuwa_graph.adapters.tiny import tiny_qwen_image, tiny_qwen_prompt
from nuwa_graph.adapters.tiny_qwen_vl import build_tiny_qwen3_vl, tiny_qwen3_vl, unit_pixels

PROMPT = tiny_qwen_prompt()
GRID = (6, 8)


@pytest.fixture(scope="module")
def qwen3():
    adapter = tiny_qwen3_vl()
    return adapter, tiny_qwen_image(GRID, seed=1, unit=unit_pixels(adapter))


@pytest.fixture(scope="module")
def stock():
    return build_tiny_qwen3_vl()


def _stock_logits(model, processor, image):
    enc = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits, enc


def test_without_deepstack_keep_all_is_not_the_stock_model(qwen3, stock, monkeypatch):
    """The post-layer hook is what makes keep-everything identical: without it the logits move."""
    adapter, image = qwen3
    ref, _ = _stock_logits(*stock, image)
    vanilla = nuwa_graph.load("pipelines/vanilla.yaml")
    logits, _ = adapter.forward_logits(vanilla, [image], [PROMPT])
    assert torch.equal(logits, ref)
    monkeypatch.setattr(adapter, "post_layers", lambda: frozenset())
    logits, _ = adapter.forward_logits(vanilla, [image], [PROMPT])
    assert (logits - ref).abs().max().item() > 1e-2


MERGE = """
name: merge-at-pre-llm
nodes:
  - {name: s, type: scorer.external, params: {name: sc, site: vision}}
  - {name: sel, type: selector.top-k, params: {k: 12, order: index}, inputs: {scores: s.scores}}
  - {name: roles, type: pillar-selector.quantile, params: {quantile: 0.5}, inputs: {selection: sel.selection, scores: s.scores}}
  - {name: feats, type: signal.pre-llm-visual}
  - name: coh
    type: region-cohesion.nuwa
    params: {distance_fraction: 0.8, pad_to: 2, self_weight: normalised}
    inputs: {selection: sel.selection, roles: roles.roles, features: feats.tokens, similarity: feats.tokens}
  - {name: keep, type: applier.keep, params: {site: pre_llm}, inputs: {tokens: coh.tokens}}
"""
FASTV_AT_1 = """
name: drop-inside-deepstack
nodes:
  - {name: s, type: scorer.external, params: {name: sc, site: llm.1}}
  - {name: sel, type: selector.top-k, params: {k: 10}, inputs: {scores: s.scores}}
  - {name: keep, type: applier.keep, params: {site: llm.1}, inputs: {selection: sel.selection}}
"""


@pytest.mark.parametrize("yaml_text", [MERGE, FASTV_AT_1], ids=["merged-before-the-llm", "dropped-at-llm.1"])
def test_deepstack_rows_follow_the_tokens_present(qwen3, stock, yaml_text):
    """A pruned run equals the stock text model fed the same sequence with the DeepStack rows
    the rule gives (the stock `_deepstack_process` adds them): before the LLM, a merged token
    carries its anchor's id and gets that id's rows; after a drop at llm.1 the tokens still
    present get rows 1 and 2, the dropped ones nothing."""
    adapter, image = qwen3
    model, processor = stock
    n = GRID[0] * GRID[1]
    ext = {"sc": torch.randn(n, generator=torch.Generator().manual_seed(3))}
    logits, run = adapter.forward_logits(nuwa_graph.load_text(yaml_text), [image], [PROMPT], external=ext)
    _, enc = _stock_logits(model, processor, image)
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    deepstack = [f[0] for f in feats.deepstack_features]
    lay, seg0 = run.layouts[0], run.segments[0]
    block = run.blocks[0]
    assert block is not None
    text = model.model.language_model
    emb = text.embed_tokens
    ones = torch.ones(1, seg0.valid.shape[1], dtype=torch.long)
    x = torch.cat([emb(lay.pre_ids), block.rows, emb(lay.post_ids)])[None]
    image_at = torch.zeros(1, x.shape[1], dtype=torch.bool)
    image_at[0, seg0.img_idx[0]] = True
    ids = seg0.img_ids[0]
    with torch.no_grad():
        if len(run.segments) == 1:  # merged before the LLM: every level at the kept (anchor) ids
            projected = run.vision_out.projected_rows(0)[ids]
            assert ids.numel() == 12 and int(ids.min()) >= 0
            assert not torch.equal(block.rows, projected)  # collectors were merged into the kept rows
            h = text(inputs_embeds=x, position_ids=seg0.pos, attention_mask=ones, visual_pos_masks=image_at,
                     deepstack_visual_embeds=[d[ids] for d in deepstack]).last_hidden_state
        else:  # dropped at llm.1: layer 0 on every image token, then the stock layers on the kept ones
            from transformers.masking_utils import create_causal_mask

            seg1 = run.segments[1]
            kept = seg1.img_ids[0]
            assert kept.numel() == 10
            out = text(inputs_embeds=x, position_ids=seg0.pos, attention_mask=ones, visual_pos_masks=image_at,
                       deepstack_visual_embeds=[deepstack[0][ids]], output_hidden_states=True)
            h = text._deepstack_process(out.hidden_states[1], image_at, deepstack[0][ids])  # layer 0 + level 0
            y = h[:, seg1.gather[0]]  # the sequence layer 1 sees (the segment's own layout)
            kept_at = torch.zeros(1, y.shape[1], dtype=torch.bool)
            kept_at[0, seg1.img_idx[0]] = True
            mask = create_causal_mask(config=text.config, inputs_embeds=y, attention_mask=torch.ones(1, y.shape[1]),
                                      cache=None, position_ids=None)
            rope = text.rotary_emb(y, seg1.pos)
            for i in range(1, len(text.layers)):
                y = text.layers[i](y, attention_mask=mask, position_embeddings=rope)
                if i < len(deepstack):
                    y = text._deepstack_process(y, kept_at, deepstack[i][kept])
            h = text.norm(y)
    with torch.no_grad():
        want = model.lm_head(h)
    assert (logits.float() - want.float()).abs().max().item() <= 1e-5


def test_qk_norm_rows_match_eager_on_a_qwen3_llm(monkeypatch):
    """Rows computed in the pre-hook of the layer read (PDrop's L == K) go through the layer's
    q_norm / k_norm (random weights here, so the norms matter) and match the eager maps of the
    stock model within 1e-5; without the norms (the bug this fixes) they do not."""
    adapter = tiny_qwen3_vl(seed=4)
    model, processor = build_tiny_qwen3_vl(seed=4)
    g = torch.Generator().manual_seed(11)
    for m in (adapter.model, model):
        for layer in m.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                with torch.no_grad():
                    norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        g = torch.Generator().manual_seed(11)  # the same weights in both copies
    image = tiny_qwen_image(GRID, seed=2, unit=unit_pixels(adapter))
    pipe = nuwa_graph.load_text("""
name: rows
nodes:
  - name: a
    type: scorer.llm-attention
    params: {layer: 2, queries: last, rope: true, softmax_over: all, heads: mean, site: llm.2}
  - name: b
    type: scorer.llm-attention
    params: {layer: 3, queries: "last:3", rope: true, softmax_over: image, heads: mean, site: llm.3}
""")
    rows: dict[str, torch.Tensor] = {}
    reader = adapter._reader

    def capture(r):
        read = reader(r)

        def inner(req, b):
            v = read(req, b)
            rows[f"{req.layer}"] = v.detach().clone()
            return v

        return inner

    monkeypatch.setattr(adapter, "_reader", capture)
    adapter.forward_logits(pipe, [image], [PROMPT])
    enc = processor(images=[image], text=[PROMPT], return_tensors="pt")
    model.set_attn_implementation({"vision_config": "sdpa", "text_config": "eager"})
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    cols = (enc["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    want2 = out.attentions[2][0][:, -1:, cols]
    sub = out.attentions[3][0][:, -3:, cols]
    want3 = sub / sub.sum(-1, keepdim=True)
    assert (rows["2"] - want2).abs().max().item() <= 1e-5
    assert (rows["3"] - want3).abs().max().item() <= 1e-5
    # the same rows without the norms are far off: the test would catch the bug
    monkeypatch.setattr(signal_rows, "head_norm", lambda attn, name, x: x)
    adapter._bound.clear()
    adapter.forward_logits(pipe, [image], [PROMPT])
    assert (rows["2"] - want2).abs().max().item() > 1e-3


def test_partial_rotary_turns_only_the_rotary_dims():
    """`apply_rope` with cos/sin narrower than the head (Qwen3.5: a quarter of it) equals the
    partial-rotary function of transformers' Qwen3.5 on the same inputs."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 7, 32, generator=g), torch.randn(4, 7, 32, generator=g)
    angles = torch.randn(7, 4, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # rotary dim 8 of 32
    want_q, want_k = apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None])
    assert torch.equal(apply_rope(q, cos, sin), want_q[0]) and torch.equal(apply_rope(k, cos, sin), want_k[0])
    assert torch.equal(apply_rope(q, cos, sin)[..., 8:], q[..., 8:])
    full_cos, full_sin = torch.cat([cos] * 4, -1), torch.cat([sin] * 4, -1)
    assert not torch.equal(apply_rope(q, full_cos, full_sin)[..., 8:], q[..., 8:])
