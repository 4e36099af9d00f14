"""The `cuda` suite: every shipped pipeline on tiny LLaVA, the tiny Qwen-VL presets (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) and the embedded model on
CUDA in float16 and bfloat16, under the device/dtype audit of tests/_device_audit.py.

Skipped (cleanly, at collection) where CUDA is absent; runs whenever it is present:
`pytest -m cuda` on any machine with a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _device_audit import DeviceAudit
from test_pipelines_e2e import LLAVA_CASES, PROMPT, QWEN_CASES, QWEN_PRESETS, _expected_counts

from nuwa_graph import load

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")]

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(DTYPES))
def models(request):
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import synthetic_image, tiny_qwen_image
    from nuwa_graph.adapters.tiny_qwen_vl import unit_pixels
    from nuwa_graph.apps.models import default_model

    dt = DTYPES[request.param]
    out = {"tiny-llava": (load_adapter("tiny-llava", dt, "cuda"), synthetic_image()),
           "embedded": (load_adapter(default_model(), dt, "cuda"), synthetic_image())}
    for preset in QWEN_PRESETS:
        adapter = load_adapter(preset, dt, "cuda")
        out[preset] = (adapter, tiny_qwen_image((6, 8), seed=1, unit=unit_pixels(adapter)))
    return out


def _run(adapter, image, pipe):
    with DeviceAudit(adapter) as audit:
        rep = adapter.generate(pipe, [image], [PROMPT], max_new_tokens=3, stop_at_eos=False)
    assert not audit.problems, "\n".join(audit.problems)
    assert rep.device.startswith("cuda")
    counts = rep.visual_tokens_per_layer[0]
    assert counts == _expected_counts(rep, rep.visual_tokens_full, adapter.n_layers)
    assert len(rep.new_tokens[0]) == 3
    return rep


@pytest.mark.parametrize("name", list(LLAVA_CASES))
@pytest.mark.parametrize("model", ["tiny-llava", "embedded"])
def test_llava_family_pipeline_on_cuda(models, model, name):
    adapter, image = models[model]
    _run(adapter, image, load(ROOT / "pipelines" / f"{name}.yaml", LLAVA_CASES[name][0]))


@pytest.mark.parametrize("name", list(QWEN_CASES))
@pytest.mark.parametrize("model", QWEN_PRESETS)
def test_qwen_pipeline_on_cuda(models, model, name):
    adapter, image = models[model]
    _run(adapter, image, load(ROOT / "pipelines" / f"{name}.yaml", QWEN_CASES[name]))


def test_cuda_run_reports_peak_memory_above_the_weights(models):
    adapter, image = models["tiny-llava"]
    rep = adapter.generate(load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2}), [image], [PROMPT],
                           max_new_tokens=2)
    assert rep.peak_memory_source.startswith("torch.cuda")
    assert rep.peak_memory_bytes > 0
