"""The embedded model builder: real LLaVA classes, word-level tokenizer, processor, offline round trip."""

import numpy as np
import pytest
import torch

from nuwa_graph.embedded import build_model, load_embedded, pixel_values, prompt, save_embedded
from nuwa_graph.embedded.train import TrainConfig, Vocab, _check_vocab, lm_batch, vision_batch
from nuwa_graph.world import make_scene, samples
from nuwa_graph.world.boxes import box_to_tokens


@pytest.fixture(scope="module")
def untrained():
    return build_model(seed=0)


def test_classes_and_sizes(untrained):
    model, proc = untrained
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert type(proc).__name__ == "LlavaProcessor" and type(proc.image_processor).__name__ == "LlavaImageProcessorPil"
    assert model.config.image_seq_length == 144 and model.config.vision_feature_layer == -2
    assert model.config.text_config.num_hidden_layers == 16  # the shipped depth (docs/embedded.md)
    assert 5e6 < sum(p.numel() for p in model.parameters()) < 6e6


def test_tokenizer_words_and_coordinate_tokens(untrained):
    tok = untrained[1].tokenizer
    ids = tok(prompt("where is the leftmost red circle ?") + " <x3> <y5> <x9> <y11></s>").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "user", ":", "<image>", "where", "is", "the", "leftmost", "red",
                                              "circle", "?", "assistant", ":", "<x3>", "<y5>", "<x9>", "<y11>", "</s>"]
    assert tok.decode(ids[-5:], skip_special_tokens=True) == "<x3> <y5> <x9> <y11>"
    assert tok.decode(tok("What COLOR is it?").input_ids[1:]) == "what color is <unk> ?"
    _check_vocab(Vocab(tok), TrainConfig())   # the training fast path == the tokenizer


def test_processor_placeholders_pixels_and_forward(untrained):
    model, proc = untrained
    scene = make_scene(0, 1)
    batch = proc(images=[scene.image(), scene.image()], text=[prompt("what color is the circle ?"),
                 prompt("is there a red square ?")], return_tensors="pt", padding=True)
    n_image = (batch.input_ids == model.config.image_token_id).sum(1)
    assert n_image.tolist() == [144, 144]
    assert torch.equal(batch.pixel_values, pixel_values([scene.render()[0]] * 2))
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch.input_ids.shape[1], len(proc.tokenizer))
    gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] <= batch.input_ids.shape[1] + 3
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": "what color is the circle ?"}]}], add_generation_prompt=True)
    assert text == prompt("what color is the circle ?")


def test_save_load_offline_round_trip(untrained, tmp_path):
    model, proc = untrained
    save_embedded(model, proc, tmp_path / "w", dtype=torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    assert (tmp_path / "w" / "model.safetensors").stat().st_size < 2 * n_params + 1e5  # stored as fp16
    m2, p2 = load_embedded(tmp_path / "w")
    assert next(m2.parameters()).dtype == torch.float32
    assert p2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    batch = p2(images=[make_scene(0, 2).image()], text=[prompt("how many circles are there ?")], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**batch).logits, m2(**batch).logits
    assert torch.allclose(a, b, atol=5e-3)   # fp16 storage


def test_training_batches(untrained):
    _, proc = untrained
    cfg = TrainConfig()
    vocab = Vocab(proc.tokenizer)
    b = lm_batch(0, [0, 1, 2], cfg, vocab, 12)
    ids, w = b["input_ids"], b["weights"]
    assert set(b) == {"input_ids", "attention_mask", "weights", "pixel_values"}   # no attention targets
    assert ((ids == vocab.image).sum(1) == 144).all()
    assert (w[ids == vocab.image] == 0).all() and (w[ids == vocab.eos] == 1).all()
    turns = cfg.grounding_turns + cfg.vqa_turns + cfg.point_turns
    assert ((ids == vocab.eos).sum(1) == turns).all()
    # the first grounding answer of scene 0 is its box in coordinate tokens, weighted 1
    _, g, _ = samples(0, 0, cfg.grounding_turns, cfg.vqa_turns)
    toks = proc.tokenizer.convert_ids_to_tokens(ids[0][w[0] == 1].tolist())
    assert " ".join(toks).count(box_to_tokens(g[0].box, 168, 168)) == 1
    # question tokens carry the question weight, the prompt scaffolding none
    q = proc.tokenizer.convert_ids_to_tokens(ids[0][w[0] == cfg.question_weight].tolist())
    assert "where" in q and "<image>" not in q
    px, labels, _, counts = vision_batch(0, [0, 1], 12)
    assert px.shape == (2, 3, 168, 168) and labels.shape == (2, 144) and labels.max() > 0
    assert counts.tolist() == [len(make_scene(0, i).objects) for i in (0, 1)]


def test_pointing_questions_name_the_object_under_the_cell():
    from nuwa_graph.world.shapes import point_item

    asked = 0
    for i in range(40):
        scene = make_scene(3, i)
        p = point_item(scene, np.random.default_rng(i))
        assert p is not None
        cx, cy = p.cell
        o = scene.objects[p.target]
        assert p.question == f"what is in <x{cx}> <y{cy}> ?" and p.answer == f"{o.size} {o.color} {o.shape}"
        px, py = int((cx + 0.5) * 10.5), int((cy + 0.5) * 10.5)
        assert scene.render()[1][py, px] == p.target + 1          # the cell's centre is on the object
        x0, y0, x1, y1 = o.box
        assert x0 <= cx * 10.5 and (cx + 1) * 10.5 <= x1 and y0 <= cy * 10.5 and (cy + 1) * 10.5 <= y1
        asked += 1
    assert asked == 40


def test_curriculum_draws_simple_scenes_first():
    from nuwa_graph.embedded.train import max_objects_at, next_indices

    cfg = TrainConfig(lm_steps=100, curriculum=[[3, 0.1], [4, 0.2]])
    assert [max_objects_at(s, cfg) for s in (0, 9, 10, 19, 20, 99)] == [3, 3, 4, 4, 6, 6]
    idx, nxt = next_indices(0, 0, 16, 3)
    assert len(idx) == 16 and nxt == idx[-1] + 1
    assert all(len(make_scene(0, i).objects) <= 3 for i in idx)
    assert next_indices(0, 5, 4, 6) == ([5, 6, 7, 8], 9)


TINY = {"vision_hidden": 32, "vision_mlp": 64, "vision_layers": 2, "text_hidden": 32, "text_mlp": 64, "text_layers": 2}


def _tiny(out, **kw):
    base = {"out": str(out), "seed": 1, "vision_from": "", "lm_steps": 4, "batch": 2, "warmup": 1, "eval_every": 2,
            "eval_n": 2, "final_eval_n": 2, "ckpt_every": 2, "dims": dict(TINY), "curriculum": [[3, 0.5]]}
    return TrainConfig(**{**base, **kw})


def _quiet(fn, *a, **kw):
    import io

    from rich.console import Console
    try:
        return fn(*a, console=Console(file=io.StringIO()), **kw)
    finally:
        torch.use_deterministic_algorithms(False)  # train() turns it on for the process


def test_a_short_training_run_executes_and_saves(tmp_path):
    """A few LM steps on a tiny model: losses are finite, no attention loss exists, the model is
    saved to run/model, reloaded and evaluated, and the log says what ran."""
    import json
    import math

    from nuwa_graph.embedded.train import train

    log = _quiet(train, _tiny(tmp_path / "run"), command="test")
    assert log["images_seen"] == {"lm": 8} and not log["stopped_early"] and "paused" not in log
    assert log["attention_loss"] is None and log["vision_tower"] == {"random": True}
    lm = [h for h in log["history"] if h["phase"] == "lm"]
    assert lm and all(math.isfinite(h["loss"]) for h in lm) and set(lm[0]) >= {"loss", "answer", "max_objects"}
    assert not any("att" in k for h in lm for k in h)
    assert [e["step"] for e in log["evals"]] == [2]
    assert 0.0 <= log["final"]["grounding_acc50"] <= 1.0 and log["final"]["n"] == 2
    saved = json.loads((tmp_path / "run/model/training_log.json").read_text())
    assert saved["final"] == json.loads(json.dumps(log["final"]))
    cfg = json.loads((tmp_path / "run/model/config.json").read_text())
    assert cfg["nuwa_embedded"]["attention_loss"] is None
    model, _ = load_embedded(tmp_path / "run/model")
    assert model.config.text_config.num_hidden_layers == 2


def test_resume_continues_bit_for_bit(tmp_path):
    """k steps in one go == k1 steps, stop, --resume to k (model and optimizer state identical)."""
    from nuwa_graph.embedded.train import load_checkpoint, train

    k = 5
    _quiet(train, _tiny(tmp_path / "straight", lm_steps=k, final_eval_n=1))
    log = _quiet(train, _tiny(tmp_path / "split", lm_steps=k, final_eval_n=1, stop_after=2))
    assert log["paused"] == {"at_step": 2, "reason": "stop-after"}
    log = _quiet(train, TrainConfig(), resume=str(tmp_path / "split"), overrides={"stop_after": 0})
    assert "final" in log and [s["resumed_from_step"] for s in log["sessions"]] == [None, 2]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["state"]["step"] == b["state"]["step"] == k
    assert a["state"]["next_index"] == b["state"]["next_index"]
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [h["loss"] for h in a["log"]["history"]] == [h["loss"] for h in b["log"]["history"]]


@pytest.mark.parametrize("argv, msg", [
    (["--out", "X", "--batch", "0"], "--batch 0: must be a positive integer"),
    (["--out", "X", "--lm-steps", "-3"], "--lm-steps -3: must be a positive integer"),
    ([], "--out '': the run folder is required"),
    (["--out", "WEIGHTS"], "shipped weights folder"),
    (["--out", "X", "--curriculum", "9:0.5"], "--curriculum"),
    (["--out", "X", "--vision-steps", "10"], "--vision-from ''"),
    (["--resume", "X", "--lm-steps", "10"], "only --minutes, --stop-after, --threads, --ckpt-minutes may be given"),
    (["--resume", "X"], "no checkpoint"),
])
def test_bad_trainer_options_are_clear_errors(argv, msg, tmp_path, capsys):
    from nuwa_graph.embedded import WEIGHTS_DIR
    from nuwa_graph.embedded.train import main

    argv = [str(WEIGHTS_DIR) if a == "WEIGHTS" else str(tmp_path / a) if a == "X" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_a_second_start_in_a_used_run_folder_is_refused(tmp_path):
    from nuwa_graph.embedded.train import train

    _quiet(train, _tiny(tmp_path / "run", stop_after=1))
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        _quiet(train, _tiny(tmp_path / "run"))


def test_sigterm_finishes_the_step_checkpoints_and_stops(tmp_path, monkeypatch):
    import os
    import signal

    from nuwa_graph.embedded import train as T

    real, calls = T.lm_batch, []

    def batch_then_term(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives during step 2
        return real(*a, **kw)

    monkeypatch.setattr(T, "lm_batch", batch_then_term)
    before = signal.getsignal(signal.SIGTERM)
    log = _quiet(T.train, _tiny(tmp_path / "run", lm_steps=10))
    assert log["paused"] == {"at_step": 2, "reason": "SIGTERM"}
    assert T.load_checkpoint(tmp_path / "run")["state"]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before    # the handler is put back
