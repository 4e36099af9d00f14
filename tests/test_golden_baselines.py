"""Fidelity of the field's baselines against the official-code golden files (issue 22): DART,
DivPrune, VisPruner, FasterVLM, HiPrune, CDPruner, G-Prune, VTW.

Each case loads the shipped pipeline YAML, runs it with `Executor.run_all` on the golden
geometry (LLaVA-1.5: 24x24 grid, image at sequence position 35) with the golden inputs fed as
the signal tensors, and compares node by node (the values each node left in the run state)
and end to end (the Keep actions, played on the token-stream model of test_golden_llm): indices
and position ids exactly and in the official order, features within 1e-5. Where a file gives
the official intermediate (a distance matrix, a kernel, scores), the step alone is also fed it.
A missing golden folder fails these tests (tests/_golden.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nuwa_graph.adapters.llava import attention_columns
from nuwa_graph.executor import Executor, tokens_per_layer
from nuwa_graph.nodes.scorer_graph import propagation_scores
from nuwa_graph.nodes.scorer_relevance import instruction_relevance
from nuwa_graph.nodes.selector_diversity import bipartite_dedup, greedy_max_min, unit_rows
from nuwa_graph.nodes.selector_dpp import dpp_kernel, greedy_dpp
from nuwa_graph.nodes.selector_pivots import pivot_picks, visiting_order
from nuwa_graph.pipeline import load
from nuwa_graph.signal_kinds import LLMKeys, LLMTokenHidden
from nuwa_graph.types import TEXT_ID_BASE, Geometry
from tests._golden import golden_file
from tests.test_golden_llm import Stream

PIPES = Path(__file__).resolve().parents[1] / "pipelines"
S, N, GRID = 35, 576, (24, 24)
TOL = 1e-5


def _assert_stream(keep, S: int, N: int, L: int, want_src, want_positions, rows, want_rows) -> Stream:
    """A Keep applied to a stream of S text, N image and L - S - N text tokens gives the official
    code's kept sequence positions, position ids and rows, exactly; returns the stream."""
    st = Stream(S, N, L - S - N, S)
    src = torch.tensor(st.apply(keep))
    assert torch.equal(src, want_src)
    assert torch.equal(st.positions(), want_positions)
    assert torch.equal(rows[src], want_rows)
    return st

def golden(name: str):
    path = golden_file(f"{name}.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), json.loads(meta["params"])


def run(pipeline: str, overrides: dict, signals: dict):
    """Run a shipped pipeline on the golden geometry; `signals` maps a request key (or kind) to a tensor."""
    ex = Executor(load(PIPES / pipeline, overrides))
    given = {}
    for req in ex.requests():
        key = req.key if req.key in signals else req.kind
        assert key in signals, f"{pipeline} asks for {req.key}, not given by the test"
        given[req.key] = signals[key]
    state = ex.run_all([Geometry(GRID, image_start=S)], signals=given)
    return state, state.actions[0]


def value(state, node: str, port: str = "selection"):
    return state.values[(node, port)][0]


# --- DART ------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_dart(budget):
    t, params = golden(f"dart_b{budget}")
    k = t["k_states_layer1"]  # (32, L, 16) post-RoPE keys of layer 1
    L = k.shape[1]
    h = t["hidden_layer1_out"]
    # the final norm the adapter applies (llm.token_hidden norm=final) on these rows: RMSNorm, eps 1e-5
    normed = t["final_norm_weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (normed - t["derived_last_layer_state"]).abs().max().item() <= 1e-6
    state_h = t["derived_last_layer_state"]
    signals = {LLMKeys.make("llm.keys", "llm.2", layer=1, rope=True, tokens="image").key: k[:, S:S + N],
               LLMKeys.make("llm.keys", "llm.2", layer=1, rope=True, tokens="text").key: k[:, S + N:],
               LLMTokenHidden.make("llm.token_hidden", "llm.2", layer=2, tokens="image", norm="final").key:
                   state_h[S:S + N],
               LLMTokenHidden.make("llm.token_hidden", "llm.2", layer=2, tokens="text", norm="final").key:
                   state_h[S + N:]}
    state, acts = run("dart.yaml", {"budget": budget}, signals)
    # node by node: the key L1 norms, the pivots in topk order
    assert torch.equal(value(state, "image_keys", "scores").values, t["derived_image_key_l1"])
    assert torch.equal(value(state, "text_keys", "scores").values, t["derived_text_key_l1"])
    assert torch.equal(value(state, "image_pivots").ids + S, t["expected_image_pivot_positions"])
    assert torch.equal(value(state, "text_pivots").ids - TEXT_ID_BASE + S + N, t["expected_text_pivot_positions"])
    # the visiting order (CPython set order) and every pivot's picks, in topk order
    positions = (t["expected_image_pivot_positions"].tolist() + t["expected_text_pivot_positions"].tolist())
    order = visiting_order(positions, "set")
    assert [positions[i] for i in order] == t["derived_pivot_loop_order"].tolist()
    rows = [state_h[p] for p in positions]
    pool = torch.ones(N, dtype=torch.bool)
    pool[t["expected_image_pivot_positions"] - S] = False
    for similarity in ("cosine-similarity", "matmul"):  # the official call bit for bit, or one product
        p = pool.clone()
        _, picks = pivot_picks(state_h[S:S + N], rows, positions, p, params["TOKEN_TOPK"], "set", similarity)
        assert torch.equal(torch.stack(picks) + S, t["derived_picks_per_pivot"])
    # end to end: budget + 4 image tokens kept from layer 2 on, original ids (PESP)
    (keep,) = acts
    assert keep.site == "llm.2" and keep.positions is None and keep.tokens is None
    assert keep.ids.numel() == budget + 4 == params["n_retained_image_tokens"]
    assert set((keep.ids + S).tolist()) == set(t["expected_retained_image_tokens_index"].tolist())
    _assert_stream(keep, S, N, L, t["expected_keep_indexs"], t["expected_position_ids_after"], h,
                   t["expected_hidden_after"])
    assert tokens_per_layer([keep], N, 32) == [576, 576] + [budget + 4] * 30


def test_dart_visiting_order_matters():
    """Visiting the pivots in topk order instead of set order keeps other tokens (the trap)."""
    t, params = golden("dart_b128")
    state_h = t["derived_last_layer_state"]
    positions = t["expected_image_pivot_positions"].tolist() + t["expected_text_pivot_positions"].tolist()
    rows = [state_h[p] for p in positions]
    kept = {}
    for visit in ("set", "given"):
        pool = torch.ones(N, dtype=torch.bool)
        pool[t["expected_image_pivot_positions"] - S] = False
        kept[visit] = set(torch.cat(pivot_picks(state_h[S:S + N], rows, positions, pool, 16, visit)[1]).tolist())
    assert kept["set"] != kept["given"]


# --- DivPrune --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [("divprune_b64", {"budget": 64}), ("divprune_b128", {"budget": 128}),
                                             ("divprune_b192", {"budget": 192}),
                                             ("divprune_official_r0.098", {"budget": "official"})])
def test_divprune(name, overrides):
    t, params = golden(name)
    k = params["threshold_terms"]
    picks_official = t["expected_selected_seq_positions"] - S
    # the greedy step alone on the official distance matrix: every pick, in greedy order
    assert torch.equal(greedy_max_min(t["expected_cosine_matrix"], k, repeat=True), picks_official)
    assert torch.equal(greedy_max_min(t["expected_cosine_matrix"], k), picks_official)
    # the distance matrix the node computes (one mm of the unit rows), bit for bit
    x = unit_rows(t["visual_tokens"])
    assert torch.equal(1.0 - torch.mm(x, x.t()), t["expected_cosine_matrix"])
    state, acts = run("divprune.yaml", overrides, {"pre_llm.visual": t["visual_tokens"]})
    (keep,) = acts
    assert keep.site == "pre_llm" and keep.ids.numel() == k
    assert torch.equal(keep.ids, torch.sort(picks_official).values)
    assert keep.positions.policy == "perc" and torch.equal(keep.positions.offsets, torch.arange(k))
    L = t["inputs_embeds"].shape[0]
    _assert_stream(keep, S, N, L, t["expected_keep_indexs"], t["derived_position_ids_after"], t["inputs_embeds"],
                   t["expected_inputs_embeds_after"])


def test_divprune_repeats_only_when_asked():
    """The official loop picks the same token again on constant features; the node does not."""
    dist = 1.0 - torch.ones(6, 6)  # every token identical
    assert greedy_max_min(dist, 3, repeat=True).tolist() == [0, 0, 0]
    assert sorted(greedy_max_min(dist, 3).tolist()) == [0, 1, 2]


# --- VisPruner -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [("vispruner_b64", {"budget": 64}), ("vispruner_b128", {"budget": 128}),
                                             ("vispruner_b192", {"budget": 192}),
                                             ("vispruner_b64_r0.75", {"budget": 64, "important_ratio": 0.75})])
def test_vispruner(name, overrides):
    t, params = golden(name)
    state, acts = run("vispruner.yaml", overrides, {"vision.cls_attention": t["attn_cls"][:, 1:],
                                                    "vision.hidden": t["hidden"][1:]})
    assert torch.equal(value(state, "cls_attention", "scores").values, t["derived_head_mean_attention"])
    important = value(state, "important").ids
    assert torch.equal(important, t["expected_important_patch_ids"])  # argsort order
    assert torch.equal(value(state, "diverse").ids, t["expected_diverse_patch_ids"])  # the order the loop leaves
    # the de-duplication alone, fed the official ranking
    x = unit_rows(t["hidden"][1:])
    ranked = t["derived_attention_argsort"][params["important_token_num"]:]
    for gram in (False, True):  # the official per-round products, or one Gram matrix: the same on these files
        assert torch.equal(bipartite_dedup(x, ranked, params["diverse_token_num"], 8, gram),
                           t["expected_diverse_patch_ids"])
    (keep,) = acts
    assert keep.site == "vision" and keep.tokens is None
    assert torch.equal(keep.ids, t["derived_kept_patch_ids"])
    assert keep.positions.policy == "perc"
    assert (t["hidden"][1:][keep.ids] - t["expected_tokens"]).abs().max().item() <= TOL  # projector stubbed: identity


def test_vispruner_odd_important_count_runs():
    """int(T * r) odd crashes the official code (shape mismatch); the de-dup handles odd lists."""
    t, _ = golden("vispruner_b64")
    state, acts = run("vispruner.yaml", {"budget": 63, "important_ratio": 0.5},
                      {"vision.cls_attention": t["attn_cls"][:, 1:], "vision.hidden": t["hidden"][1:]})
    assert acts[0].ids.numel() == 63 and acts[0].ids.unique().numel() == 63


# --- FasterVLM -------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_fastervlm(budget):
    t, _ = golden(f"fastervlm_b{budget}")
    state, acts = run("fastervlm.yaml", {"budget": budget}, {"vision.cls_attention": t["attn_cls"][:, 1:]})
    scores = value(state, "cls_attention", "scores").values
    assert torch.equal(scores, t["expected_head_mean_attention"])
    assert torch.equal(torch.topk(scores[None], budget, dim=1).indices[0], t["expected_topk_patch_ids"])
    (keep,) = acts
    assert torch.equal(keep.ids, t["derived_kept_patch_ids"])
    assert keep.positions.policy == "perc" and torch.equal(keep.positions.offsets, torch.arange(budget))
    assert (t["hidden"][1:][keep.ids] - t["expected_tokens"]).abs().max().item() <= TOL


# --- HiPrune ---------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_hiprune(budget):
    t, params = golden(f"hiprune_b{budget}")
    # the adapter's column mean (head mean, then mean over all 577 queries, CLS key dropped)
    obj = attention_columns(t["q_object"], t["k_object"], 0.125)[1, 1:]
    out = attention_columns(t["q_output"], t["k_output"], 0.125)[1, 1:]
    assert (obj - t["derived_object_layer_score"]).abs().max().item() <= 1e-9
    assert (out - t["derived_output_layer_score"]).abs().max().item() <= 1e-9
    pipe = load(PIPES / "hiprune.yaml", {"budget": budget})
    layers = sorted(r.layer for r in Executor(pipe).requests())
    assert layers == [-2, params["object_attention_index"]]  # object layer 9 (1-based) = index 8; output -2
    for o, u in ((t["derived_object_layer_score"], t["derived_output_layer_score"]), (obj, out)):
        signals = {"vision.attention_received(layer=8,queries=mean)": o,
                   "vision.attention_received(layer=-2,queries=mean)": u}
        state, acts = run("hiprune.yaml", {"budget": budget}, signals)
        assert torch.equal(value(state, "anchors").ids, t["expected_anchor_patch_ids"])  # topk order
        assert value(state, "anchors").ids.numel() == params["anchor_count"]
        assert set(value(state, "buffers").ids.tolist()) == set(t["expected_anchor_buffer_patch_ids"].tolist())
        assert torch.equal(value(state, "registers").ids, t["expected_register_patch_ids"])  # topk order
        (keep,) = acts
        assert torch.equal(keep.ids, t["expected_token_indices"]) and keep.ids.numel() == budget
        assert keep.positions.policy == "perc"
        assert (t["hidden"][1:][keep.ids] - t["expected_tokens"]).abs().max().item() <= TOL


def test_hiprune_anchor_count_rounds_as_the_official_code():
    """round(T * alpha / 5) (half to even) equals round(T * (alpha / 5)) for every T up to 20000."""
    assert all(round(T * 0.1 / 5) == round(T * (0.1 / 5)) for T in range(1, 20001))
    assert round(125 * 0.1 / 5) == 2 and round(25 * 0.1 / 5) == 0


# --- CDPruner --------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_cdpruner(budget):
    t, params = golden(f"cdpruner_b{budget}")
    r = instruction_relevance(t["image_embeds"], t["text_embeds"], negate=True)
    assert (r - t["derived_relevance"]).abs().max().item() <= 1e-6
    kernel = dpp_kernel(t["image_features"], t["derived_relevance"])
    assert (kernel - t["derived_kernel"]).abs().max().item() <= 1e-6
    # the greedy DPP alone on the official kernel: every pick, in greedy order
    assert torch.equal(greedy_dpp(t["derived_kernel"], budget), t["expected_greedy_order"])
    state, acts = run("cdpruner.yaml", {"budget": budget}, {
        "pre_llm.visual": t["image_features"], "vision.clip_embeds": t["image_embeds"],
        "vision.clip_text_embeds": t["text_embeds"]})
    assert (value(state, "relevance", "scores").values - t["derived_relevance"]).abs().max().item() <= 1e-6
    (keep,) = acts
    assert keep.site == "pre_llm"
    assert torch.equal(keep.ids, t["expected_kept_patch_indices"])
    assert torch.equal(torch.nonzero(t["expected_index_mask"]).reshape(-1), keep.ids)
    assert keep.positions.policy == "perc" and torch.equal(keep.positions.offsets, torch.arange(budget))
    assert (t["image_features"][keep.ids] - t["expected_kept_features"]).abs().max().item() <= TOL


def test_cdpruner_constant_relevance_keeps_the_budget():
    """The official min-max divides by zero on a constant relevance (NaN: 2 tokens survive);
    here it counts as 1 everywhere and the DPP keeps the budget by diversity alone."""
    r = instruction_relevance(torch.ones(10, 4), torch.ones(1, 4), negate=True)
    assert torch.equal(r, torch.ones(10))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    picks = greedy_dpp(dpp_kernel(x, r), 6)
    assert picks.unique().numel() == 6


def test_cdpruner_duplicates_do_not_turn_into_nan():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x])  # every token twice: the kernel has rank 4
    picks = greedy_dpp(dpp_kernel(x, None), 6)
    assert picks.unique().numel() == 6 and set(picks[:4].remainder(4).tolist()) == {0, 1, 2, 3}


# --- G-Prune ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides", [("gprune_b64", {"budget": 64}), ("gprune_b128", {"budget": 128}),
                                             ("gprune_b192", {"budget": 192}),
                                             ("gprune_official_r0.5", {"budget": "official"})])
@pytest.mark.parametrize("propagate", ["vector", "matrix-power"])
def test_gprune(name, overrides, propagate):
    t, params = golden(name)
    k = params["kept"]
    scores, degree = propagation_scores(t["image_feature"], 0.5, 0.03, 5, propagate)
    assert torch.equal(degree, t["derived_degree"])
    assert torch.allclose(scores, t["derived_scores"], rtol=1e-5, atol=0)
    pipe = load(PIPES / "gprune.yaml", overrides)
    pipe.nodes["graph"] = type(pipe.nodes["graph"])("graph", {**pipe.nodes["graph"].params.model_dump(),
                                                              "propagate": propagate})
    state = Executor(pipe).run_all([Geometry(GRID, image_start=S)], signals={"pre_llm.visual": t["image_feature"]})
    got = value(state, "graph", "scores").values
    order = torch.topk(got, k).indices
    assert set(order.tolist()) == set(t["expected_keep_indices1"].tolist())
    if params["min_relative_gap_within_topk"] > 1e-5:  # the official topk order where float noise cannot swap it
        assert torch.equal(order, t["expected_keep_indices1"])
    (keep,) = state.actions[0]
    assert torch.equal(keep.ids, t["expected_image_keep_indices"])
    assert keep.positions.policy == "pesp"
    n_text = t["expected_position_ids"].numel() - S - k
    st = Stream(S, N, n_text, S)
    src = torch.tensor(st.apply(keep))
    assert torch.equal(st.positions(), t["expected_position_ids"])  # PESP: the text keeps its unpruned ids
    assert torch.equal(src[S:S + k] - S, t["expected_image_keep_indices"])
    assert (t["image_feature"][keep.ids] - t["expected_kept_features"]).abs().max().item() <= TOL
    # decoding continues after the last (unpruned) id, as llava_llama.py does
    assert torch.equal(st.positions()[-1] + 1 + torch.arange(3), t["expected_decode_position_ids"])


# --- VTW -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, budget", [("vtw_b64", 64), ("vtw_b128", 128), ("vtw_b192", 192),
                                          ("vtw_official_k16", None)])
def test_vtw(name, budget):
    t, params = golden(name)
    K = params["K"]
    pipe = load(PIPES / "vtw.yaml", {} if budget is None else {"budget": budget})
    state = Executor(pipe).run_all([Geometry(GRID, image_start=S)])
    (keep,) = state.actions[0]
    assert keep.site == f"llm.{K}" and keep.ids.numel() == 0 and keep.positions is None
    assert tokens_per_layer([keep], N, 32) == t["derived_visual_tokens_per_layer"].tolist()
    L = t["hidden_in"].shape[0]
    st = _assert_stream(keep, S, N, L, t["expected_kept_seq_positions"], t["expected_position_ids_after"],
                        t["hidden_in"], t["expected_hidden_after"])
    assert torch.equal(t["expected_layer_seq_len"], torch.tensor([L] * K + [L - N] * (32 - K)))
    # decoding continues with the unpruned numbering (the adapter's rule: last prompt id + 1)
    assert torch.equal(st.positions()[-1] + 1 + torch.arange(3), t["expected_decode_position_ids"])
