"""The signals the field's baselines read, on every family (issue 22): `llm.keys`,
`llm.token_hidden`, `vision.attention_received` on LLaVA (sum and column mean), CDPruner's CLIP
embeddings, and what each family refuses, before any forward pass, with a hint.

References are computed from the stock model run eagerly (tiny LLaVA), or, where a family's
positions make a hand-written reference long (Qwen2.5-VL's M-RoPE), by checking that the two
ways the adapter computes the same keys (the layer's own attention call, and at its input from
its projections) agree.
"""

from __future__ import annotations

import json

import pytest
import torch
from _probes import eager_llava_reference, registered, signal_probe

from nuwa_graph import RunError, load_text
from nuwa_graph.adapters.tiny import tiny_qwen, tiny_qwen_image

PROMPT = "what color is the circle ?"
PROBES: dict[str, list[torch.Tensor]] = {}


Probe = signal_probe("scorer.test-probe-baselines", lambda name, value: PROBES.setdefault(name, []).append(value))


@pytest.fixture(scope="module", autouse=True)
def _local_nodes():
    with registered(Probe):
        yield


@pytest.fixture(autouse=True)
def _clear():
    PROBES.clear()


def probe(*specs: tuple[str, str, dict]) -> str:
    nodes = "".join(f"  - name: p{i}\n    type: scorer.test-probe-baselines\n    params: {{kind: {k}, site: {s}, "
                    f"args: {json.dumps(a)}}}\n" for i, (k, s, a) in enumerate(specs))
    return f"name: probe\nnodes:\n{nodes}"


def read(adapter, image, *specs, prompt=PROMPT) -> list[torch.Tensor]:
    adapter.forward_logits(load_text(probe(*specs)), [image], [prompt])
    return [PROBES.pop(f"p{i}")[0] for i in range(len(specs))]


@pytest.fixture(scope="module")
def eager(tiny_image):
    return eager_llava_reference(tiny_image, PROMPT)


def _rope_keys(model, h, layer, L):
    """Reference post-RoPE keys of a tiny-LLaVA decoder layer at positions arange(L), GQA repeated."""
    lm = model.model.language_model
    dec = lm.layers[layer]
    k = dec.self_attn.k_proj(dec.input_layernorm(h)).view(L, 2, 16).transpose(0, 1)
    cos, sin = lm.rotary_emb(h[None], torch.arange(L)[None])
    rot = torch.cat([-k[..., 8:], k[..., :8]], dim=-1)
    return (k * cos + rot * sin).repeat_interleave(2, dim=0)


def test_llm_keys_and_final_norm_states_equal_the_stock_model(tiny_llava, tiny_image, eager):
    model, enc, vis, out, img = eager
    L = enc["input_ids"].shape[1]
    text = torch.arange(int(img[-1]) + 1, L)
    got = read(tiny_llava, tiny_image,
               ("llm.keys", "llm.2", {"layer": 1, "tokens": "image"}),  # from layer 1's attention call
               ("llm.keys", "llm.2", {"layer": 1, "tokens": "text"}),
               ("llm.keys", "llm.2", {"layer": 2, "tokens": "image"}),  # at layer 2's input, its projections
               ("llm.keys", "llm.2", {"layer": 1, "rope": False, "tokens": "image"}),
               ("llm.token_hidden", "llm.2", {"layer": 2, "tokens": "image", "norm": "final"}),
               ("llm.token_hidden", "llm.2", {"layer": 2, "tokens": "text", "norm": "final"}),
               ("llm.token_hidden", "llm.2", {"layer": 2, "tokens": "text"}))
    with torch.no_grad():
        hs = out.hidden_states
        k1 = _rope_keys(model, hs[1][0], 1, L)
        k2 = _rope_keys(model, hs[2][0], 2, L)
        dec1 = model.model.language_model.layers[1]
        k1_pre = dec1.self_attn.k_proj(dec1.input_layernorm(hs[1][0])).view(L, 2, 16).transpose(0, 1)
        norm = model.model.language_model.norm
        refs = [k1[:, img], k1[:, text], k2[:, img], k1_pre[:, img].repeat_interleave(2, dim=0),
                norm(hs[2][0, img]), norm(hs[2][0, text]), hs[2][0, text]]
    for g, r in zip(got, refs):
        assert g.shape == r.shape
        assert (g - r).abs().max().item() <= 1e-5


def test_llm_keys_follow_the_tokens_present_after_a_prune(tiny_llava, tiny_image):
    """Keys captured at layer 1 are read at llm.3 after a prune at llm.2: the rows of the kept tokens."""
    yaml = probe(("llm.keys", "llm.2", {"layer": 1, "tokens": "image"})) + """
  - {name: n, type: scorer.llm-key-norm, params: {layer: 1, site: llm.2}}
  - {name: k, type: selector.top-k, params: {k: 10, order: index}, inputs: {scores: n.scores}}
  - {name: a, type: applier.keep, params: {site: llm.2}, inputs: {selection: k.selection}}
  - name: p1
    type: scorer.test-probe-baselines
    params: {kind: llm.keys, site: llm.3, args: {layer: 1, tokens: image}}
"""
    rep = tiny_llava.generate(load_text(yaml), [tiny_image], [PROMPT], max_new_tokens=1)
    full, kept = PROBES.pop("p0")[0], PROBES.pop("p1")[0]
    assert full.shape[1] == 64 and kept.shape[1] == 10
    norms = full.permute(1, 0, 2).reshape(64, -1).norm(p=1, dim=-1)
    top = torch.sort(torch.topk(norms, 10).indices).values
    assert torch.equal(kept, full[:, top])
    assert rep.visual_tokens_per_layer[0] == [64, 64, 10, 10]


@pytest.mark.parametrize("layer", [0, -2])
def test_attention_received_is_the_column_mean_of_the_eager_map(tiny_llava, tiny_image, eager, layer):
    model, enc, vis, out, img = eager
    s, m = read(tiny_llava, tiny_image, ("vision.attention_received", "vision", {"layer": layer}),
                ("vision.attention_received", "vision", {"layer": layer, "queries": "mean"}))
    ref = vis.attentions[layer][0].float().mean(dim=0)  # (65, 65): heads averaged
    assert (s - ref.sum(dim=0)[1:]).abs().max().item() <= 1e-5
    assert (m - ref.mean(dim=0)[1:]).abs().max().item() <= 1e-6
    assert s.dtype == m.dtype == torch.float32


def test_clip_embeddings_use_the_text_tower_and_77_token_chunks(tiny_llava, tiny_image, eager):
    model, enc, vis, out, img = eager
    clip = tiny_llava.clip()
    long_q = " ".join(["what color is the red circle left of the blue square ?"] * 8)  # > 77 tokens
    for question, rows in ((PROMPT, 1), (long_q, 2)):
        image, text = read(tiny_llava, tiny_image, ("vision.clip_embeds", "vision", {"layer": -2}),
                           ("vision.clip_text_embeds", "vision", {}), prompt=question)
        ids = clip.tokenizer(question)["input_ids"]
        assert text.shape == (rows, 64) and (len(ids) - 1) // 77 + 1 == rows
        padded = torch.tensor(ids + [0] * (rows * 77 - len(ids))).reshape(rows, 77)
        with torch.no_grad():
            ref = clip.text_model(input_ids=padded, attention_mask=(torch.arange(rows * 77) < len(ids)).long()
                                  .reshape(rows, 77)).text_embeds
            post = model.model.vision_tower.post_layernorm(vis.hidden_states[-2][0, 1:])
            ref_img = clip.visual_projection(post.float())
        assert (text - ref).abs().max().item() <= 1e-5
        assert (image - ref_img).abs().max().item() <= 1e-5
        assert image.dtype == text.dtype == torch.float32


def test_cdpruner_says_which_relevance_is_in_force(tiny_llava, tiny_image):
    from nuwa_graph import load

    rep = tiny_llava.generate(load("pipelines/cdpruner.yaml", {"budget": 144}), [tiny_image], [PROMPT],
                              max_new_tokens=1)
    assert rep.schedule["variables"]["relevance"]["value"] == "clip"
    assert "clip_text=True" in rep.schedule["variables"]["relevance"]["from"]
    assert any(s.startswith("vision.clip_text_embeds") for s in rep.signals)
    forced = tiny_llava.generate(load("pipelines/cdpruner.yaml", {"budget": 144, "relevance": "llm"}), [tiny_image],
                                 [PROMPT], max_new_tokens=1)
    assert any(s.startswith("pre_llm.text") for s in forced.signals)
    assert forced.schedule["variables"]["relevance"] == {"value": "llm", "from": "set, exact"}


# --- Qwen2.5-VL ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen(), tiny_qwen_image((6, 8), seed=1)


def test_qwen_keys_from_the_attention_call_equal_those_from_the_projections(qwen):
    """M-RoPE keys of layer 1 read in its attention call (llm.2) and computed at its input (llm.1)."""
    adapter, image = qwen
    a, b, hid = read(adapter, image, ("llm.keys", "llm.2", {"layer": 1, "tokens": "image"}),
                     ("llm.keys", "llm.1", {"layer": 1, "tokens": "image"}),
                     ("llm.token_hidden", "llm.2", {"layer": 2, "tokens": "text", "norm": "final"}))
    assert a.shape == b.shape == (4, 48, 16)
    assert (a - b).abs().max().item() <= 1e-5
    assert hid.dim() == 2 and hid.shape[1] == 64
    t1, t2 = read(adapter, image, ("llm.keys", "llm.2", {"layer": 1, "tokens": "text"}),
                  ("llm.keys", "llm.1", {"layer": 1, "tokens": "text"}))
    assert (t1 - t2).abs().max().item() <= 1e-5 and t1.shape[1] == hid.shape[0]


@pytest.mark.parametrize("kind, args, says", [
    ("vision.clip_embeds", {}, "relevance=llm"), ("vision.clip_text_embeds", {}, "relevance=llm"),
    ("vision.attention_received", {"layer": -1, "queries": "mean"}, "queries: sum")])
def test_qwen_refuses_what_it_cannot_give_before_any_forward(qwen, kind, args, says, monkeypatch):
    adapter, image = qwen

    def no_forward(*a, **k):
        raise AssertionError("a forward pass started")

    monkeypatch.setattr(adapter, "vision_forward", no_forward)
    with pytest.raises(RunError, match="cannot run") as err:
        adapter.generate(load_text(probe((kind, "vision", args))), [image], [PROMPT], max_new_tokens=1)
    assert says in str(err.value)


def test_the_embedded_model_has_no_clip_text_tower_and_cdpruner_uses_the_llm_variant():
    from nuwa_graph import load
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.apps.models import default_model

    adapter = load_adapter(default_model(), "float32", "cpu")
    assert adapter.model_variables()["clip_text"] is False
    rep = adapter.generate(load("pipelines/cdpruner.yaml"), [synthetic_image()], [PROMPT], max_new_tokens=1)
    assert rep.schedule["variables"]["relevance"]["value"] == "llm"
    with pytest.raises(RunError, match="relevance=llm"):
        adapter.generate(load("pipelines/cdpruner.yaml", {"relevance": "clip"}), [synthetic_image()], [PROMPT],
                         max_new_tokens=1)


@pytest.mark.parametrize("name, overrides", [("dart", {"budget": 144}), ("cdpruner", {"budget": 144}),
                                             ("hiprune", {"budget": 144}), ("vtw", {"budget": 144})])
def test_a_left_padded_batch_equals_single_runs(tiny_llava, name, overrides):
    """Text rows (DART's text pivots), the question per sample (CDPruner) and per-sample vision
    scores (HiPrune) follow each sample of a left-padded batch."""
    from nuwa_graph import load
    from nuwa_graph.adapters.tiny import synthetic_image

    images = [synthetic_image(seed=s) for s in (0, 5)]
    prompts = [PROMPT, "how many shapes are there in the image and where is the red square ?"]
    pipe = load(f"pipelines/{name}.yaml", overrides)
    batch = tiny_llava.generate(pipe, images, prompts, max_new_tokens=2, stop_at_eos=False, return_logits=True)
    for b in range(2):
        one = tiny_llava.generate(pipe, [images[b]], [prompts[b]], max_new_tokens=2, stop_at_eos=False,
                                  return_logits=True)
        assert batch.kept[b] == one.kept[0]
        assert batch.visual_tokens_per_layer[b] == one.visual_tokens_per_layer[0]
        diff = (torch.stack(batch.step_logits)[:, b] - torch.stack(one.step_logits)[:, 0]).abs().max()
        assert diff.item() <= 1e-4
