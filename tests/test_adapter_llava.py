"""The LLaVA adapter on the tiny preset (fp32, CPU, offline): invariants 1, 2, 4, 5, 7 and errors."""

from __future__ import annotations

import json

import pytest
import torch
from _probes import eager_llava_reference, signal_probe

from nuwa_graph import RunError, load_text, registry
from nuwa_graph.adapters import load_adapter
from nuwa_graph.adapters.tiny import build_tiny_llava
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import Site
from nuwa_graph.types import Scores, Selection, Tokens

PROMPT = "what color is the circle ?"
PROMPT2 = "how many shapes are there in the image and where is the red square ?"
N = 64  # visual tokens of the tiny preset (8 x 8)
PROBES: dict[str, list[torch.Tensor]] = {}


# --- test-local nodes (registered only while this module runs) ------------------------------
Probe = signal_probe("scorer.test-probe-llava", lambda name, value: PROBES.setdefault(name, []).append(value))


class ThresholdParams(NodeParams):
    above: float = 0.0


class Threshold(Node):
    """Keeps tokens scoring above a threshold (a different count per sample)."""

    type_name = "selector.test-threshold-llava"
    family = "selector"
    inputs = {"scores": Port(Scores)}
    outputs = {"selection": Port(Selection)}
    Params = ThresholdParams

    def run(self, ctx, scores):
        return {"selection": Selection(torch.sort(scores.ids[scores.values > self.params.above]).values)}


class MergeParams(NodeParams):
    site: str
    space: str


class MeanMerge(Node):
    """Kept rows + the mean of the dropped rows (a toy merger), in vision or llm space."""

    type_name = "merger.test-mean-llava"
    family = "merger"
    inputs = {"selection": Port(Selection)}
    outputs = {"tokens": Port(Tokens)}
    Params = MergeParams

    def site(self):
        return Site(self.params.site)

    def _req(self):
        if self.params.space == "vision":
            return SignalRequest.make("vision.hidden", "vision", layer=-2)
        return SignalRequest.make("llm.hidden", self.params.site, layer=Site(self.params.site).layer)

    def requests(self):
        return [self._req()]

    def run(self, ctx, selection):
        h = ctx.signal(self._req())
        pos = {int(t): j for j, t in enumerate(ctx.present.tolist())}
        keep = torch.tensor([pos[int(t)] for t in selection.ids])
        drop = torch.ones(len(pos), dtype=torch.bool)
        drop[keep] = False
        vals = h[keep] + 0.5 * h[drop].mean(0, keepdim=True)
        return {"tokens": Tokens(vals, selection.ids.clone(), self.params.space)}


LOCAL_NODES = (Probe, Threshold, MeanMerge)


@pytest.fixture(scope="module", autouse=True)
def _local_nodes():
    registry.ensure_loaded()
    for cls in LOCAL_NODES:
        registry.register(cls)
    yield
    for cls in LOCAL_NODES:
        registry._REGISTRY.pop(cls.type_name, None)


@pytest.fixture(autouse=True)
def _clear_probes():
    PROBES.clear()


def keep_yaml(site: str, k: int = 16, policy: str | None = None, selector: str = "selector.top-k") -> str:
    params = f"{{k: {k}}}" if selector == "selector.top-k" else "{above: 0.0}"
    text = f"""
name: test-keep
nodes:
  - name: s
    type: scorer.external
    params: {{name: sc, site: vision}}
  - name: k
    type: {selector}
    params: {params}
    inputs: {{scores: s.scores}}
"""
    if policy:
        text += f"""  - name: pos
    type: position-reencoder.policy
    params: {{policy: {policy}}}
    inputs: {{selection: k.selection}}
  - name: a
    type: applier.keep
    params: {{site: {site}}}
    inputs: {{selection: k.selection, positions: pos.positions}}
"""
    else:
        text += f"""  - name: a
    type: applier.keep
    params: {{site: {site}}}
    inputs: {{selection: k.selection}}
"""
    return text


def scores(seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


def stock_logits(model, proc, image, prompt) -> torch.Tensor:
    enc = proc(images=[image], text=["USER: <image>\n" + prompt + " ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


# --- invariant 1 ----------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["vision", "pre_llm", "llm.0", "llm.2"])
def test_keep_everything_is_the_stock_model(tiny_llava, tiny_image, site):
    ref = stock_logits(tiny_llava.model, tiny_llava.processor, tiny_image, PROMPT)
    pipe = load_text(keep_yaml(site, k=N))
    logits, run = tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT], external={"sc": scores()})
    assert logits.shape == ref.shape
    assert torch.equal(logits, ref)
    assert run.counts == [[N] * 4]


# --- invariant 2 ----------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["vision", "pre_llm", "llm.2"])
@pytest.mark.parametrize("policy", ["pesp", "perc", "rpme"])
def test_cached_decoding_equals_recompute(tiny_llava, tiny_image, site, policy):
    pipe = load_text(keep_yaml(site, k=12, policy=policy))
    ext = {"sc": scores(1)}
    T = 5
    rep = tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=T, external=ext, stop_at_eos=False,
                              return_logits=True)
    assert len(rep.new_tokens[0]) == T
    cached = torch.stack(rep.step_logits)[:, 0]  # (T, V)
    full, run = tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT], external=ext,
                                          extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    recomputed = full[0, -T:].float()
    assert (cached - recomputed).abs().max().item() <= 1e-5
    expect = [12] * 4 if site != "llm.2" else [N, N, 12, 12]
    assert rep.visual_tokens_per_layer == [expect]
    assert rep.visual_tokens_avg == [sum(expect) / 4]
    kept = sorted(torch.topk(ext["sc"], 12).indices.tolist())
    assert rep.kept[0][site] == kept


@pytest.mark.parametrize("site,space", [("vision", "vision"), ("llm.2", "llm")])
def test_merged_tokens_cached_equals_recompute(tiny_llava, tiny_image, site, space):
    text = f"""
name: merge
nodes:
  - name: s
    type: scorer.external
    params: {{name: sc, site: vision}}
  - name: k
    type: selector.top-k
    params: {{k: 10}}
    inputs: {{scores: s.scores}}
  - name: m
    type: merger.test-mean-llava
    params: {{site: {site}, space: {space}}}
    inputs: {{selection: k.selection}}
  - name: pos
    type: position-reencoder.policy
    params: {{policy: pesp}}
    inputs: {{selection: k.selection}}
  - name: a
    type: applier.keep
    params: {{site: {site}}}
    inputs: {{tokens: m.tokens, positions: pos.positions}}
"""
    pipe = load_text(text)
    ext = {"sc": scores(8)}
    T = 4
    rep = tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=T, external=ext, stop_at_eos=False,
                              return_logits=True)
    full, _ = tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT], external=ext,
                                        extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    assert (torch.stack(rep.step_logits)[:, 0] - full[0, -T:]).abs().max().item() <= 1e-5
    assert rep.actions[0][-1]["merged"] and rep.actions[0][-1]["kept"] == 10
    plain = tiny_llava.generate(load_text(keep_yaml(site, k=10, policy="pesp")), [tiny_image], [PROMPT],
                                max_new_tokens=1, external=ext, return_logits=True)
    assert not torch.equal(plain.step_logits[0], rep.step_logits[0])  # the merged rows were used


def test_positions_follow_the_plan(tiny_llava, tiny_image):
    """PERC compacts the text after the image; PESP/RPME keep its original ids."""
    got = {}
    for policy in ("pesp", "perc", "rpme"):
        pipe = load_text(keep_yaml("vision", k=8, policy=policy))
        _, run = tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT], external={"sc": scores(2)})
        got[policy] = run.segments[0].pos[0, 0]
    s = run.layouts[0].image_start
    ids = torch.sort(torch.topk(scores(2), 8).indices).values
    assert torch.equal(got["pesp"][s:s + 8], s + ids)
    assert torch.equal(got["perc"][s:s + 8], s + torch.arange(8))
    assert int(got["rpme"][s]) == s and int(got["rpme"][s + 7]) == s + N - 1
    n_post = len(got["pesp"]) - s - 8
    assert torch.equal(got["pesp"][s + 8:], s + N + torch.arange(n_post))
    assert torch.equal(got["rpme"][s + 8:], s + N + torch.arange(n_post))
    assert torch.equal(got["perc"][s + 8:], s + 8 + torch.arange(n_post))


def test_llm_site_positions_and_kv(tiny_llava, tiny_image):
    pipe = load_text(keep_yaml("llm.2", k=10, policy="perc"))
    rep = tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=3, external={"sc": scores(3)},
                              stop_at_eos=False)
    vanilla = tiny_llava.generate(load_text(keep_yaml("llm.2", k=N)), [tiny_image], [PROMPT], max_new_tokens=3,
                                  external={"sc": scores(3)}, stop_at_eos=False)
    # layers 2 and 3 hold 54 fewer keys: 2 layers x (k + v) x 2 kv heads x 16 dims x 4 bytes
    assert vanilla.kv_cache_bytes - rep.kv_cache_bytes == 54 * 2 * 2 * 2 * 16 * 4


# --- invariant 4: rows equal eager maps --------------------------------------------------------


def _probe_yaml(kind: str, site: str, **args) -> str:
    return f"""
name: probe
nodes:
  - name: p
    type: scorer.test-probe-llava
    params: {{kind: {kind}, site: {site}, args: {json.dumps(args)}}}
"""


def test_vision_rows_equal_eager(tiny_llava, tiny_image):
    model, enc, vis, out, img = eager_llava_reference(tiny_image, PROMPT)
    for layer in (-2, 0, 3):
        tiny_llava.forward_logits(load_text(_probe_yaml("vision.cls_attention", "vision", layer=layer)), [tiny_image],
                                  [PROMPT])
        got = PROBES.pop("p")[0]
        ref = vis.attentions[layer][0, :, 0, 1:]
        assert got.shape == (4, N)
        assert (got - ref).abs().max().item() <= 1e-5


def test_vision_hidden_keys_and_qk(tiny_llava, tiny_image):
    model, enc, vis, out, img = eager_llava_reference(tiny_image, PROMPT)
    hs = vis.hidden_states
    checks = {
        ("vision.hidden", (("layer", -2),)): hs[-2][0, 1:],
        ("vision.cls_hidden", (("layer", -2),)): hs[-2][0, 0],
        ("vision.hidden_mean", (("start", 1), ("stop", 4))): torch.stack([h[0, 1:] for h in hs[1:4]]).mean(0),
    }
    layer3 = model.model.vision_tower.encoder.layers[3]
    x = layer3.layer_norm1(hs[3])[0]
    q, k = layer3.self_attn.q_proj(x), layer3.self_attn.k_proj(x)
    checks[("vision.qk_single_head", (("layer", -1),))] = torch.stack([q, k])
    checks[("vision.keys", (("layer", -1),))] = k.view(N + 1, 4, 16).transpose(0, 1)
    for (kind, args), ref in checks.items():
        tiny_llava.forward_logits(load_text(_probe_yaml(kind, "vision", **dict(args))), [tiny_image], [PROMPT])
        got = PROBES.pop("p")[0]
        assert got.shape == ref.shape, kind
        assert (got.float() - ref.float()).abs().max().item() <= 1e-5, kind


def _llm_reference(model, out, enc, img, layer, queries, rope, softmax_over):
    attn = model.model.language_model.layers[layer].self_attn
    L = enc["input_ids"].shape[1]
    post = int(img[-1]) + 1
    qidx = {"last": torch.tensor([L - 1]), "last:3": torch.arange(L - 3, L), "text": torch.arange(post, L)}[queries]
    if rope:
        w = out.attentions[layer][0][:, qidx]  # eager: (H, q, L), post-softmax over all keys
        if softmax_over == "all":
            return w[:, :, img]
        wi = w[:, :, img]
        return wi / wi.sum(-1, keepdim=True)
    h = out.hidden_states[layer][0]
    x = model.model.language_model.layers[layer].input_layernorm(h)
    q = attn.q_proj(x[qidx]).view(len(qidx), 4, 16).transpose(0, 1)
    k = attn.k_proj(x).view(L, 2, 16).transpose(0, 1).repeat_interleave(2, dim=0)
    logits = q @ k.transpose(1, 2) * attn.scaling
    causal = torch.arange(L)[None] <= qidx[:, None]
    if softmax_over == "image":
        return torch.softmax(logits[:, :, img], -1)
    return torch.softmax(logits.masked_fill(~causal[None], float("-inf")), -1)[:, :, img]


@pytest.mark.parametrize("queries", ["last", "last:3", "text"])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("softmax_over", ["all", "image"])
@pytest.mark.parametrize("layer_site", [(1, 2), (2, 2)])
def test_llm_rows_equal_eager(tiny_llava, tiny_image, queries, rope, softmax_over, layer_site):
    layer, K = layer_site
    model, enc, vis, out, img = eager_llava_reference(tiny_image, PROMPT)
    pipe = load_text(_probe_yaml("llm.attention", f"llm.{K}", layer=layer, queries=queries, rope=rope,
                                 softmax_over=softmax_over))
    tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT])
    got = PROBES.pop("p")[0]
    with torch.no_grad():
        ref = _llm_reference(model, out, enc, img, layer, queries, rope, softmax_over)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_llm_hidden_and_pre_llm_signals(tiny_llava, tiny_image):
    model, enc, vis, out, img = eager_llava_reference(tiny_image, PROMPT)
    tiny_llava.forward_logits(load_text(_probe_yaml("llm.hidden", "llm.2", layer=2)), [tiny_image], [PROMPT])
    assert (PROBES.pop("p")[0] - out.hidden_states[2][0, img]).abs().max().item() <= 1e-5
    tiny_llava.forward_logits(load_text(_probe_yaml("pre_llm.visual", "pre_llm")), [tiny_image], [PROMPT])
    assert (PROBES.pop("p")[0] - out.hidden_states[0][0, img]).abs().max().item() <= 1e-6
    tiny_llava.forward_logits(load_text(_probe_yaml("pre_llm.text", "pre_llm")), [tiny_image], [PROMPT])
    assert (PROBES.pop("p")[0] - out.hidden_states[0][0, int(img[-1]) + 1:]).abs().max().item() <= 1e-6


def test_rows_follow_tokens_present_after_a_prune(tiny_llava, tiny_image):
    """After a pre-LLM prune, rows cover exactly the kept tokens, in stream order."""
    text = keep_yaml("vision", k=20) + """  - name: p
    type: scorer.test-probe-llava
    params: {kind: llm.attention, site: llm.2, args: {layer: 1, queries: last, rope: true, softmax_over: all}}
    inputs: {}
"""
    tiny_llava.forward_logits(load_text(text), [tiny_image], [PROMPT], external={"sc": scores(4)})
    assert PROBES["p"][0].shape == (4, 1, 20)


# --- batches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["vision", "llm.2"])
def test_left_padded_batch_equals_single_runs(tiny_llava, tiny_image, site):
    from nuwa_graph.adapters.tiny import synthetic_image

    img2 = synthetic_image(seed=5)
    pipe = load_text(keep_yaml(site, policy="pesp", selector="selector.test-threshold-llava"))
    ext = [scores(10), scores(11)]
    assert int((ext[0] > 0).sum()) != int((ext[1] > 0).sum())
    T = 4
    batch = tiny_llava.generate(pipe, [tiny_image, img2], [PROMPT, PROMPT2], max_new_tokens=T,
                                external={"sc": ext}, stop_at_eos=False, return_logits=True)
    for b, (im, pr) in enumerate([(tiny_image, PROMPT), (img2, PROMPT2)]):
        single = tiny_llava.generate(pipe, [im], [pr], max_new_tokens=T, external={"sc": [ext[b]]},
                                     stop_at_eos=False, return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        assert single.visual_tokens_per_layer[0] == batch.visual_tokens_per_layer[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5
    assert batch.visual_tokens_per_layer[0] != batch.visual_tokens_per_layer[1]


@pytest.mark.parametrize("name", ["random", "sparsevlm"])
def test_seeded_draws_follow_the_sample_not_its_place_in_the_batch(tiny_llava, tiny_image, name):
    """A random draw (random.yaml's dropper, SparseVLM's tie-break noise) is keyed on the sample's
    content: the same image and prompt keep the same tokens alone, first or second in a batch
    (so an evaluation's results do not depend on its batch size or its sharding); two different
    samples draw differently."""
    from pathlib import Path

    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.pipeline import load

    img2 = synthetic_image(seed=5)
    pipe = load(Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.yaml")
    run = lambda images, prompts: tiny_llava.generate(pipe, images, prompts, max_new_tokens=1).kept  # noqa: E731
    alone = run([img2], [PROMPT2])[0]
    second = run([tiny_image, img2], [PROMPT, PROMPT2])[1]
    first = run([img2, tiny_image], [PROMPT2, PROMPT])[0]
    assert alone == second == first
    if name == "random":  # different content, different draw (the same draw for all would also pass above)
        twin = run([img2, img2], [PROMPT2, PROMPT2 + " ?"])
        assert twin[0] != twin[1]


# --- invariant 5: hooks never outlive a run ----------------------------------------------------
def _hook_counts(adapter):
    mods = list(adapter.decoder_layers()) + list(adapter.vision_attention_modules())
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods]


def test_error_inside_pipeline_restores_the_model(tiny_llava, tiny_image):
    from transformers import AttentionInterface

    ref = stock_logits(tiny_llava.model, tiny_llava.processor, tiny_image, PROMPT)
    before = _hook_counts(tiny_llava)
    bad = """
name: bad
nodes:
  - name: s
    type: scorer.external
    params: {name: sc, site: llm.2}
  - name: k
    type: selector.top-k
    params: {k: 4}
    inputs: {scores: s.scores}
  - name: a
    type: applier.keep
    params: {site: llm.2}
    inputs: {selection: k.selection}
"""
    with pytest.raises(RunError, match="external scores 'sc' have 7 values"):
        tiny_llava.generate(load_text(bad), [tiny_image], [PROMPT], external={"sc": torch.randn(7)})
    assert _hook_counts(tiny_llava) == before
    cfg = tiny_llava.model.config
    assert cfg.text_config._attn_implementation == "sdpa" and cfg.vision_config._attn_implementation == "sdpa"
    assert tiny_llava.attn_name not in AttentionInterface._global_mapping
    assert torch.equal(stock_logits(tiny_llava.model, tiny_llava.processor, tiny_image, PROMPT), ref)


def test_two_models_do_not_interfere(tiny_llava, tiny_image):
    other = load_adapter("tiny-llava")
    other.model.load_state_dict(build_tiny_llava(seed=1)[0].state_dict())
    ref_other = stock_logits(other.model, other.processor, tiny_image, PROMPT)
    ref_self = stock_logits(tiny_llava.model, tiny_llava.processor, tiny_image, PROMPT)
    pipe = load_text(keep_yaml("llm.2", k=10, policy="pesp"))
    ext = {"sc": scores(6)}
    alone = other.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=3, external=ext, stop_at_eos=False,
                           return_logits=True)
    with tiny_llava.session():
        assert tiny_llava.attn_name != other.attn_name
        # the other model, stock and pruned, is unaffected by this one's session
        assert torch.equal(stock_logits(other.model, other.processor, tiny_image, PROMPT), ref_other)
        inside = other.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=3, external=ext, stop_at_eos=False,
                                return_logits=True)
        assert tiny_llava.model.config.text_config._attn_implementation == tiny_llava.attn_name
        assert torch.equal(stock_logits(tiny_llava.model, tiny_llava.processor, tiny_image, PROMPT), ref_self)
    assert inside.new_tokens == alone.new_tokens
    assert torch.equal(torch.stack(inside.step_logits), torch.stack(alone.step_logits))
    assert other.model.config.text_config._attn_implementation == "sdpa"


# --- reports ------------------------------------------------------------------------------------
def test_report_fields(tiny_llava, tiny_image):
    pipe = load_text(keep_yaml("llm.1", k=8, policy="pesp"))
    rep = tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=3, external={"sc": scores()},
                              stop_at_eos=False)
    assert rep.visual_tokens_per_layer == [[N, 8, 8, 8]] and rep.visual_tokens_avg == [(N + 24) / 4]
    assert rep.prefill_ms > 0 and rep.decode_ms_per_token > 0 and rep.decode_steps == 2
    assert rep.peak_memory_bytes > 0 and rep.peak_memory_source
    assert rep.kv_cache_bytes > 0
    assert set(rep.node_ms) == {"s", "k", "pos", "a"}
    assert rep.actions[0][0]["site"] == "llm.1" and rep.actions[0][0]["kept"] == 8
    json.dumps(rep.to_dict())


# --- bad inputs -----------------------------------------------------------------------------------
def test_unknown_model_id_or_path():
    with pytest.raises(RunError, match="preset"):
        load_adapter("no-such-org/no-such-model")
    with pytest.raises(RunError, match="does not exist"):
        load_adapter("/no/such/model/dir")


def test_local_path_loads_the_same_model(tiny_llava, tiny_image, tmp_path):
    tiny_llava.model.save_pretrained(tmp_path)
    tiny_llava.processor.save_pretrained(tmp_path)
    again = load_adapter(str(tmp_path))
    assert type(again).__name__ == "LlavaAdapter"
    pipe = load_text(keep_yaml("vision", k=N))
    a, _ = again.forward_logits(pipe, [tiny_image], [PROMPT], external={"sc": scores()})
    b, _ = tiny_llava.forward_logits(pipe, [tiny_image], [PROMPT], external={"sc": scores()})
    assert torch.equal(a, b)


def test_unsupported_signal_fails_before_the_forward_pass(tiny_llava, tiny_image):
    calls = []
    h = tiny_llava.vision_tower().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(RunError, match="vision.merged_hidden_mean"):
            tiny_llava.generate(load_text(_probe_yaml("vision.merged_hidden_mean", "vision", start=1, stop=3)),
                                [tiny_image], [PROMPT])
        with pytest.raises(RunError, match="past the last LLM layer"):
            tiny_llava.generate(load_text(keep_yaml("llm.9", k=4)), [tiny_image], [PROMPT],
                                external={"sc": scores()})
    finally:
        h.remove()
    assert calls == []


def test_budget_larger_than_visual_tokens(tiny_llava, tiny_image, capsys):
    with pytest.raises(RunError, match=r"k=65 is larger than the 64 tokens"):
        tiny_llava.generate(load_text(keep_yaml("vision", k=65)), [tiny_image], [PROMPT], external={"sc": scores()})
    from nuwa_graph.apps.runner import run_command

    text = """
name: rnd
variables: {budget: 100}
nodes:
  - name: r
    type: random-dropper.uniform
    params: {keep: "${budget}"}
  - name: a
    type: applier.keep
    params: {site: pre_llm}
    inputs: {selection: r.selection}
"""
    assert run_command(load_text(text), model="tiny-llava", max_new_tokens=2) == 1
    err = capsys.readouterr().err
    assert "lower 'budget'" in " ".join(err.split())


def test_image_that_fails_to_load(tmp_path, capsys):
    from nuwa_graph.apps.runner import load_image, run_command

    with pytest.raises(RunError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(RunError, match="could not be read"):
        load_image(bad)
    assert run_command(load_text(keep_yaml("vision", k=4)), image=str(bad)) == 1
    assert "could not be read" in " ".join(capsys.readouterr().err.split())


def test_run_command_defaults_and_json(capsys):
    """Default model: the embedded one (12x12 = 144 visual tokens, 16 LLM layers)."""
    from nuwa_graph.apps.runner import run_command

    text = """
name: rnd
seed: 3
nodes:
  - name: r
    type: random-dropper.uniform
    params: {keep: 16}
  - name: a
    type: applier.keep
    params: {site: llm.2}
    inputs: {selection: r.selection}
"""
    assert run_command(load_text(text), max_new_tokens=3, as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["visual_tokens_per_layer"] == [[144, 144] + [16] * 14]  # pruned at the input of llm.2
    assert data["visual_tokens_avg"] == [(2 * 144 + 14 * 16) / 16]
    assert len(data["kept"][0]["llm.2"]) == 16
    assert run_command(load_text(text), max_new_tokens=2) == 0
    out = capsys.readouterr().out
    assert "visual tokens per LLM layer" in out and "144 144 16 16" in out


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_llava, tiny_image):
    """Sampling draws from the run's seed (same seed, same answers); top_k=1 keeps only the
    argmax, so it equals greedy; bad settings are clear errors."""
    from pathlib import Path

    from nuwa_graph.adapters.base import Sampling
    from nuwa_graph.errors import RunError
    from nuwa_graph.pipeline import load

    adapter, image = tiny_llava, tiny_image
    pipe = load(Path(__file__).parents[1] / "pipelines" / "vanilla.yaml")
    args = dict(max_new_tokens=6, stop_at_eos=False)
    greedy = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], **args).answers
    hot = Sampling(do_sample=True, temperature=5.0)
    a = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], seed=1, sampling=hot, **args).answers
    b = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], seed=1, sampling=hot, **args).answers
    c = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], seed=2, sampling=hot, **args).answers
    assert a == b and a != c  # random weights at temperature 5: two seeds agree on 12 tokens by chance almost never
    top1 = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], seed=3,
                            sampling=Sampling(do_sample=True, temperature=5.0, top_k=1), **args).answers
    assert top1 == greedy
    nucleus = adapter.generate(pipe, [image, image], [PROMPT, PROMPT2], seed=3,
                               sampling=Sampling(do_sample=True, top_p=1e-9), **args).answers
    assert nucleus == greedy  # the smallest set reaching any p > 0 holds the argmax alone
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(RunError):
            Sampling(do_sample=True, **bad)


def test_run_command_exit_code_for_a_bad_pipeline_file_is_1(tmp_path):
    """docs/cli.md: 1 = an error in an input (a pipeline file); 2 is kept for usage errors."""
    from nuwa_graph.apps.runner import run_command

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes:\n  - {name: a, type: selector.no-such-type}\n")
    assert run_command(str(bad), model="tiny-llava", max_new_tokens=1) == 1
