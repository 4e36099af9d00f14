"""The Qwen-VL adapters on their tiny offline presets (fp32, CPU, seconds): every test runs on
each generation (`qwen2_5_vl`: tiny-qwen, window attention; `qwen2_vl`: tiny-qwen2-vl, no
windows; `qwen3_vl`: tiny-qwen3-vl, DeepStack and QK-norm), against an independent copy of the
same stock model."""

from __future__ import annotations

import sys

import pytest
import torch

import nuwa_graph
from nuwa_graph.errors import RunError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.types import Scores

qwen = pytest.importorskip("nuwa_graph.adapters.qwen")
tiny = pytest.importorskip("nuwa_graph.adapters.tiny")
tiny_vl = pytest.importorskip("nuwa_graph.adapters.tiny_qwen_vl")

GRID_A = tiny.TINY_GRID  # 5 x 7
GRID_B = (4, 6)
N_A = GRID_A[0] * GRID_A[1]
N_B = GRID_B[0] * GRID_B[1]
# family -> (preset factory, (model, processor) builder with the same seed)
FAMILIES = {
    "qwen2_5_vl": (tiny.tiny_qwen, tiny.build_tiny_qwen),
    "qwen2_vl": (tiny_vl.tiny_qwen2_vl, tiny_vl.build_tiny_qwen2_vl),
    "qwen3_vl": (tiny_vl.tiny_qwen3_vl, tiny_vl.build_tiny_qwen3_vl),
}

# ---- a test-only probe node: reads one signal, keeps the raw tensor -------------------------
PROBED: dict[str, list[torch.Tensor]] = {}


class ProbeParams(NodeParams):
    kind: str
    site: str = "vision"
    args: dict = {}


@register
class QwenTestProbe(Node):
    """Reads any signal and stores it in PROBED (tests only)."""

    type_name = "scorer.qwen-test-probe"
    family = "scorer"
    outputs = {"scores": Port(Scores)}
    Params = ProbeParams

    def site(self):
        from nuwa_graph.sites import Site

        return Site(self.params.site)

    def request(self):
        return SignalRequest.make(self.params.kind, self.params.site, **self.params.args)

    def requests(self):
        return [self.request()]

    def run(self, ctx):
        v = ctx.signal(self.request())
        PROBED.setdefault(self.name, []).append(v.detach().clone())
        return {"scores": Scores(torch.zeros(ctx.present.numel()), ctx.present.clone())}


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapter(family):
    return FAMILIES[family][0]()


@pytest.fixture(scope="module")
def reference(family):
    """An independent copy of the same tiny model (same seed) for stock / eager references."""
    model, processor = FAMILIES[family][1]()
    return model, processor


@pytest.fixture(autouse=True)
def _clear_probe():
    PROBED.clear()


@pytest.fixture(scope="module")
def unit(adapter) -> int:
    """Pixels per merged token side: the test images are sized in merged tokens."""
    return tiny_vl.unit_pixels(adapter)


def image(grid, seed: int, unit: int):
    return tiny.tiny_qwen_image(grid, seed=seed, unit=unit)


def images_prompts(unit: int):
    return ([image(GRID_A, 1, unit), image(GRID_B, 2, unit)],
            [tiny.tiny_qwen_prompt("what is the color of the shape ?"), tiny.tiny_qwen_prompt("how many ?")])


def window_index(model, grid_thw) -> torch.Tensor:
    """The stock tower's order of merge units: windows on Qwen2.5-VL, raster without windows."""
    from transformers.vision_utils import get_vision_window_index

    vc = model.config.vision_config
    if getattr(vc, "window_size", None) is None:
        return torch.arange(int((grid_thw.prod(-1) // 4).sum()))
    return get_vision_window_index(grid_thw, 2, vc.window_size, vc.patch_size)[0]


def keep_pipeline(k: int, site: str, policy: str | None, score_site: str | None = None) -> nuwa_graph.Pipeline:
    score_site = score_site or ("vision" if site in ("vision", "pre_llm") else site)
    pos_node = ""
    pos_input = ""
    if policy is not None:
        pos_node = f"""
  - name: pos
    type: position-reencoder.policy
    params: {{policy: {policy}}}
    inputs: {{selection: sel.selection}}"""
        pos_input = ", positions: pos.positions"
    return nuwa_graph.load_text(f"""
name: keep-{k}-{site}-{policy}
nodes:
  - name: s
    type: scorer.external
    params: {{name: sc, site: {score_site}}}
  - name: sel
    type: selector.top-k
    params: {{k: {k}}}
    inputs: {{scores: s.scores}}{pos_node}
  - name: keep
    type: applier.keep
    params: {{site: {site}}}
    inputs: {{selection: sel.selection{pos_input}}}
""")


def probe_pipeline(*probes: tuple[str, str, str, dict]) -> nuwa_graph.Pipeline:
    body = "\n".join(f"""  - name: {name}
    type: scorer.qwen-test-probe
    params: {{kind: {kind}, site: {site}, args: {args!r}}}""" for name, kind, site, args in probes)
    return nuwa_graph.load_text(f"name: probe\nnodes:\n{body}\n")


def scores(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


# ---- invariant 1: keep everything == the unmodified model -------------------------------------
@pytest.mark.parametrize("site,policy", [("pre_llm", "pesp"), ("vision", None), ("llm.2", "pesp"), ("llm.1", None)])
def test_keep_everything_is_identical(adapter, reference, site, policy, unit):
    model, processor = reference
    img = image(GRID_A, 1, unit)
    prompt = tiny.tiny_qwen_prompt()
    enc = processor(images=[img], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
    logits, run = adapter.forward_logits(keep_pipeline(N_A, site, policy), [img], [prompt], external={"sc": scores(N_A, 0)})
    assert logits.shape == ref.shape
    assert torch.equal(logits, ref)
    # and generation with the cache follows the stock generate (which uses the model's rope deltas)
    rep = adapter.generate(keep_pipeline(N_A, site, policy), [img], [prompt], max_new_tokens=4,
                           external={"sc": scores(N_A, 0)}, return_logits=True, stop_at_eos=False)
    g = model.generate(**enc, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       eos_token_id=None)
    for a, b in zip(rep.step_logits, g.logits):
        assert torch.allclose(a, b.float(), atol=1e-5, rtol=0)


# ---- invariant 2: cached decoding == cache-free recompute of the same pruned sequence ---------
CASES = [("pre_llm", "pesp"), ("pre_llm", "perc"), ("pre_llm", "rpme"), ("vision", None),
         ("llm.2", "pesp"), ("llm.2", "perc"), ("llm.2", "rpme"), ("llm.1", None)]


@pytest.mark.parametrize("site,policy", CASES)
def test_cached_decoding_matches_recompute(adapter, site, policy, unit):
    imgs, prompts = images_prompts(unit)
    k = 9
    ext = {"sc": [scores(N_A, 1), scores(N_B, 2)]}
    pipe = keep_pipeline(k, site, policy)
    steps = 4
    rep = adapter.generate(pipe, imgs, prompts, max_new_tokens=steps, external=ext, return_logits=True, stop_at_eos=False)
    assert all(len(t) == steps for t in rep.new_tokens)
    extra = [t[:-1] for t in rep.new_tokens]
    logits, run = adapter.forward_logits(pipe, imgs, prompts, external=ext, extra_ids=extra)
    cached = torch.stack(rep.step_logits, dim=1)  # (B, steps, V)
    recomputed = logits[:, -steps:].float()
    assert (cached - recomputed).abs().max().item() <= 1e-5
    # the budget is reported per layer: full grid before the prune, k after it
    n_layers = adapter.n_layers
    K = 0 if site in ("vision", "pre_llm") else int(site.split(".")[1])
    for b, n in enumerate((N_A, N_B)):
        assert rep.visual_tokens_per_layer[b] == [n] * K + [k] * (n_layers - K)
    # pruning changed the answer logits (the test would be vacuous otherwise)
    full = adapter.generate(probe_pipeline(("p", "pre_llm.visual", "pre_llm", {})), imgs, prompts, max_new_tokens=1,
                            return_logits=True)
    assert (full.step_logits[0] - rep.step_logits[0]).abs().max() > 1e-4


# ---- a left-padded batch of 2 == single runs --------------------------------------------------
@pytest.mark.parametrize("site,policy", [("pre_llm", "rpme"), ("llm.2", "pesp"), ("llm.1", "perc")])
def test_left_padded_batch_equals_single_runs(adapter, site, policy, unit):
    imgs, prompts = images_prompts(unit)
    ext = [scores(N_A, 3), scores(N_B, 4)]
    pipe = keep_pipeline(10, site, policy)
    batch = adapter.generate(pipe, imgs, prompts, max_new_tokens=3, external={"sc": ext}, return_logits=True,
                             stop_at_eos=False)
    for b in range(2):
        single = adapter.generate(pipe, [imgs[b]], [prompts[b]], max_new_tokens=3, external={"sc": [ext[b]]},
                                  return_logits=True, stop_at_eos=False)
        assert single.new_tokens[0] == batch.new_tokens[b]
        for s, t in zip(single.step_logits, batch.step_logits):
            assert (s[0] - t[b]).abs().max().item() <= 1e-5
        assert single.kept[0] == batch.kept[b]


# ---- positions ----------------------------------------------------------------------------------
def test_positions_3d_policies(adapter, unit):
    imgs, prompts = images_prompts(unit)
    enc = adapter.encode(imgs[:1], prompts[:1])
    lay = adapter.split_sample(enc, 0)
    s = int(lay.pos_image[0, 0])
    rows, cols = GRID_A
    ids = torch.tensor([1, 9, 16, 33])  # (0,1) (1,2) (2,2) (4,5)
    from nuwa_graph.nodes.positions import plan_positions

    pesp = adapter.visual_positions(lay, ids, plan_positions(ids, "pesp", N_A))
    assert pesp.tolist() == [[s] * 4, [s + 0, s + 1, s + 2, s + 4], [s + 1, s + 2, s + 2, s + 5]]
    perc = adapter.visual_positions(lay, ids, plan_positions(ids, "perc", N_A))
    assert perc.tolist() == [[s, s + 1, s + 2, s + 3]] * 3
    rpme = adapter.visual_positions(lay, ids, plan_positions(ids, "rpme", N_A))
    # rows {0,1,2,4} -> span 4: 0, ceil(1*4/4)=1, 2, 4; cols {1,2,5} -> span 6: 0, ceil(2*6/5)=3, 6
    assert rpme.tolist() == [[s] * 4, [s + 0, s + 1, s + 2, s + 4], [s + 0, s + 3, s + 3, s + 6]]
    # the unpruned layout is get_rope_index's: text after the image continues at s + max(rows, cols)
    assert int(lay.pos_post[0, 0]) == s + max(rows, cols)
    assert lay.pos_image[1].tolist() == [s + r for r in range(rows) for _ in range(cols)]


def test_decode_positions_continue_with_rope_deltas(adapter, reference, unit):
    """PESP keeps the text's unpruned ids, so the sequence ends where the stock model's rope
    deltas say (length + delta - 1); PERC compacts the text after the image."""
    model, processor = reference
    imgs, prompts = images_prompts(unit)
    enc = processor(images=imgs[:1], text=prompts[:1], return_tensors="pt")
    _, delta = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], image_grid_thw=enc["image_grid_thw"])
    L = enc["input_ids"].shape[1]
    ext = {"sc": [scores(N_A, 5)]}
    _, run = adapter.forward_logits(keep_pipeline(8, "pre_llm", "pesp"), imgs[:1], prompts[:1], external=ext)
    assert run.segments[0].pos[:, 0, -1].tolist() == [L - 1 + int(delta)] * 3
    _, run = adapter.forward_logits(keep_pipeline(8, "pre_llm", "perc"), imgs[:1], prompts[:1], external=ext)
    s = run.layouts[0].image_start
    n_post = run.layouts[0].post_ids.numel()
    assert run.segments[0].pos[:, 0, -1].tolist() == [s + 8 + n_post - 1] * 3


# ---- signals -------------------------------------------------------------------------------------
def _eager_reference_maps(model, processor, imgs, prompts):
    """Stock forward with eager attention everywhere: text maps via output_attentions, vision
    maps recorded from the stock eager function (vision attention modules return outputs only)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager_attention_forward = sys.modules[type(model).__module__].eager_attention_forward

    vis_maps: dict[int, list[torch.Tensor]] = {}
    index = {id(b.attn): i for i, b in enumerate(model.model.visual.blocks)}

    def recording(module, q, k, v, attention_mask, **kw):
        out, w = eager_attention_forward(module, q, k, v, attention_mask, **kw)
        if id(module) in index:
            vis_maps.setdefault(index[id(module)], []).append(w.detach())
        return out, w

    AttentionInterface.register("qwen_test_recording", recording)
    enc = processor(images=imgs, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    try:
        model.set_attn_implementation({"vision_config": "qwen_test_recording", "text_config": "eager"})
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa", "text_config": "sdpa"})
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop("qwen_test_recording", None)
    return enc, out, vis_maps


def test_attention_received_matches_eager(adapter, reference, unit, family):
    model, processor = reference
    imgs, prompts = images_prompts(unit)
    enc, _, vis_maps = _eager_reference_maps(model, processor, imgs, prompts)
    depth = len(model.model.visual.blocks)
    pipe = probe_pipeline(*[(f"b{i}", "vision.attention_received", "vision", {"layer": i}) for i in range(depth)],
                          ("last", "vision.attention_received", "vision", {"layer": -1}))
    adapter.forward_logits(pipe, imgs, prompts)
    order = window_index(model, enc["image_grid_thw"])
    for i in range(depth):
        per_patch = torch.cat([w[0].mean(0).sum(0) for w in vis_maps[i]])  # window-permuted patch order
        per_unit = per_patch.reshape(-1, 4).mean(1)
        raster = torch.empty_like(per_unit)
        raster[order] = per_unit
        ref = torch.split(raster, [N_A, N_B])
        for b in range(2):
            assert PROBED[f"b{i}"][b].shape == (ref[b].numel(),)
            assert torch.allclose(PROBED[f"b{i}"][b], ref[b], atol=1e-5, rtol=0)
    for b in range(2):
        assert torch.equal(PROBED["last"][b], PROBED[f"b{depth - 1}"][b])
    # Qwen2.5-VL: window blocks distribute the attention of each window only, full blocks over the image
    full = set(getattr(model.config.vision_config, "fullatt_block_indexes", None) or range(depth))
    assert full and (any(i not in full for i in range(depth)) or family != "qwen2_5_vl")


def test_llm_attention_rows_match_eager(adapter, reference, unit):
    model, processor = reference
    imgs, prompts = images_prompts(unit)
    enc, out, _ = _eager_reference_maps(model, processor, imgs, prompts)
    ids = enc["input_ids"]
    image_cols = [(row == model.config.image_token_id).nonzero().flatten() for row in ids]
    probes = [
        ("last1", "llm.attention", "llm.2", {"layer": 1, "queries": "last", "rope": True, "softmax_over": "all"}),
        ("last3", "llm.attention", "llm.3", {"layer": 2, "queries": "last:3", "rope": True, "softmax_over": "all"}),
        ("text2", "llm.attention", "llm.2", {"layer": 2, "queries": "text", "rope": True, "softmax_over": "all"}),
        ("img1", "llm.attention", "llm.2", {"layer": 1, "queries": "last", "rope": True, "softmax_over": "image"}),
        ("hid", "llm.hidden", "llm.2", {"layer": 2}),
        ("pre3", "llm.attention", "llm.3", {"layer": 3, "queries": "last:2", "rope": True, "softmax_over": "all"}),
    ]
    adapter.forward_logits(probe_pipeline(*probes), imgs, prompts)
    L = ids.shape[1]
    deepstack = _deepstack_rows(model, enc, level=1)
    for b in range(2):
        cols = image_cols[b]
        post = int(cols[-1]) + 1
        a1 = out.attentions[1][b]
        assert torch.allclose(PROBED["last1"][b], a1[:, L - 1:, cols], atol=1e-5, rtol=0)
        a2 = out.attentions[2][b]
        assert torch.allclose(PROBED["last3"][b], a2[:, L - 3:, cols], atol=1e-5, rtol=0)
        assert torch.allclose(PROBED["text2"][b], a2[:, post:, cols], atol=1e-5, rtol=0)
        sub = a1[:, L - 1:, cols]
        assert torch.allclose(PROBED["img1"][b], sub / sub.sum(-1, keepdim=True), atol=1e-5, rtol=0)
        # rows computed in the pre-hook of the layer read (L == K; QK-norm on Qwen3-VL)
        assert torch.allclose(PROBED["pre3"][b], out.attentions[3][b][:, L - 2:, cols], atol=1e-5, rtol=0)
        # the input of layer 2; on Qwen3-VL the stock `hidden_states[2]` is layer 1's output
        # BEFORE its DeepStack rows are added (the text model adds them after recording it)
        ref = out.hidden_states[2][b, cols] + (deepstack[b] if deepstack is not None else 0)
        assert torch.allclose(PROBED["hid"][b], ref, atol=1e-5, rtol=0)


def _deepstack_rows(model, enc, level: int):
    """Per sample, the DeepStack rows of `level` (raster order), or None without DeepStack."""
    if not getattr(model.config.vision_config, "deepstack_visual_indexes", None):
        return None
    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    return out.deepstack_features[level]


def test_vision_hidden_signals(adapter, reference, unit):
    model, processor = reference
    imgs, prompts = images_prompts(unit)
    enc = processor(images=imgs, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    vis = model.model.visual
    with torch.no_grad():
        vo = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"], output_hidden_states=True)
    hs = vo.hidden_states  # window order; hs[0] = patch embeddings, hs[i] = output of block i - 1
    order = window_index(model, enc["image_grid_thw"])

    def raster(x):
        out = torch.empty_like(x)
        out[order] = x
        return torch.split(out, [N_A, N_B])

    probes = [("h2", "vision.hidden", "vision", {"layer": 2}),
              ("hm", "vision.hidden_mean", "vision", {"start": 1, "stop": 4}),
              ("mm", "vision.merged_hidden_mean", "vision", {"start": 1, "stop": 3}),
              ("mmw", "vision.merged_hidden_mean", "vision", {"start": 1, "stop": 3, "order": "window"}),
              ("pv", "pre_llm.visual", "pre_llm", {})]
    adapter.forward_logits(probe_pipeline(*probes), imgs, prompts)
    with torch.no_grad():
        h2 = raster(hs[2].reshape(-1, 4 * hs[2].shape[-1]))
        hm = raster(torch.stack(hs[1:4]).mean(0).reshape(-1, 4 * hs[2].shape[-1]))
        mean_blocks = torch.stack(hs[2:4]).mean(0)  # outputs of blocks 1..2
        mm_window = vis.merger(mean_blocks)
        mm = raster(mm_window)
        pv = torch.split(vo.pooler_output, [N_A, N_B])
    for b in range(2):
        assert torch.allclose(PROBED["h2"][b], h2[b], atol=1e-5)
        assert torch.allclose(PROBED["hm"][b], hm[b], atol=1e-5)
        assert torch.allclose(PROBED["mm"][b], mm[b], atol=1e-5)
        assert torch.allclose(PROBED["pv"][b], pv[b], atol=1e-5)
    assert torch.allclose(PROBED["mmw"][0], mm_window[:N_A], atol=1e-5)
    # the projector of vision-space tokens is the merger: final merge units -> the LLM's image rows
    units = raster(hs[-1].reshape(-1, 4 * hs[-1].shape[-1]))
    with torch.no_grad():
        assert torch.allclose(adapter.project(units[0]), pv[0], atol=1e-5)


# ---- refusals and clean-up ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vision.cls_attention", "vision.cls_hidden", "vision.keys", "vision.qk_single_head"])
def test_cls_signals_are_refused_before_any_forward(adapter, kind, unit):
    calls = []
    h = adapter.model.register_forward_pre_hook(lambda *a: calls.append(1))
    h2 = adapter.model.model.visual.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        pipe = probe_pipeline(("cls", kind, "vision", {"layer": -2}))
        imgs, prompts = images_prompts(unit)
        with pytest.raises(RunError) as info:
            adapter.generate(pipe, imgs, prompts, max_new_tokens=2)
    finally:
        h.remove()
        h2.remove()
    msg = str(info.value)
    assert kind in msg and "vision.attention_received" in msg and "CLS" in msg
    assert not calls


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_model_unchanged_after_an_error(adapter, reference, unit):
    model, processor = reference
    imgs, prompts = images_prompts(unit)
    before_hooks = _hook_count(adapter.model)
    impls = (adapter.model.config.vision_config._attn_implementation, adapter.model.config.text_config._attn_implementation)
    # k larger than the tokens present at llm.2 -> the selector fails in the middle of the forward
    with pytest.raises(RunError, match="k=99"):
        adapter.generate(keep_pipeline(99, "llm.2", "pesp"), imgs, prompts, max_new_tokens=2,
                         external={"sc": [scores(N_A, 0), scores(N_B, 0)]})
    # missing external values -> fails in the vision site
    with pytest.raises(RunError, match="external"):
        adapter.generate(keep_pipeline(5, "pre_llm", "pesp"), imgs, prompts, max_new_tokens=2)
    assert _hook_count(adapter.model) == before_hooks == 0
    assert (adapter.model.config.vision_config._attn_implementation,
            adapter.model.config.text_config._attn_implementation) == impls
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not [k for k in ALL_ATTENTION_FUNCTIONS._global_mapping if k.startswith("nuwa_rows_qwen")]
    enc = processor(images=imgs[:1], text=prompts[:1], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(adapter.model(**enc).logits, model(**enc).logits)


def test_bad_vision_layer_is_refused(adapter, unit):
    pipe = probe_pipeline(("a", "vision.attention_received", "vision", {"layer": 9}))
    imgs, prompts = images_prompts(unit)
    with pytest.raises(RunError, match="out of range"):
        adapter.forward_logits(pipe, imgs, prompts)


def test_load_adapter_preset(family):
    from nuwa_graph.adapters import PRESETS, load_adapter

    preset = {"qwen2_5_vl": "tiny-qwen", "qwen2_vl": "tiny-qwen2-vl", "qwen3_vl": "tiny-qwen3-vl"}[family]
    ad = load_adapter(preset)
    assert preset in PRESETS and isinstance(ad, qwen.QwenAdapter) and ad.family == family
    assert ad.model_variables()["family_group"] == "qwen-vl" and ad.model_variables()["has_cls"] is False


def test_plain_question_gets_the_chat_template_and_bad_prompts_are_clear(adapter, unit):
    imgs, _ = images_prompts(unit)
    pipe = nuwa_graph.load_text("name: v\nnodes:\n  - {name: k, type: random-dropper.uniform, params: {ratio: 1.0}}\n"
                                "  - {name: a, type: applier.keep, params: {site: pre_llm}, inputs: {selection: k.selection}}\n")
    rep = adapter.generate(pipe, imgs[:1], ["what colour is the square?"], max_new_tokens=1)
    assert rep.visual_tokens_avg[0] == rep.visual_tokens_full
    two_blocks = adapter.prompt("a") + "<|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(nuwa_graph.RunError, match="exactly one"):
        adapter.generate(pipe, imgs[:1], [two_blocks], max_new_tokens=1)


# ---- a checkpoint folder (what --model Qwen/Qwen3-VL-8B-Instruct downloads) -------------------------
def test_a_saved_checkpoint_folder_loads_through_the_same_path(adapter, family, unit, tmp_path):
    """The tiny model written as a checkpoint folder (config, safetensors weights, tokenizer,
    preprocessor config) loads through `load_adapter(path)` -> the family's `from_pretrained`,
    the path a hub id takes, and runs as the preset does (no torchvision needed)."""
    from nuwa_graph.adapters import load_adapter

    adapter.model.save_pretrained(tmp_path)
    adapter.processor.tokenizer.save_pretrained(tmp_path)
    adapter.processor.image_processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path))
    assert type(loaded) is type(adapter) and loaded.family == family and loaded.name == str(tmp_path)
    imgs, prompts = images_prompts(unit)
    for pipe in (nuwa_graph.load_text("name: v\nnodes:\n  - {name: k, type: random-dropper.uniform, params: {ratio: 1.0}}\n"
                                      "  - {name: a, type: applier.keep, params: {site: pre_llm}, "
                                      "inputs: {selection: k.selection}}\n"),
                 keep_pipeline(7, "llm.1", None)):
        ext = {"sc": [scores(N_A, 8), scores(N_B, 9)]}
        want, _ = adapter.forward_logits(pipe, imgs, prompts, external=ext)
        got, _ = loaded.forward_logits(pipe, imgs, prompts, external=ext)
        assert torch.equal(got, want)
