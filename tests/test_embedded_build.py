"""The embedded model builder: real LLaVA classes, word-level tokenizer, processor, offline round trip."""

import numpy as np
import pytest
import torch

from nuwa_graph.embedded import build_model, load_embedded, pixel_values, prompt, save_embedded
from nuwa_graph.embedded.train import TrainConfig, Vocab, _check_vocab, _train_attention, lm_batch, vision_batch
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
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6


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
    assert (tmp_path / "w" / "model.safetensors").stat().st_size < 6e6
    m2, p2 = load_embedded(tmp_path / "w")
    assert next(m2.parameters()).dtype == torch.float32
    assert p2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    batch = p2(images=[make_scene(0, 2).image()], text=[prompt("how many circles are there ?")], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**batch).logits, m2(**batch).logits
    assert torch.allclose(a, b, atol=5e-3)   # fp16 storage


def test_training_batches(untrained):
    model, proc = untrained
    cfg = TrainConfig()
    vocab = Vocab(proc.tokenizer)
    b = lm_batch(0, [0, 1, 2], cfg, vocab, 12)
    ids, w = b["input_ids"], b["weights"]
    assert ((ids == vocab.image).sum(1) == 144).all()
    assert (w[ids == vocab.image] == 0).all() and (w[ids == vocab.eos] == 1).all()
    assert ((ids == vocab.eos).sum(1) == cfg.grounding_turns + cfg.vqa_turns).all()
    # the first grounding answer of scene 0 is its box in coordinate tokens, weighted 1
    scene, g, _ = samples(0, 0, cfg.grounding_turns, cfg.vqa_turns)
    toks = proc.tokenizer.convert_ids_to_tokens(ids[0][w[0] == 1].tolist())
    assert " ".join(toks).count(box_to_tokens(g[0].box, 168, 168)) == 1
    # attention targets are distributions over the 144 patches, queried from '?' onwards
    assert np.allclose(b["att_tgt"].sum(1).numpy(), 1, atol=1e-5)
    r0, p0 = b["att_rows"][0].tolist()
    assert proc.tokenizer.convert_ids_to_tokens([ids[r0, p0].item()]) == ["?"]
    px, labels, attrs, counts = vision_batch(0, [0, 1], 12)
    assert px.shape == (2, 3, 168, 168) and labels.shape == (2, 144) and labels.max() > 0
    assert counts.tolist() == [len(make_scene(0, i).objects) for i in (0, 1)]


def test_supervised_head_rows_match_eager(untrained):
    from nuwa_graph.embedded import train as T

    model, proc = untrained
    torch.manual_seed(0)
    mod = model.model.language_model.layers[1].self_attn
    B, H, L, D = 2, 4, 7, 32
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L).clone()
    allowed[1, :, :, :2] = False   # left padding of row 1
    allowed[1, :, :2, 0] = True
    T._ATT.update(layer=1, head=0, on=True, w=None)
    try:
        _train_attention(mod, q, k, v, allowed, scaling=D ** -0.5)
        got = T._ATT["w"]
    finally:
        T._ATT.update(on=False, w=None)
    from transformers.models.llama.modeling_llama import eager_attention_forward
    add = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    _, want = eager_attention_forward(mod, q, k, v, add, scaling=D ** -0.5)
    assert torch.allclose(got, want[:, 0], atol=1e-6)


def test_a_short_training_run_executes_and_saves(tmp_path):
    """A few steps of both phases on a small model: losses are finite, the supervised head's
    loss is on, the model is saved, reloaded and evaluated, and the log says what ran."""
    import json
    import math

    from rich.console import Console

    from nuwa_graph.embedded import load_embedded
    from nuwa_graph.embedded.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "run"), seed=1, minutes=10, vision_steps=2, lm_steps=3, batch=2, warmup=1,
                      eval_every=0, eval_n=2, final_eval_n=2, dims={"vision_hidden": 32, "vision_mlp": 64,
                                                                     "vision_layers": 2, "text_hidden": 32,
                                                                     "text_mlp": 64, "text_layers": 2})
    import torch

    try:
        with open(tmp_path / "log.txt", "w") as fh:
            log = train(cfg, command="test", console=Console(file=fh))
    finally:
        torch.use_deterministic_algorithms(False)  # train() turns it on for the process
    assert log["images_seen"] == {"vision": 4, "lm": 6} and not log["stopped_early"]
    lm = [h for h in log["history"] if h["phase"] == "lm"]
    assert lm and lm[0]["att_w"] == 1.0 and lm[0]["att"] > 0
    assert all(math.isfinite(h["loss"]) for h in log["history"])
    assert 0.0 <= log["final"]["grounding_acc50"] <= 1.0 and log["final"]["n"] == 2
    saved = json.loads((tmp_path / "run/training_log.json").read_text())
    assert saved["supervised_attention_head"]["layer"] == 1
    model, _ = load_embedded(tmp_path / "run")
    assert model.config.text_config.num_hidden_layers == 2
