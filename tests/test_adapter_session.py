"""The adapter's run machinery on tiny-llava: the checks return problems as data, a pipeline
is bound to the model once, the projector runs once per visual token, and the mask and RoPE
tables of a pruned segment are built once per segment and step, not per layer."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from nuwa_graph import RunError, load
from nuwa_graph.adapters import generation, layout, session
from nuwa_graph.adapters.layout import Segment, decode_mask, prefill_mask
from nuwa_graph.executor import Executor
from nuwa_graph.pipeline import Pipeline
from nuwa_graph.resources import shipped_pipeline

PROMPT = "what color is the circle ?"


def shipped(name: str, **overrides) -> Pipeline:
    return load(shipped_pipeline(name), overrides=overrides or None)


# --- check_pipeline: a list of problems --------------------------------------------------------
def test_check_pipeline_returns_an_empty_list_for_a_runnable_pipeline(tiny_llava):
    ex = Executor(shipped("fastv").bind_model(tiny_llava.model_variables()))
    assert tiny_llava.check_pipeline(ex) == []


@pytest.fixture
def no_llm_signals(tiny_llava):
    """tiny-llava's model behind a family that gives no LLM signal."""
    class NoLlmSignals(type(tiny_llava)):
        supported_signals = frozenset({"external"})

    return NoLlmSignals(tiny_llava.model, tiny_llava.processor, name="no-llm-signals")


def test_check_pipeline_lists_every_problem_without_raising(no_llm_signals):
    ex = Executor(shipped("fastv", K=6))  # not bound: the model's depth is only known here
    problems = no_llm_signals.check_pipeline(ex)
    assert len(problems) == 2
    assert problems[0].startswith("site llm.6 is past the last LLM layer (3); change K (now 6)")
    assert problems[1].startswith("signal 'llm.attention' (read at llm.6) is not available for the llava family")


def test_a_refused_pipeline_is_refused_on_every_call_and_not_cached(no_llm_signals, tiny_image):
    pipe = shipped("fastv")
    for _ in range(2):
        with pytest.raises(RunError, match=r"pipeline 'fastv' cannot run on no-llm-signals:\n  - signal "
                                           r"'llm.attention' \(read at llm.1\) is not available"):
            no_llm_signals.generate(pipe, tiny_image, PROMPT, max_new_tokens=1)
    assert not no_llm_signals._bound


# --- bind once per (pipeline, adapter) ---------------------------------------------------------------
def test_a_pipeline_is_bound_once_per_adapter(tiny_llava, tiny_image, monkeypatch):
    calls = []
    bind = Pipeline.bind_model

    def counting(self, model_vars):
        calls.append(self.name)
        return bind(self, model_vars)

    monkeypatch.setattr(Pipeline, "bind_model", counting)
    pipe = shipped("fastv")
    first = tiny_llava.generate(pipe, tiny_image, PROMPT, max_new_tokens=2)
    again = tiny_llava.generate(pipe, tiny_image, PROMPT, max_new_tokens=2)
    logits, _ = tiny_llava.forward_logits(pipe, tiny_image, PROMPT)
    assert calls == ["fastv"]
    assert again.new_tokens == first.new_tokens and logits.shape[0] == 1
    tiny_llava.generate(shipped("fastv"), tiny_image, PROMPT, max_new_tokens=1)  # another object: bound anew
    assert calls == ["fastv", "fastv"]


def test_the_bound_pipelines_kept_are_bounded(tiny_llava, monkeypatch):
    monkeypatch.setattr(generation, "BOUND_CACHE_SIZE", 2)
    pipes = [shipped("random") for _ in range(3)]
    executors = [tiny_llava._bind(p) for p in pipes]
    assert len(tiny_llava._bound) <= 2
    assert tiny_llava._bind(pipes[2]) is executors[2]  # the most recent is still there
    assert tiny_llava._bind(pipes[0]) is not executors[0]  # the oldest was dropped and is rebuilt


# --- the projector runs once ----------------------------------------------------------------------
def _count_projector(adapter) -> list[int]:
    rows: list[int] = []
    handle = adapter.model.model.multi_modal_projector.register_forward_hook(
        lambda m, args, out: rows.append(int(args[0].shape[:-1].numel())))
    return rows, handle


@pytest.mark.parametrize("batch", [1, 2])
def test_a_vision_space_merger_is_projected_once_not_after_the_full_set(tiny_llava, tiny_image, batch):
    rows, handle = _count_projector(tiny_llava)
    try:
        rep = tiny_llava.generate(shipped("visionzip"), [tiny_image] * batch, [PROMPT] * batch, max_new_tokens=1)
    finally:
        handle.remove()
    kept = rep.visual_tokens_per_layer[0][0]
    assert kept < 64
    # one call per sample, on its merged tokens only (before: a first call on all 64 x batch tokens)
    assert rows == [kept] * batch


def test_an_unmerged_block_is_projected_once_in_one_batch(tiny_llava, tiny_image):
    rows, handle = _count_projector(tiny_llava)
    try:
        tiny_llava.generate(shipped("fastv"), [tiny_image] * 2, [PROMPT] * 2, max_new_tokens=2)
    finally:
        handle.remove()
    assert rows == [2 * 64]


# --- tables once per segment and step -----------------------------------------------------------------
def test_rope_and_masks_are_built_once_per_segment_and_step(tiny_llava, tiny_image, monkeypatch):
    counts = {"rotary": 0, "prefill_mask": 0, "decode_mask": 0}
    rotary = tiny_llava.rotary

    def counting_rotary(h, pos):
        counts["rotary"] += 1
        return rotary(h, pos)

    def counting(name, fn):
        def wrapped(*args):
            counts[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(tiny_llava, "rotary", counting_rotary)
    monkeypatch.setattr(session, "prefill_mask", counting("prefill_mask", layout.prefill_mask))
    monkeypatch.setattr(session, "decode_mask", counting("decode_mask", layout.decode_mask))
    rep = tiny_llava.generate(shipped("fastv"), tiny_image, PROMPT, max_new_tokens=5, stop_at_eos=False)
    assert rep.decode_steps == 4
    assert [s["site"] for s in rep.actions[0]] == ["llm.1"]  # one pruned segment: layers 1..3
    assert counts == {"rotary": 1 + rep.decode_steps, "prefill_mask": 1, "decode_mask": rep.decode_steps}


@pytest.mark.parametrize("name,overrides,hooked_steps", [("random", {"budget": 64}, False), ("fastv", {}, True)])
def test_one_segment_decodes_as_the_stock_model(tiny_llava, tiny_image, monkeypatch, name, overrides, hooked_steps):
    """A run that keeps one segment (no llm.K prune) decodes without layer hooks and, unpadded,
    without a mask, as the stock model does; a pruned segment keeps its hooks in every step."""
    phases, masks = [], []
    layer_pre = tiny_llava._layer_pre

    def counting(r, *args):
        phases.append(r.phase)
        return layer_pre(r, *args)

    lm = tiny_llava.text_model()
    handle = lm.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    monkeypatch.setattr(tiny_llava, "_layer_pre", counting)
    try:
        rep = tiny_llava.generate(shipped(name, **overrides), tiny_image, PROMPT, max_new_tokens=4, stop_at_eos=False)
    finally:
        handle.remove()
    n_layers = len(tiny_llava.decoder_layers())
    assert phases.count("prefill") == n_layers
    assert phases.count("decode") == (rep.decode_steps * n_layers if hooked_steps else 0)
    assert len(masks) == 1 + rep.decode_steps and all(m is None for m in masks[1:])
    assert not any(layer._forward_pre_hooks for layer in tiny_llava.decoder_layers())  # all removed at the end


# --- the layout as data --------------------------------------------------------------------------------
def test_segment_says_how_it_is_gathered_with_real_fields():
    names = {f.name for f in dataclasses.fields(Segment)}
    assert {"gather", "replacements", "tables", "step_tables"} <= names


def test_prefill_and_decode_masks():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    m = prefill_mask(valid)
    assert m.shape == (2, 1, 3, 3)
    assert bool(m[0, 0, 0, 0]) and not bool(m[0, 0, 1, 0])  # a padded row sees itself; nobody sees it
    assert torch.equal(m[1, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    d = decode_mask(torch.tensor([[False, True, True, True]]), 1)
    assert d.shape == (1, 1, 1, 4) and d[0, 0, 0].tolist() == [False, True, True, True]


# --- the adapters' shape ------------------------------------------------------------------------------
ADAPTERS_DIR = Path(generation.__file__).parent


def test_rpme_offsets_live_in_the_engine_and_no_adapter_imports_the_node_library():
    from nuwa_graph.nodes import positions as node_positions
    from nuwa_graph.positions import rpme_offsets

    assert node_positions.rpme_offsets is rpme_offsets
    for path in [*ADAPTERS_DIR.glob("*.py"), ADAPTERS_DIR.parent / "positions.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n == "nodes" or n.startswith(("nodes.", "nuwa_graph.nodes")) for n in names), path


def test_every_adapter_module_stays_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ADAPTERS_DIR.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
