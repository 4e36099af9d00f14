"""The device and dtype contract (docs/CONTRACTS.md), enforced without a GPU.

- Every shipped pipeline runs on tiny LLaVA and the tiny Qwen-VL presets (Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL) in bfloat16 (a dtype that differs
  from float32) under `DeviceAudit`: every signal is on the model's device with the contract
  dtype (scores float32, features bfloat16), every node output is on its inputs' device,
  and node bodies run with the default device set to `meta` so a tensor made without
  `device=` is caught.
- A static check: no node module calls a tensor factory without `device=`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from _device_audit import DeviceAudit
from test_pipelines_e2e import LLAVA_CASES, PROMPT, QWEN_CASES

from nuwa_graph import RunError, load
from nuwa_graph.devices import check_port_value, check_signal
from nuwa_graph.types import Scores, Selection

ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def llava_bf16():
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import synthetic_image

    return load_adapter("tiny-llava", DTYPE, "cpu"), synthetic_image()


@pytest.fixture(scope="module", params=["tiny-qwen", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def qwen_bf16(request):
    """Each Qwen-VL generation in bfloat16 (Qwen3-VL: DeepStack rows added in bf16 too)."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import tiny_qwen_image
    from nuwa_graph.adapters.tiny_qwen_vl import unit_pixels

    adapter = load_adapter(request.param, DTYPE, "cpu")
    return adapter, tiny_qwen_image((6, 8), seed=1, unit=unit_pixels(adapter))


def _audit(adapter, image, pipe):
    with DeviceAudit(adapter) as audit:
        rep = adapter.generate(pipe, [image], [PROMPT], max_new_tokens=2, stop_at_eos=False)
    assert not audit.problems, "\n".join(audit.problems)
    return audit, rep


@pytest.mark.parametrize("name", list(LLAVA_CASES))
def test_llava_signals_and_nodes_keep_the_contract_in_bf16(llava_bf16, name):
    adapter, image = llava_bf16
    audit, _ = _audit(adapter, image, load(ROOT / "pipelines" / f"{name}.yaml", LLAVA_CASES[name][0]))
    if name != "vanilla":
        assert audit.outputs, "no node ran"
    for kind, _dev, dt in audit.signals:
        assert dt == (torch.float32 if kind.endswith(("attention", "attention_received")) else DTYPE), kind


# On Qwen2-VL and Qwen3-VL (the same nodes and signals as Qwen2.5-VL, other towers and LLMs): the
# files that read each kind of model signal (vision signals and merges, rows inside the LLM from
# the attention function and from a layer's pre-hook, recycling), not every file again.
OTHER_QWEN = ("fastv", "pdrop", "sparsevlm", "nuwa_qwen")


@pytest.mark.parametrize("name", list(QWEN_CASES))
def test_qwen_signals_and_nodes_keep_the_contract_in_bf16(qwen_bf16, name):
    adapter, image = qwen_bf16
    if adapter.family != "qwen2_5_vl" and name not in OTHER_QWEN:
        pytest.skip(f"{name} on {adapter.family}: covered on Qwen2.5-VL (same nodes and signals)")
    _audit(adapter, image, load(ROOT / "pipelines" / f"{name}.yaml", QWEN_CASES[name]))


_TILED: dict = {}  # one bf16 adapter per preset for this module
TILED_CASES = [("tiny-llava-next", "visionzip", {"budget": 320}), ("tiny-llava-next", "nuwa", {}),
               ("tiny-llava-next", "fastv", {}), ("tiny-internvl", "nuwa", {}), ("tiny-internvl", "downsample", {}),
               ("tiny-llava-onevision", "pdrop", {}), ("tiny-llava-onevision", "vanilla", {})]


@pytest.mark.parametrize("preset,name,over", TILED_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_tiled_families_keep_the_contract_in_bf16(preset, name, over):
    """Per-crop signals (each crop's tensor) and per-crop / per-part node outputs on the model's
    device with the contract dtype, nothing made without device= (meta)."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny_tiled import wide_image

    adapter = _TILED.get(preset) or _TILED.setdefault(preset, load_adapter(preset, DTYPE, "cpu"))
    image = wide_image(160, 64) if preset == "tiny-internvl" else wide_image()
    audit, _ = _audit(adapter, image, load(ROOT / "pipelines" / f"{name}.yaml", over))
    assert name == "vanilla" or audit.outputs


def test_the_audit_catches_a_node_that_makes_a_tensor_without_device(llava_bf16, monkeypatch):
    """The meta trick is what makes the check above able to fail on a CPU."""
    adapter, image = llava_bf16
    pipe = load(ROOT / "pipelines/random.yaml", {"budget": 144})
    node = next(n for n in pipe.nodes.values() if n.family == "random-dropper")

    def bad_run(self, ctx, selection=None):
        return {"selection": Selection(torch.arange(4))}  # no device=

    monkeypatch.setattr(type(node), "run", bad_run)
    with DeviceAudit(adapter) as audit:
        try:
            adapter.generate(pipe, [image], [PROMPT], max_new_tokens=1)
        except (RunError, RuntimeError, NotImplementedError) as exc:  # meta ids fail in the adapter
            audit.problems.append(str(exc))
    assert any("meta" in p for p in audit.problems), audit.problems


def test_check_functions_flag_device_and_dtype():
    assert check_signal("llm.attention", torch.zeros(2, 1, 3, dtype=torch.bfloat16), "cpu", DTYPE)
    assert not check_signal("llm.attention", torch.zeros(2, 1, 3), "cpu", DTYPE)
    assert check_signal("pre_llm.visual", torch.zeros(3, 4), "cpu", DTYPE)
    assert check_signal("llm.hidden", torch.zeros(3, 4, device="meta", dtype=DTYPE), "cpu", DTYPE)
    assert check_port_value("x", Scores(torch.zeros(3, device="meta"), torch.arange(3, device="meta")), "cpu")


# ---- static check ----------------------------------------------------------------------------
FACTORIES = {"zeros", "ones", "arange", "tensor", "full", "empty", "eye", "rand", "randn", "randint", "randperm",
             "linspace", "logspace", "as_tensor", "zeros_like_", "tril_indices", "triu_indices"}


def _factory_calls_without_device(source: str) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch" \
                and f.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords):
            bad.append((node.lineno, f"torch.{f.attr}"))
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "nodes").glob("*.py")), ids=lambda p: p.name)
def test_no_node_creates_a_tensor_without_device(path):
    bad = _factory_calls_without_device(path.read_text(encoding="utf-8"))
    assert not bad, f"{path.name}: " + ", ".join(f"line {n}: {c}(...) without device=" for n, c in bad)


def test_the_static_check_can_fail():
    assert _factory_calls_without_device("import torch\nx = torch.zeros(3)\n") == [(2, "torch.zeros")]
    assert _factory_calls_without_device("import torch\nx = torch.zeros(3, device=y.device)\n") == []
