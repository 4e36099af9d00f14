"""--attn-implementation and --device-map: the model's own attention runs where no scorer reads.

On CPU: eager and sdpa keep the same tokens and give the same logits (within float32
tolerance) for methods that read attention rows at and inside the LLM, on tiny LLaVA and
tiny Qwen; the chosen implementation is what the layers actually call; bad names and a
missing flash-attn are clear errors; device_map is passed through to from_pretrained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from nuwa_graph import RunError, load
from nuwa_graph.adapters import load_adapter

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "what colour is the square ?"
LLAVA = {"fastv": {"budget": 144, "K": 2}, "pdrop": {"budget": 64, "layers": [1, 2, 3]},
         "sparsevlm": {"budget": 64, "layers": [0, 1, 2]}, "visionzip": {"budget": 144},
         "vtw": {"budget": 144}, "dart": {"budget": 144, "K": 2}, "hiprune": {"budget": 144}}
QWEN = {"fastv": {"budget": 16, "K": 2}, "pdrop": {"budget": 64, "layers": [1, 2, 3]}, "vtw": {"budget": 288}}


def _run(adapter, image, name, overrides):
    rep = adapter.generate(load(ROOT / "pipelines" / f"{name}.yaml", overrides), [image], [PROMPT], max_new_tokens=3,
                           stop_at_eos=False, return_logits=True)
    return rep.kept[0], torch.stack(rep.step_logits), rep


def _count_eager_calls(monkeypatch, module_name: str) -> list[int]:
    mod = sys.modules[module_name]
    calls = [0]
    orig = mod.eager_attention_forward

    def counting(*a, **kw):
        calls[0] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(mod, "eager_attention_forward", counting)
    return calls


@pytest.mark.parametrize("name", list(LLAVA))
def test_eager_and_sdpa_agree_on_tiny_llava(tiny_image, name, monkeypatch):
    sdpa = load_adapter("tiny-llava", "float32", "cpu", attn_implementation="sdpa")
    eager = load_adapter("tiny-llava", "float32", "cpu", attn_implementation="eager")
    calls = _count_eager_calls(monkeypatch, "transformers.models.llama.modeling_llama")
    kept_s, logits_s, _ = _run(sdpa, tiny_image, name, LLAVA[name])
    assert calls[0] == 0
    kept_e, logits_e, rep = _run(eager, tiny_image, name, LLAVA[name])
    assert calls[0] >= eager.n_layers  # the LLM layers ran the model's own eager attention
    assert rep.attn_implementation == "eager"
    assert kept_s == kept_e
    assert (logits_s - logits_e).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(QWEN))
def test_eager_and_sdpa_agree_on_tiny_qwen(name):
    from nuwa_graph.adapters.tiny import tiny_qwen, tiny_qwen_image

    image = tiny_qwen_image((6, 8), seed=1)
    kept_s, logits_s, _ = _run(tiny_qwen(), image, name, QWEN[name])
    kept_e, logits_e, _ = _run(tiny_qwen().set_attn_implementation("eager"), image, name, QWEN[name])
    assert kept_s == kept_e
    assert (logits_s - logits_e).abs().max().item() <= 1e-4


def test_the_implementation_is_restored_after_a_run(tiny_image):
    a = load_adapter("tiny-llava", "float32", "cpu", attn_implementation="eager")
    _run(a, tiny_image, "fastv", LLAVA["fastv"])
    assert a.model.config.text_config._attn_implementation == "eager"


def test_bad_attention_implementation_is_a_clear_error():
    with pytest.raises(RunError, match="unknown attention implementation 'flash'.*sdpa, flash_attention_2, eager"):
        load_adapter("tiny-llava", attn_implementation="flash")


@pytest.mark.skipif(bool(__import__("importlib").util.find_spec("flash_attn")), reason="flash-attn is installed")
def test_flash_attention_without_the_package_says_so():
    with pytest.raises(RunError, match="flash-attn"):
        load_adapter("tiny-llava", attn_implementation="flash_attention_2")


def test_device_map_is_passed_to_from_pretrained(tiny_image, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import LlavaForConditionalGeneration

    from nuwa_graph.apps.models import default_model

    seen = {}
    orig = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    a = load_adapter(default_model(), "float32", "cpu", attn_implementation="eager", device_map="auto")
    assert seen["device_map"] == "auto" and seen["attn_implementation"] == "eager"
    assert a.device == torch.device("cpu")
    rep = a.generate(load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2}), [tiny_image], [PROMPT],
                     max_new_tokens=2)
    assert rep.visual_tokens_per_layer[0][-1] < rep.visual_tokens_full
    load_adapter(default_model(), "float32", "cpu")
    assert seen["device_map"] == "cpu"  # straight onto the device, not through a CPU copy first


def test_device_map_on_a_preset_is_refused():
    with pytest.raises(RunError, match="device_map applies to checkpoints"):
        load_adapter("tiny-llava", device_map="auto")


def test_cli_run_takes_attn_implementation_and_batch(capsys):
    from typer.testing import CliRunner

    from nuwa_graph.apps.cli import app

    res = CliRunner().invoke(app, ["run", str(ROOT / "pipelines/fastv.yaml"), "--prompt", PROMPT, "--device", "cpu",
                                   "--attn-implementation", "eager", "--batch", "2", "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["attn_implementation"] == "eager"
    assert len(data["answers"]) == 2 and len(data["flops"]) == 2
    assert data["flops"][0]["prefill_ratio"] < 1.0
