"""Replaying a run's pruning (nuwa_graph/replay.py) and question-agnostic pruning, on the
embedded model and on the tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph.context import Keep
from nuwa_graph.errors import RunError
from nuwa_graph.pipeline import load
from nuwa_graph.replay import (
    PROMPT_SIGNALS,
    ReplayExecutor,
    generate_question_agnostic,
    prompt_signals,
    reads_prompt,
)
from nuwa_graph.types import Mix, Tokens

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
QUESTIONS = ["what color is the large circle ?", "how many squares are there ?", "where is the red square ?"]


@pytest.fixture(scope="module")
def embedded():
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.apps.models import default_model
    from nuwa_graph.world import make_scene

    return load_adapter(default_model(), "float32", "cpu"), [make_scene(4242, i).image() for i in range(3)]


def _same_keeps(a: list[list[Keep]], b: list[list[Keep]]) -> bool:
    return all([(k.site, k.ids.tolist()) for k in x] == [(k.site, k.ids.tolist()) for k in y] for x, y in zip(a, b))


# --- what reads the prompt ------------------------------------------------------------------------
@pytest.mark.parametrize("name, reads_text", [
    ("vanilla", False), ("random", False), ("downsample", False), ("visionzip", False), ("prumerge_plus", False),
    ("visionzip_fix", False), ("fastv", True), ("pdrop", True), ("sparsevlm", True), ("feather", True),
    ("nuwa", True), ("fastv_fix", True),
])
def test_prompt_signals_of_the_shipped_pipelines(name, reads_text):
    found = prompt_signals(load(PIPELINES / f"{name}.yaml"))
    assert bool(found) == reads_text, found
    assert all(s.split("(")[0] in PROMPT_SIGNALS for s in found)  # the kinds docs/evaluation.md describes


def test_unknown_or_text_kinds_count_as_reading_the_prompt():
    assert not reads_prompt("vision.cls_attention") and not reads_prompt("vision.hidden_mean")
    assert not reads_prompt("pre_llm.visual")
    assert reads_prompt("pre_llm.text") and reads_prompt("llm.hidden") and reads_prompt("external")
    assert reads_prompt("vision.some_kind_added_later")  # conservative: a twin runs


# --- replay is exact on the same prompt ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["fastv", "sparsevlm", "nuwa"])  # llm.K ids, merged LLM rows, vision merge + llm.K
def test_replaying_a_runs_own_keeps_gives_the_same_run_embedded(embedded, name):
    adapter, images = embedded
    pipe = load(PIPELINES / f"{name}.yaml")
    first = adapter.generate(pipe, images, QUESTIONS, max_new_tokens=3, return_logits=True)
    again = adapter.generate(pipe, images, QUESTIONS, max_new_tokens=3, return_logits=True, replay=first.keeps)
    assert again.answers == first.answers and again.kept == first.kept
    assert again.visual_tokens_per_layer == first.visual_tokens_per_layer
    for a, b in zip(first.step_logits, again.step_logits):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert "replay" in again.node_ms and not any(k in again.node_ms for k in first.node_ms)


def test_replay_on_the_tiny_presets(tiny_llava, tiny_image):
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import tiny_qwen_image

    cases = [(tiny_llava, [tiny_image, tiny_image.rotate(90)], {}),
             (load_adapter("tiny-qwen"), [tiny_qwen_image(seed=0), tiny_qwen_image(seed=1)], {})]
    for adapter, images, over in cases:
        for name in ("sparsevlm", "pdrop"):
            pipe = load(PIPELINES / f"{name}.yaml", over)
            prompts = ["what color is the circle ?", "how many shapes ?"]
            first = adapter.generate(pipe, images, prompts, max_new_tokens=3, return_logits=True)
            again = adapter.generate(pipe, images, prompts, max_new_tokens=3, return_logits=True, replay=first.keeps)
            assert again.kept == first.kept, (adapter.family, name)
            assert torch.allclose(first.step_logits[0], again.step_logits[0], atol=1e-5), (adapter.family, name)


# --- question-agnostic -------------------------------------------------------------------------------
def test_question_agnostic_prunes_what_the_neutral_prompt_prunes(embedded):
    adapter, images = embedded
    fastv = load(PIPELINES / "fastv.yaml")
    neutral = [""] * 3
    rep, nrep = generate_question_agnostic(adapter, fastv, images, QUESTIONS, neutral, max_new_tokens=2)
    alone = adapter.generate(fastv, images, neutral, max_new_tokens=1)
    full = adapter.generate(fastv, images, QUESTIONS, max_new_tokens=2)
    assert rep.kept == nrep.kept == alone.kept  # the decisions are the neutral prompt's
    assert rep.kept != full.kept                # ... which differ from the question's (FastV reads the last token)
    assert rep.visual_tokens_per_layer == full.visual_tokens_per_layer
    # a pipeline that reads the image only is question-agnostic by construction: the same run
    vz = load(PIPELINES / "visionzip.yaml")
    rep2, _ = generate_question_agnostic(adapter, vz, images, QUESTIONS, neutral, max_new_tokens=2)
    plain = adapter.generate(vz, images, QUESTIONS, max_new_tokens=2)
    assert rep2.answers == plain.answers and rep2.kept == plain.kept


def test_question_agnostic_sparsevlm_recomputes_its_merged_rows(tiny_llava, tiny_image):
    """The merged rows at llm.K are made from the FULL prompt's hidden states with the neutral
    run's recipe (Tokens.mix), not copied from the neutral run."""
    pipe = load(PIPELINES / "sparsevlm.yaml")
    images = [tiny_image]
    neutral = tiny_llava.generate(pipe, images, [""], max_new_tokens=1)
    merged = [k for k in neutral.keeps[0] if k.tokens is not None]
    assert merged and all(k.tokens.mix is not None for k in merged)
    for k in merged:  # the recipe reproduces the neutral run's own rows
        mix = k.tokens.mix
        assert mix.weights.shape == (k.ids.numel(), mix.sources.numel())
    seen = {}

    class Spy(ReplayExecutor):
        def _recompute(self, act, present, reader, b):
            new = super()._recompute(act, present, reader, b)
            seen[act.site] = (act.tokens.values, new.tokens.values)
            return new

    ex = Spy(tiny_llava._bind(pipe), neutral.keeps)
    hidden_reads = [r.key for r in ex.requests()]
    assert len(hidden_reads) == len(merged) and all(k.startswith("llm.hidden") for k in hidden_reads)
    # run the replay with the spy through the adapter's own path
    orig = tiny_llava._bind
    try:
        tiny_llava._bind = lambda p: ex  # type: ignore[method-assign]
        rep = tiny_llava.generate(pipe, images, ["what color is the circle ?"], max_new_tokens=2)
    finally:
        tiny_llava._bind = orig  # type: ignore[method-assign]
    assert rep.kept == neutral.kept and set(seen) == {k.site for k in merged}
    first_site = min(seen, key=lambda s: int(s.split(".")[1]))
    old, new = seen[first_site]
    # the image comes before the question: the first merge's inputs are the same hidden states
    assert torch.allclose(old, new, atol=1e-5)


def test_a_merged_llm_row_without_a_recipe_is_refused(tiny_llava):
    pipe = load(PIPELINES / "fastv.yaml")
    rows = Tokens(torch.zeros(2, 4), torch.tensor([3, 5]), "llm")
    keeps = [[Keep("llm.2", torch.tensor([3, 5]), rows, None, "recycle9")]]
    with pytest.raises(RunError, match="recycle9.*without saying how each merged row is made"):
        ReplayExecutor(tiny_llava._bind(pipe), keeps)
    ok = Tokens(torch.zeros(2, 4), torch.tensor([3, 5]), "llm", Mix(torch.tensor([3, 5]), torch.eye(2)))
    ReplayExecutor(tiny_llava._bind(pipe), [[Keep("llm.2", torch.tensor([3, 5]), ok, None, "recycle9")]])
    with pytest.raises(ValueError, match="Mix: weights must be"):
        Mix(torch.tensor([3, 5]), torch.eye(3))


def test_a_replay_for_another_batch_size_is_refused(tiny_llava, tiny_image):
    pipe = load(PIPELINES / "random.yaml", {"budget": 128})
    rec = tiny_llava.generate(pipe, [tiny_image, tiny_image], ["a", "b"], max_new_tokens=1)
    with pytest.raises(RunError, match="pruning of 2 samples; this batch has 1"):
        tiny_llava.generate(pipe, [tiny_image], ["a"], max_new_tokens=1, replay=rec.keeps)
