"""The `cuda` suite: what must hold on a real GPU, with the checks of scripts/gpu_check.py.

Skipped (cleanly, at collection) where CUDA is absent; runs whenever it is present:
`pytest -m cuda` on any machine with a GPU (`python scripts/gpu_check.py --device cuda --out
DIR` runs the same checks over every pipeline and writes a report). On one GPU, for every
shipped pipeline of every family (tiny presets and the embedded model):

- float32 on the GPU keeps the same tokens and greedy answer as float32 on the CPU (TF32
  off); float16 and bfloat16 give finite logits and node scores (their kept-set Jaccard
  against float32 is in the gpu_check report, not asserted: half precision moves near ties);
- every signal and node output keeps the device/dtype contract (tests/_device_audit.py), and
  the per-layer counts follow the pipeline's own Keep actions;
- a left-padded batch of two equals each prompt alone; eager equals sdpa; flash_attention_2
  (where flash-attn imports) agrees with sdpa in float16;
- each decode step makes one host sync (torch.cuda.set_sync_debug_mode), the next token;
- on two GPUs (skipped unless there are two): the model dispatched by accelerate with the
  layer boundary on each layer the pipeline reads or prunes: the same kept tokens as on one GPU.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from _device_audit import DeviceAudit

from nuwa_graph.adapters import PRESETS

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
gc = pytest.importorskip("gpu_check")  # scripts/gpu_check.py: the checks are written once, there

MODELS = sorted(PRESETS) + ["embedded"]
PIPELINES = gc.PIPELINES


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def cpu_reference(model):
    return gc.build(model, "float32", "cpu")


@pytest.fixture(scope="module")
def on_gpu(model):
    return {dt: gc.build(model, dt, "cuda") for dt in gc.DTYPES}


def _pipe(adapter, name):
    pipes = gc.runnable(adapter, [name])
    if not pipes:
        pytest.skip(f"{name} is refused on this family")
    return pipes[0][1]


@pytest.mark.parametrize("name", PIPELINES)
def test_agreement_with_float32_on_the_cpu(cpu_reference, on_gpu, name):
    pipe = _pipe(cpu_reference, name)
    ref = gc.run(cpu_reference, pipe)
    for dtype, adapter in on_gpu.items():
        with gc.no_tf32():
            got = gc.run(adapter, pipe)
        cmp = gc.compare(ref, got)
        assert cmp["finite"], f"{dtype}: non-finite logits or scores"
        if dtype == "float32":
            assert cmp["same_tokens"] and cmp["min_jaccard"] == 1.0, (dtype, cmp)


@pytest.mark.parametrize("name", PIPELINES)
def test_device_contract_and_schedule_on_the_gpu(on_gpu, name):
    from test_pipelines_e2e import PROMPT, _expected_counts

    for adapter in on_gpu.values():
        pipe = _pipe(adapter, name)
        with DeviceAudit(adapter) as audit:
            rep = adapter.generate(pipe, gc.images(1, adapter), [PROMPT], max_new_tokens=3, stop_at_eos=False)
        assert not audit.problems, "\n".join(audit.problems)
        assert rep.device.startswith("cuda")
        assert rep.visual_tokens_per_layer[0] == _expected_counts(rep, rep.visual_tokens_full, adapter.n_layers)
        assert rep.peak_memory_source.startswith("torch.cuda") and rep.peak_memory_above_start_bytes is not None


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm", "random", "nuwa", "visionzip", "feather", "downsample",
                                  "vanilla"])  # seeded draws follow the sample's content, not its batch place
def test_padded_batch_equals_each_prompt_alone(model, name):
    rows = gc.check_padded_batch("cuda", [model], [name])
    for r in rows:
        assert r["same_kept"] and r["same_tokens"] and r["max_logit_diff"] <= 1e-3, r


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm", "nuwa"])
def test_attention_implementations_agree(model, name):
    for r in gc.check_attention("cuda", [model], [name]):
        if "skipped" in r:
            continue
        assert r["finite"], r
        if r["implementation"] == "eager":  # same dtype, same math
            assert r["min_jaccard"] == 1.0 and r["same_tokens"], r
        else:  # flash in float16: different reduction order
            assert r["min_jaccard"] >= 0.9, r


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_is_refused_clearly_without_the_package():
    from nuwa_graph import RunError
    from nuwa_graph.adapters import load_adapter

    with pytest.raises(RunError, match="flash-attn"):
        load_adapter("tiny-llava", "float16", "cuda", attn_implementation="flash_attention_2")


@pytest.mark.parametrize("name", ["vanilla", "fastv", "pdrop", "sparsevlm", "nuwa"])
def test_one_host_sync_per_decode_step(on_gpu, name):
    for dtype, adapter in on_gpu.items():
        pipe = _pipe(adapter, name)
        for B in (1, 2):
            assert gc.syncs_per_step(adapter, pipe, B) == 1, (dtype, B)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["fastv", "pdrop", "feather", "sparsevlm", "nuwa"])
def test_two_gpus_keep_what_one_gpu_keeps(model, name):
    from _virtual_devices import device_map
    from accelerate import dispatch_model

    one = gc.build(model, "float32", "cuda:0")
    pipe = _pipe(one, name)
    with gc.no_tf32():
        ref = gc.run(one, pipe, B=2)
    bound = one._bind(pipe)
    layers = sorted({s.layer for s in bound.sites() if s.layer is not None}) or [one.n_layers // 2]
    for b in [x for x in layers if 0 < x < one.n_layers]:
        two = gc.build(model, "float32", "cpu")
        dispatch_model(two.model, device_map=device_map(two, b, vision_device=1))
        two.device = two.model.get_input_embeddings().weight.device
        with gc.no_tf32():
            got = gc.run(two, pipe, B=2)
        cmp = gc.compare(ref, got)
        assert cmp["finite"] and cmp["min_jaccard"] == 1.0 and cmp["same_tokens"], (b, cmp)
