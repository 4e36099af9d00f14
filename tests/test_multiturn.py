"""Multi-turn: the KV-cache continuation (adapters/conversation.py), the dialog data format and
the shapes world's dialogs (apps/dialogs.py), and the eval's per-turn accuracy in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nuwa_graph.adapters.conversation import Conversation
from nuwa_graph.apps.cli import app
from nuwa_graph.apps.dialogs import load_dialogs, turn_batches
from nuwa_graph.apps.evaluate import EvalError, evaluate, load_data, plan_runs, sample_data
from nuwa_graph.pipeline import load

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
FIRST = ["what color is the large circle ?", "how many squares are there ?", "where is the red square ?"]
SECOND = ["how many circles are there ?", "what shape is the blue object ?", "is there a green triangle ?"]
THIRD = ["is there a red circle ?", "how many objects are there ?", "what color is the square ?"]


@pytest.fixture(scope="module")
def embedded():
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.apps.models import default_model
    from nuwa_graph.world import make_scene

    return load_adapter(default_model(), "float32", "cpu"), [make_scene(4242, i).image() for i in range(3)]


def _continued_equals_recompute(adapter, pipe, images, turns, max_new_tokens=5):
    """Turn t through the continued cache == a cache-free recompute of the same ids with turn 1's
    pruning replayed; returns the reports."""
    conv = Conversation()
    reps = [adapter.generate(pipe, images, turns[0], max_new_tokens=max_new_tokens, conversation=conv)]
    for qs in turns[1:]:
        rep = adapter.generate(pipe, images, qs, max_new_tokens=max_new_tokens, conversation=conv, return_logits=True)
        logits, _ = adapter.forward_logits(pipe, images, turns[0], extra_ids=conv.history, replay=reps[0].keeps)
        diff = (logits[:, -1].float() - rep.step_logits[0]).abs().max()
        assert diff < 1e-4, (pipe.name, diff)
        assert rep.visual_tokens_per_layer == reps[0].visual_tokens_per_layer  # nothing pruned again
        reps.append(rep)
    return reps, conv


@pytest.mark.parametrize("name", ["fastv", "sparsevlm"])  # a Keep at llm.K; merged LLM rows (recomputed in the replay)
def test_continued_cache_equals_a_recompute_embedded(embedded, name):
    adapter, images = embedded
    reps, conv = _continued_equals_recompute(adapter, load(PIPELINES / f"{name}.yaml"), images, [FIRST, SECOND, THIRD])
    # answers of different lengths in one batch (a box is 5 tokens, a word 1 + EOS): the padding and the
    # tokens fed after a sample finished are masked, so each sample continues from its own last token
    assert len({len(t) for t in reps[0].new_tokens}) > 1
    assert all(h for h in conv.history) and conv.turns == 3


def test_continued_cache_equals_a_recompute_tiny(tiny_llava, tiny_image):
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import tiny_qwen_image

    q = [["what color is the circle ?", "how many shapes ?"], ["what shape is red ?", "is there a square ?"]]
    _continued_equals_recompute(tiny_llava, load(PIPELINES / "fastv.yaml"), [tiny_image, tiny_image.rotate(90)], q)
    _continued_equals_recompute(tiny_llava, load(PIPELINES / "sparsevlm.yaml"), [tiny_image, tiny_image.rotate(90)], q)
    qwen = load_adapter("tiny-qwen")
    _continued_equals_recompute(qwen, load(PIPELINES / "pdrop.yaml"), [tiny_qwen_image(seed=0), tiny_qwen_image(seed=1)], q)


def test_vanilla_reuse_and_prune_again_answer_alike(embedded):
    """Without pruning the two modes feed the model the same tokens: the same answers."""
    from nuwa_graph.apps.dialogs import DialogSample, DialogTurn, run_dialogs

    adapter, images = embedded
    chunk = [DialogSample(str(i), "", [DialogTurn(t[i], ["x"]) for t in (FIRST, SECOND, THIRD)]) for i in range(3)]
    vanilla = load(PIPELINES / "vanilla.yaml")
    fed: list[int] = []  # tokens per text-model call that feeds more than one (prefills, continued turns)

    def count(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is not None and x.shape[1] > 1:
            fed.append(int(x.shape[1]))

    hook = adapter.text_model().register_forward_pre_hook(count, with_kwargs=True)
    try:
        reuse = run_dialogs(adapter, vanilla, chunk, images, "reuse", 5, None)
        fed_reuse, fed[:] = list(fed), []
        again = run_dialogs(adapter, vanilla, chunk, images, "prune", 5, None)
    finally:
        hook.remove()
    assert [r.answers for r in reuse] == [r.answers for r in again]
    # the continued turns feed the new tokens only (answer + next question), a fresh run the whole prompt
    # (counted, not timed: wall times on a shared CPU say nothing at this size)
    assert len(fed_reuse) == len(fed) == 3 and fed_reuse[0] == fed[0] > 144
    assert all(n < 40 for n in fed_reuse[1:]) and all(n > fed[0] for n in fed[1:]), (fed_reuse, fed)
    assert reuse[1].prefill_ms > 0 and again[1].prefill_ms > 0
    assert again[2].visual_tokens_avg == [144.0] * 3


# --- data ------------------------------------------------------------------------------------------
def test_the_shapes_world_writes_dialogs(tmp_path):
    paths = sample_data(tmp_path, n_images=6, seed=7, n_turns=3)
    assert [p.name for p in paths] == ["refcoco.json", "vqa.jsonl", "dialog.jsonl"]
    dialogs = load_dialogs(paths[2])
    assert len(dialogs) == 6 and all(2 <= len(d.turns) <= 3 for d in dialogs)
    assert all(t.kind == "vqa" and t.answers for d in dialogs for t in d.turns)
    assert len({t.question for t in dialogs[0].turns}) == len(dialogs[0].turns)
    # the single-question files are unchanged by the dialogs
    plain = sample_data(tmp_path / "plain", n_images=6, seed=7)
    assert plain[1].read_text() == paths[1].read_text()
    batches = turn_batches(dialogs, 4)
    assert all(len({len(d.turns) for d in b}) == 1 and len(b) <= 4 for b in batches)
    tasks = load_data([str(paths[2])])
    assert tasks[0].kind == "dialog"


def test_dialog_records_are_checked(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    recs = [{"id": "ok", "image": "a.png", "turns": [{"question": "q ?", "answers": ["a"]},
                                                      {"question": "where ?", "bbox": [1, 2, 10, 10]}]},
            {"id": "no-turns", "image": "a.png", "turns": []},
            {"id": "bad-box", "image": "a.png", "turns": [{"question": "where ?", "bbox": [1, 2, 0, 10]}]},
            {"id": "no-answer", "image": "a.png", "turns": [{"question": "q ?"}]}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(EvalError) as e:
        load_data([str(f)])
    msg = str(e.value)
    assert "3 bad data records" in msg and "record 1, field 'turns'" in msg
    assert "record 2, field 'turns[0].bbox'" in msg and "record 3, field 'turns[0].answers'" in msg
    tasks = load_data([str(f)], skip_bad=True)
    (d,) = tasks[0].samples
    assert d.turns[1].box == (1.0, 2.0, 11.0, 12.0) and d.turns[1].kind == "grounding"


# --- eval --------------------------------------------------------------------------------------------
def test_eval_reports_accuracy_per_turn_in_both_modes(tiny_llava, tmp_path):
    from PIL import Image

    from nuwa_graph.adapters.tiny import synthetic_image

    synthetic_image().save(tmp_path / "s.png")
    Image.Image.rotate(synthetic_image(), 90).save(tmp_path / "t.png")
    recs = [{"id": f"d{i}", "image": img, "turns": [{"question": "what color is the circle ?", "answers": ["red"]},
                                                      {"question": "where is the circle ?", "bbox": [0, 0, 50, 50]},
                                                      {"question": "how many shapes ?", "answers": ["two"]}]}
            for i, img in enumerate(["s.png", "t.png"])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tasks = load_data([str(tmp_path / "d.jsonl")])
    runs = plan_runs([PIPELINES / "vanilla.yaml", PIPELINES / "fastv.yaml"])
    res = evaluate(tiny_llava, runs, tasks, batch=2, max_new_tokens=3, warmup=False)
    for r in res["results"]:
        assert set(r["tasks"]) == {"dialog:reuse", "dialog:prune"}
        reuse, prune = r["tasks"]["dialog:reuse"], r["tasks"]["dialog:prune"]
        assert [t["turn"] for t in reuse["per_turn"]] == [1, 2, 3] and all(t["n"] == 2 for t in reuse["per_turn"])
        assert reuse["per_turn"][0] == prune["per_turn"][0]  # turn 1 is the same run in both modes
        assert "parse_failures" in reuse and set(reuse["prefill_ms_per_turn"]) == {"1", "2", "3"}
        preds = [p for p in r["predictions"] if p["task"] == "dialog:reuse"]
        assert [p["id"] for p in preds[:3]] == ["d0#1", "d0#2", "d0#3"] and "iou" in preds[1]
    assert res["results"][0]["loyalty"]["tasks"]["dialog:reuse"]["rate"] == 1.0
    with pytest.raises(EvalError, match="native prompt style"):
        evaluate(tiny_llava, runs, tasks, prompt_fn=lambda s, p: p, warmup=False)


def test_cli_turns_adds_the_built_in_dialogs(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "fastv.yaml"), "--model", "tiny-llava", "--set", "budget=128",
                                 "--turns", "2", "--limit", "2", "--batch", "2", "--max-new-tokens", "2",
                                 "--turn-mode", "reuse", "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "multi-turn: accuracy per turn" in r.output and "dialog:reuse" in r.output and "dialog:prune" not in r.output
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [x["label"] for x in res["results"]] == ["fastv budget=128", "vanilla"]
    assert [t["turn"] for t in res["results"][0]["tasks"]["dialog:reuse"]["per_turn"]] == [1, 2]
    bad = CliRunner().invoke(app, ["eval", str(PIPELINES / "fastv.yaml"), "--turn-mode", "cache", "-o",
                                   str(tmp_path / "x")])
    assert bad.exit_code == 2 and "reuse and/or prune" in bad.output


def test_continuation_matches_the_stored_history_tokens(tiny_llava, tiny_image):
    """`history` holds exactly the ids fed after the first prompt: answer (+ end) + next turn."""
    pipe = load(PIPELINES / "vanilla.yaml")
    conv = Conversation()
    r1 = tiny_llava.generate(pipe, [tiny_image], ["what color ?"], max_new_tokens=3, conversation=conv)
    tiny_llava.generate(pipe, [tiny_image], ["what shape ?"], max_new_tokens=3, conversation=conv)
    eos = tiny_llava._eos_ids()
    answer = r1.new_tokens[0] if r1.new_tokens[0][-1] in eos else r1.new_tokens[0] + [tiny_llava.turn_end_id()]
    assert conv.history[0] == answer + tiny_llava.turn_ids("what shape ?")
    assert tiny_llava.turn_text("q") == "USER: q ASSISTANT:"
    assert torch.is_tensor(conv.run.segments[0].valid)


def test_a_conversation_keeps_its_pipeline_and_cuts_answers_at_their_end(tiny_llava, tiny_image):
    """An answer is kept up to its first end-of-sequence token (ids a sample was fed after it are
    masked in the cache); one cut by max_new_tokens is closed with the end-of-answer token."""
    from nuwa_graph.errors import RunError

    pipe = load(PIPELINES / "fastv.yaml", {"budget": 128})
    conv = Conversation()
    tiny_llava.generate(pipe, [tiny_image], ["what color ?"], max_new_tokens=3, conversation=conv)
    end = tiny_llava.turn_end_id()
    saved = conv.answers
    conv.answers = [[5, end, 7, 8], [5, 6]]
    assert conv._answers(tiny_llava) == [([5, end], 2), ([5, 6, end], 2)]
    conv.answers = saved
    with pytest.raises(RunError, match="continues with that pipeline"):
        tiny_llava.generate(load(PIPELINES / "random.yaml", {"budget": 128}), [tiny_image], ["more ?"],
                            conversation=conv)
    with pytest.raises(RunError, match="2 questions for a conversation of 1 samples"):
        tiny_llava.generate(pipe, [tiny_image], ["a ?", "b ?"], conversation=conv)
