"""The baselines' signals on the families merged after issue 22 (Qwen2-VL / Qwen3-VL, LLaVA-NeXT,
InternVL, LLaVA-OneVision), each against the stock model's own computation:

- `llm.keys` on the LLMs with a QK-norm (Qwen3-VL's Qwen3, InternVL3.5's Qwen3): the keys before
  RoPE equal what the stock layer's `k_norm` outputs in a stock forward (random norm weights, so
  a missing or misplaced norm fails), and the post-RoPE keys read in the layer's attention call
  equal those computed at its input from its projections;
- `vision.attention_received` on LLaVA-NeXT, per crop: each crop's column sum / mean of its own
  eager CLIP attention map;
- what LLaVA-OneVision and InternVL refuse, before any forward pass, with the reason.
"""

from __future__ import annotations

import pytest
import torch

from nuwa_graph import RunError, load_text
from nuwa_graph.adapters import load_adapter
from tests.test_signals_baselines import (  # noqa: F401  (the probe node)
    PROBES,
    PROMPT,
    _local_nodes,  # noqa: F401  (registers the probe node)
    probe,
    read,
)


def _image_for(adapter):
    from tests.test_matrix import image_for

    return image_for(adapter)


@pytest.fixture(autouse=True)
def _clear():
    PROBES.clear()


@pytest.mark.parametrize("preset", ["tiny-qwen3-vl", "tiny-internvl"])
def test_llm_keys_apply_the_qk_norm_as_the_stock_layer(preset):
    adapter = load_adapter(preset, "float32", "cpu")
    attn = adapter.decoder_layers()[1].self_attn
    assert getattr(attn, "k_norm", None) is not None
    with torch.no_grad():  # random norm weights: a missing norm is far off
        g = torch.Generator().manual_seed(0)
        for layer in adapter.decoder_layers():
            for name in ("q_norm", "k_norm"):
                w = getattr(layer.self_attn, name).weight
                w.copy_(torch.rand(w.shape, generator=g) * 2 + 0.25)
    image = _image_for(adapter)
    pre, at_call, at_input = read(adapter, image, ("llm.keys", "llm.2", {"layer": 1, "rope": False}),
                                  ("llm.keys", "llm.2", {"layer": 1}),  # layer 1's attention call
                                  ("llm.keys", "llm.1", {"layer": 1}))  # layer 1's input, its projections
    seen = []
    hook = attn.k_norm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    enc = adapter.encode([image], [PROMPT])
    try:
        with torch.no_grad():
            extra = {}
            if "image_grid_thw" in enc.vision_inputs:  # M-RoPE reads which tokens are the image's
                extra["mm_token_type_ids"] = (enc.input_ids == adapter.model.config.image_token_id).long()
            adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs, **extra)
    finally:
        hook.remove()
    img = (enc.input_ids[0] == adapter.model.config.image_token_id).nonzero().flatten()
    ref = seen[0][0, img].transpose(0, 1)  # (kv_heads, n, hd), the stock k_norm output
    ref = ref.repeat_interleave(pre.shape[0] // ref.shape[0], dim=0)
    assert pre.shape == ref.shape
    assert (pre - ref).abs().max().item() <= 1e-5
    assert at_call.shape == at_input.shape == ref.shape
    assert (at_call - at_input).abs().max().item() <= 1e-4


def test_llava_next_attention_received_is_each_crops_own_column_reduction():
    adapter = load_adapter("tiny-llava-next", "float32", "cpu")
    image = _image_for(adapter)
    adapter.forward_logits(load_text(probe(("vision.attention_received", "vision", {"layer": -2}),
                                           ("vision.attention_received", "vision", {"layer": 1, "queries": "mean"}))),
                           [image], [PROMPT])
    sums, means = PROBES.pop("p0"), PROBES.pop("p1")  # one value per crop: the probe runs per crop
    enc = adapter.encode([image], [PROMPT])
    n = enc.vision_inputs["pixel_values"].shape[1]
    assert len(sums) == len(means) == n > 1
    tower = adapter.vision_tower()
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(enc.vision_inputs["pixel_values"][0], output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    for c in range(n):
        a2 = out.attentions[-2][c].float().mean(dim=0)
        a1 = out.attentions[1][c].float().mean(dim=0)
        assert (sums[c] - a2.sum(dim=0)[1:]).abs().max().item() <= 1e-5
        assert (means[c] - a1.mean(dim=0)[1:]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("preset, kind, says", [
    ("tiny-llava-onevision", "vision.attention_received", "does not capture SigLIP's attention"),
    ("tiny-internvl", "vision.attention_received", "not available for the internvl family"),
    ("tiny-llava-next", "vision.clip_text_embeds", "relevance=llm"),
    ("tiny-internvl", "vision.clip_embeds", "CLIP text tower"),
])
def test_families_refuse_what_they_cannot_give_before_any_forward(preset, kind, says, monkeypatch):
    adapter = load_adapter(preset, "float32", "cpu")

    def no_forward(*a, **k):
        raise AssertionError("a forward pass started")

    monkeypatch.setattr(adapter, "vision_forward", no_forward)
    monkeypatch.setattr(adapter, "encode", no_forward)
    with pytest.raises(RunError, match="cannot run") as err:
        adapter.generate(load_text(probe((kind, "vision", {}))), [_image_for(adapter)], [PROMPT], max_new_tokens=1)
    assert says in str(err.value)
