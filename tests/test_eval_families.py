"""Issue 25's evaluation features on the families of issues 21 and 23: replay and question-
agnostic pruning, the multi-turn KV-cache continuation (cached == a recompute of the same ids with
turn 1's pruning replayed), dialogs in the eval, and the HTML report's kept-token pictures per
crop view, on the Qwen-VL line (M-RoPE positions, DeepStack) and the tiled presets (newline rows,
per-crop geometry)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nuwa_graph.adapters.conversation import CHATML_END, CHATML_TURN, Conversation, template_turn
from nuwa_graph.pipeline import load
from nuwa_graph.replay import generate_question_agnostic, prompt_signals

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
TURNS = [["what color is the circle ?", "how many shapes ?"], ["what shape is red ?", "is there a square ?"],
         ["where is the square ?", "is it blue ?"]]
_adapters: dict[str, object] = {}


def _adapter(preset: str):
    if preset not in _adapters:
        from nuwa_graph.adapters import load_adapter

        _adapters[preset] = load_adapter(preset, "float32", "cpu")
    return _adapters[preset]


def _images(adapter) -> list:
    """Two images of different shapes: different merged grids on the Qwen-VL line (M-RoPE
    positions and left padding differ per sample), different tilings on the tiled presets."""
    from nuwa_graph.adapters.tiny import tiny_qwen_image
    from nuwa_graph.adapters.tiny_tiled import wide_image

    vc = adapter.model.config.vision_config
    merge = getattr(vc, "spatial_merge_size", None)
    if merge:
        unit = int(vc.patch_size) * int(merge)
        return [tiny_qwen_image((12, 12), seed=2, unit=unit), tiny_qwen_image((10, 14), seed=3, unit=unit)]
    w, h = (160, 64) if adapter.family == "internvl" else (200, 150)
    return [wide_image(w, h), wide_image(w, h).rotate(90, expand=True)]


# (preset, file, overrides): a Qwen3-VL recipe routed by family group (vision merges + llm.K inside
# the DeepStack layers), Qwen2-VL with a Keep at llm.K, VisionZip per crop + stitch on LLaVA-NeXT
# (newline rows dropped), FastV on InternVL (tiles + thumbnail), SparseVLM's recycled LLM rows on OneVision
CASES = [("tiny-qwen3-vl", "nuwa", {}), ("tiny-qwen2-vl", "fastv", {}), ("tiny-llava-next", "visionzip", {"budget": 160}),
         ("tiny-internvl", "fastv", {}), ("tiny-llava-onevision", "sparsevlm", {})]


@pytest.mark.parametrize("preset, name, over", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_replay_question_agnostic_and_continuation(one_thread, preset, name, over):
    adapter = _adapter(preset)
    images = _images(adapter)
    pipe = load(PIPELINES / f"{name}.yaml", over)
    # a run's own Keeps replayed on the same prompt: the same run (same crops, views, counts)
    first = adapter.generate(pipe, images, TURNS[0], max_new_tokens=3, return_logits=True)
    again = adapter.generate(pipe, images, TURNS[0], max_new_tokens=3, return_logits=True, replay=first.keeps)
    assert again.kept == first.kept and again.views == first.views
    assert again.visual_tokens_per_layer == first.visual_tokens_per_layer
    assert torch.allclose(first.step_logits[0], again.step_logits[0], atol=1e-5)
    assert "replay" in again.node_ms
    # question-agnostic: the decisions are those of the neutral prompt's own run
    rep, nrep = generate_question_agnostic(adapter, pipe, images, TURNS[0], [""] * 2, max_new_tokens=2)
    alone = adapter.generate(pipe, images, [""] * 2, max_new_tokens=1)
    assert rep.kept == nrep.kept == alone.kept
    assert rep.visual_tokens_per_layer == first.visual_tokens_per_layer
    # three turns through the continued cache == cache-free recomputes with turn 1's pruning replayed
    conv = Conversation()
    r1 = adapter.generate(pipe, images, TURNS[0], max_new_tokens=3, conversation=conv)
    for qs in TURNS[1:]:
        rep = adapter.generate(pipe, images, qs, max_new_tokens=3, conversation=conv, return_logits=True)
        logits, _ = adapter.forward_logits(pipe, images, TURNS[0], extra_ids=conv.history, replay=r1.keeps)
        assert (logits[:, -1].float() - rep.step_logits[0]).abs().max() < 1e-4
        assert rep.visual_tokens_per_layer == r1.visual_tokens_per_layer  # nothing pruned again
    assert conv.turns == 3


def test_each_family_continues_in_its_own_chat_format():
    """A later turn is written as the family's prompt is: ChatML on the Qwen-VL line and InternVL
    (answers end with <|im_end|>), LLaVA's on LLaVA-NeXT without a chat template (the tiny preset;
    with one: test_llava_next_prompts_and_turns_follow_its_chat_template), the checkpoint's chat
    template on OneVision (read off the template; LLaVA's without one, as the tiny preset)."""
    for preset in ("tiny-qwen3-vl", "tiny-internvl"):
        a = _adapter(preset)
        assert a.turn_text("q ?") == CHATML_TURN.format(question="q ?")
        assert a.turn_end_id() == a._tokenizer().convert_tokens_to_ids(CHATML_END)
    assert _adapter("tiny-llava-next").turn_text("q ?") == "USER: q ? ASSISTANT:"
    # the template reading agrees with the hand-written ChatML turn
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
              "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _adapter("tiny-internvl")._tokenizer()

    class Proc:
        tokenizer = tok

        def apply_chat_template(self, msgs, **kw):
            from jinja2 import Template

            return Template(chatml).render(messages=msgs, add_generation_prompt=kw.get("add_generation_prompt"))

    assert template_turn(Proc()) == (CHATML_TURN, CHATML_END)


def _second_turn_equals_recompute(a, pipe, images) -> Conversation:
    """Two turns through the continued cache; the second's logits == a cache-free recompute of
    the same ids with turn 1's pruning replayed. Returns the conversation."""
    conv = Conversation()
    r1 = a.generate(pipe, images, TURNS[0], max_new_tokens=3, conversation=conv)
    rep = a.generate(pipe, images, TURNS[1], max_new_tokens=3, conversation=conv, return_logits=True)
    logits, _ = a.forward_logits(pipe, images, TURNS[0], extra_ids=conv.history, replay=r1.keeps)
    assert (logits[:, -1].float() - rep.step_logits[0]).abs().max() < 1e-4
    return conv


def test_onevision_turns_follow_its_chat_template(one_thread):
    """With a chat template (as the released OneVision checkpoints have), the prompt and every
    later turn come from it, and the continuation still equals the recompute."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.errors import RunError

    a = load_adapter("tiny-llava-onevision", "float32", "cpu")
    a.processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} A:{% else %} {{ m['content'][0]['text'] }}</s>"
        "{% endif %}{% endfor %}")
    assert a.format_prompt("what ?") == "Q: <image>\nwhat ? A:"
    assert a.turn_text("what ?") == "Q: what ? A:" and a.turn_end_id() == a._tokenizer().eos_token_id
    _second_turn_equals_recompute(a, load(PIPELINES / "pdrop.yaml"), _images(a))
    a.processor.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # no end marker, no next turn
    with pytest.raises(RunError, match="cannot be continued"):
        a.turn_text("q ?")


# chat templates in the shape of the released LLaVA-NeXT checkpoints' (written here): Mistral's
# [INST] turns, each answer closed by </s>; Vicuna's USER/ASSISTANT, no token after an answer
NEXT_MISTRAL_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]{% else %} {{ m['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}")
NEXT_VICUNA_STYLE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def test_llava_next_prompts_and_turns_follow_its_chat_template(one_thread):
    """A NeXT checkpoint with a chat template (Mistral's [INST]) gets its prompt, its placeholders
    and every later turn from it, and the continuation equals the recompute; Vicuna's template is
    LLaVA's own format, whose turns stay LLaVA's; a template that cannot be continued is refused."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.errors import RunError

    a = load_adapter("tiny-llava-next", "float32", "cpu")
    llava_prompt, llava_turn = a.format_prompt("what ?"), a.turn_text("what ?")
    a.processor.chat_template = NEXT_MISTRAL_STYLE
    assert a.format_prompt("what ?") == "[INST] <image>\nwhat ? [/INST]"
    assert a.format_prompt("what ?", 2) == "[INST] <image>\n<image>\nwhat ? [/INST]"
    assert a.with_placeholders("<image> and <image>: same ?") == "[INST] <image>\n and <image>\n: same ? [/INST]"
    assert a.turn_text("what ?") == "[INST] what ? [/INST]" and a.turn_end_id() == a._tokenizer().eos_token_id
    pipe = load(PIPELINES / "fastv.yaml")
    images = _images(a)
    conv = _second_turn_equals_recompute(a, pipe, images)
    turn = a.turn_ids(TURNS[1][0])  # the tiny vocabulary has no [INST]: compared as ids
    assert turn == a._tokenizer()("[INST] what shape is red ? [/INST]", add_special_tokens=False)["input_ids"]
    assert conv.history[0][-len(turn):] == turn
    a.processor.chat_template = NEXT_VICUNA_STYLE
    assert a.format_prompt("what ?") == llava_prompt and a.turn_text("what ?") == llava_turn
    a.processor.chat_template = "{% for m in messages %}<{{ m['role'] }}>{% endfor %}"  # not LLaVA's, no end token
    with pytest.raises(RunError, match="cannot be continued"):
        a.turn_text("q ?")


def test_a_qwen_image_that_is_not_square_gets_its_kept_picture(one_thread, tmp_path):
    """The Qwen-VL line's merged grid is the image's own shape: the eval records it per batch, so a
    10 x 14 image gets its kept-token picture (a square root of 140 tokens found no grid)."""
    from types import SimpleNamespace

    from nuwa_graph.apps.eval_batches import _first_sample, batch_record
    from nuwa_graph.apps.viz import write_pictures

    a = _adapter("tiny-qwen2-vl")
    images = _images(a)[::-1]  # 10 x 14 first
    rep = a.generate(load(PIPELINES / "random.yaml"), images, TURNS[0][:2], max_new_tokens=1)
    assert rep.grids == [[10, 14], [12, 12]]
    res: dict = {"label": "random"}
    path = tmp_path / "wide.png"
    images[0].save(path)
    _first_sample(res, batch_record("k", rep, TURNS[0][:2]), SimpleNamespace(image=str(path)), lambda n: None)
    assert res["grid"] == [10, 14] and "views" not in res
    pictures = write_pictures({"results": [res]}, tmp_path / "pictures")
    assert [p.name for p in pictures] == ["random.png"] and pictures[0].stat().st_size > 0


def test_question_agnostic_twins_follow_the_file_the_model_runs(tmp_path):
    """A file routed to another on a family group (`family_files`) is classified by what runs:
    FastV (reads the question) routed to random (the image only) on the Qwen-VL line gets no
    twin there, and one elsewhere."""
    from nuwa_graph.apps.evaluate import plan_runs, with_question_agnostic

    text = (PIPELINES / "fastv.yaml").read_text()
    (tmp_path / "random.yaml").write_text((PIPELINES / "random.yaml").read_text())
    routed = tmp_path / "routed.yaml"
    routed.write_text(re.sub(r"^variables:", "family_files: {qwen-vl: random.yaml}\nvariables:", text, count=1,
                             flags=re.M))
    runs = plan_runs([routed])
    qwen = _adapter("tiny-qwen3-vl").model_variables()
    assert prompt_signals(runs[0].pipeline) and not prompt_signals(runs[0].pipeline.bind_model(qwen))
    assert len(with_question_agnostic(runs)) == 2
    assert len(with_question_agnostic(runs, _adapter("tiny-llava-next").model_variables())) == 2
    assert len(with_question_agnostic(runs, qwen)) == 1


def test_dialogs_on_a_routed_file_and_the_report_shows_every_crop(one_thread, tmp_path):
    """nuwa.yaml's dialogs on Qwen3-VL (it runs nuwa_qwen.yaml) in both modes; on LLaVA-NeXT the
    results carry the crop views and the page draws a panel per view (rendered in Chromium
    where it is installed)."""
    from nuwa_graph.apps.evaluate import evaluate, load_data, plan_runs, sample_data
    from nuwa_graph.apps.report_html import render

    paths = sample_data(tmp_path / "data", n_images=2, seed=5, n_turns=2)
    tasks = load_data([str(p) for p in paths])
    dialog = [t for t in tasks if t.kind == "dialog"]
    vqa = [t for t in tasks if t.kind == "vqa"]
    res = evaluate(_adapter("tiny-qwen3-vl"), plan_runs([PIPELINES / "nuwa.yaml"]), dialog, batch=2,
                   max_new_tokens=2, warmup=False)
    (r,) = res["results"]
    assert set(r["tasks"]) == {"dialog:reuse", "dialog:prune"}
    assert [t["turn"] for t in r["tasks"]["dialog:reuse"]["per_turn"]] == [1, 2]
    next_res = evaluate(_adapter("tiny-llava-next"), plan_runs([PIPELINES / "vanilla.yaml", PIPELINES / "visionzip.yaml"],
                                                               {"budget": [160]}), vqa, batch=2, max_new_tokens=2,
                        warmup=False)
    zipped = next_res["results"][1]
    labels = [v[0] for v in zipped["views"]]
    assert labels == ["base", "tiles"] and zipped["grid"] is None
    html = render(next_res)
    panels = sum(max(1, len(x.get("sample_kept") or {})) * len(x["views"]) for x in next_res["results"])
    assert html.count("data:image/png;base64,") == panels
    sites = re.findall(r'class="site">([^<]*)<', html)
    assert [s.split(":")[0] for s in sites[-2:]] == ["vision base", "vision tiles"]  # VisionZip's row: both views
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    page = tmp_path / "r.html"
    page.write_text(html)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="render-check"[^>]*>([^<]+)</pre>', dom.stdout)
    assert m, dom.stderr[-2000:]
    import json

    seen = json.loads(m.group(1))
    assert seen["images_total"] == panels and seen["images"] == panels


def test_a_filter_that_keeps_another_count_is_said_in_the_split():
    """`--difficulty downsample` on a tiled model: downsample counts its budget per spatial part,
    so the filter may keep more tokens than the methods it splits; the split says so."""
    from nuwa_graph.apps.loyalty import add_difficulty

    preds = [{"task": "vqa", "id": str(i), "correct": i % 2 == 0, "answer": "a", "answers": ["a"]} for i in range(4)]

    def run(label, pipeline, budget, kept):
        return {"label": label, "pipeline": pipeline, "variables": {"budget": budget}, "budget": budget,
                "visual_tokens_avg": kept, "predictions": preds}

    for kept, noted in ((64.0, False), (128.0, True)):
        result = {"results": [run("random budget=64", "random", 64, 64.0),
                              run("downsample budget=64 (filter)", "downsample", 64, kept)]}
        add_difficulty(result, "downsample")
        (split,) = result["difficulty"]["splits"]
        assert split["filter_tokens"] == kept and ("note" in split) == noted
        if noted:
            assert "kept 128 visual tokens per sample on average, not 64" in split["note"]
