"""What a GPU run needs besides the device contract, checked on a CPU (issue 20):

- timings under a device_map wait for every GPU of the model and peak memory reads every GPU;
  node times are synchronised (virtual devices count the synchronize calls);
- data-parallel eval: `--device cuda` under torchrun puts rank r on cuda:LOCAL_RANK (and makes
  it the current device); `--device-map` with WORLD_SIZE > 1 is refused with what to do;
- `--dtype auto` on CUDA is the dtype each family's official code runs (LLaVA, LLaVA-NeXT,
  LLaVA-OneVision float16; the Qwen-VL line, InternVL bfloat16), said in --help and in the run report;
- tiny presets and benchmark models cast to half keep RoPE `inv_freq` in float32, as
  `from_pretrained` does;
- Qwen's attention_received keeps its score blocks near CHUNK_ELEMENTS at any resolution;
- applying a Keep launches work per site, not per kept token (pre-LLM and merged rows at llm.K).
"""

from __future__ import annotations

import importlib
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from _virtual_devices import VirtualDevices, device_map
from torch.overrides import TorchFunctionMode

from nuwa_graph import load
from nuwa_graph.adapters import PRESETS, load_adapter
from nuwa_graph.adapters.tiny import synthetic_image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on one thread
PROMPT = "what colour is the square ?"


def _preset(name, dtype=torch.float32):
    mod, fn = PRESETS[name]
    return getattr(importlib.import_module(mod), fn)(dtype=dtype, device="cpu")


# ---- timing and memory over every device ------------------------------------------------------
def _timed_run(adapter, pipe, boundary, sync_nodes=True, new_tokens=3):
    saved = adapter.device
    adapter.sync_node_timing = sync_nodes
    try:
        with VirtualDevices(2) as vd:
            vd.dispatch(adapter.model, device_map(adapter, boundary))
            adapter.device = torch.device("cuda:0")
            rep = adapter.generate(pipe, [synthetic_image(96)], [PROMPT], max_new_tokens=new_tokens, stop_at_eos=False)
    finally:
        adapter.device = saved
        del adapter.sync_node_timing
    return vd, rep


def test_timings_wait_for_every_gpu_and_each_node(tiny_llava):
    pipe = load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2})
    nodes = len(pipe.nodes)
    vd, rep = _timed_run(tiny_llava, pipe, boundary=2)
    per_device = {d: vd.synchronized.count(d) for d in ("cuda:0", "cuda:1")}
    # prefill: before and after; each node: before and after; each of the 2 decode steps: after
    assert per_device == {"cuda:0": 2 + 2 * nodes + 2, "cuda:1": 2 + 2 * nodes + 2}, per_device
    assert rep.node_ms_synchronized and rep.devices == ["cuda:0", "cuda:1"]
    assert {d for op, d in vd.memory_reads if op == "max_memory_allocated"} == {"cuda:0", "cuda:1"}
    assert rep.peak_memory_source.startswith("torch.cuda.max_memory_allocated (sum over cuda:0, cuda:1)")
    assert set(rep.peak_memory_per_device) == {"cuda:0", "cuda:1"}
    # without node timing: only prefill and steps wait, and the report says the node times are host-only
    vd, rep = _timed_run(tiny_llava, pipe, boundary=2, sync_nodes=False)
    assert vd.synchronized.count("cuda:1") == 4 and not rep.node_ms_synchronized


def test_peak_memory_sums_every_gpu(monkeypatch):
    from nuwa_graph.adapters.report import PeakMemory

    peaks = {0: 100, 1: 50}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 10)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: peaks[torch.device(d).index])
    with PeakMemory([torch.device("cuda:0"), torch.device("cuda:1")]) as mem:
        pass
    assert mem.peak == 150 and mem.start == 20 and mem.per_device == {"cuda:0": 100, "cuda:1": 50}


def test_model_devices_reads_the_device_map():
    from nuwa_graph.adapters.report import model_devices

    model = torch.nn.Linear(1, 1)
    assert model_devices(model, "cpu") == [torch.device("cpu")]
    model.hf_device_map = {"a": 0, "b": 1, "c": "cpu", "d": "disk", "e": 1}
    assert model_devices(model, "cuda:0") == [torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")]


# ---- data parallel ---------------------------------------------------------------------------
@pytest.fixture
def four_gpus(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_torchrun_puts_each_rank_on_its_gpu(four_gpus):
    from nuwa_graph.apps.shards import Shard, device_for

    rank5 = Shard.from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "5"})
    assert device_for(rank5, "cuda") == "cuda:1" and four_gpus == ["cuda:1"]
    assert device_for(rank5, "auto") == "cuda:1"
    assert device_for(rank5, "cuda:3") == "cuda:3" and device_for(rank5, "cpu") == "cpu"  # explicit: kept
    assert device_for(None, "cuda") == "cuda" and device_for(Shard(0, 2), "cuda") == "cuda"  # not launched
    assert four_gpus == ["cuda:1", "cuda:1"]


def test_a_device_map_under_torchrun_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nuwa_graph.apps.cli import app
    from nuwa_graph.apps.errors import EvalError
    from nuwa_graph.apps.shards import Shard, check_launch

    with pytest.raises(EvalError, match=r"--device-map auto with WORLD_SIZE=2.*--device cuda"):
        check_launch(Shard(1, 2, launched=True), "auto")
    check_launch(Shard(1, 2), "auto")  # --shard jobs are separate processes: fine
    check_launch(Shard(1, 2, launched=True), None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = CliRunner().invoke(app, ["eval", str(ROOT / "pipelines/vanilla.yaml"), "--device-map", "auto",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "WORLD_SIZE=2" in res.output and "Traceback" not in res.output


# ---- dtype auto per family -------------------------------------------------------------------
def test_auto_dtype_is_what_the_official_code_runs():
    from nuwa_graph.adapters import auto_dtype
    from nuwa_graph.adapters.llava import LlavaAdapter
    from nuwa_graph.adapters.qwen import QwenAdapter
    from nuwa_graph.apps.runner import resolve_dtype

    assert auto_dtype(LlavaAdapter, "cuda")[0] == torch.float16
    assert auto_dtype(QwenAdapter, "cuda:1")[0] == torch.bfloat16
    assert "LLaVA-1.5's official code" in auto_dtype(LlavaAdapter, "cuda")[1]
    # the tiled families: LLaVA-NeXT and OneVision's official loaders default to float16, InternVL's to bfloat16
    from nuwa_graph.adapters.internvl import InternVLAdapter
    from nuwa_graph.adapters.llava_next import LlavaNextAdapter
    from nuwa_graph.adapters.llava_onevision import LlavaOnevisionAdapter

    assert auto_dtype(LlavaNextAdapter, "cuda")[0] == torch.float16
    assert auto_dtype(LlavaOnevisionAdapter, "cuda")[0] == torch.float16
    assert auto_dtype(InternVLAdapter, "cuda")[0] == torch.bfloat16
    assert "LLaVA-NeXT's official code" in auto_dtype(LlavaNextAdapter, "cuda")[1]
    assert auto_dtype(QwenAdapter, "cpu") == (torch.float32, "auto: float32 on cpu")
    assert resolve_dtype("auto", "cuda") == "auto" and resolve_dtype(None, "cpu") == "auto"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dtype_auto_on_cuda_per_family(preset):
    from nuwa_graph.adapters import auto_dtype

    with VirtualDevices(1) as vd:
        adapter = load_adapter(preset, "auto", "cuda")
        want, why = auto_dtype(type(adapter), "cuda")
        assert adapter.dtype == want and adapter.dtype_reason == why
        assert {p.dtype for p in adapter.model.parameters()} == {want}
        vd.place(adapter.model, 0)  # (module moves under the harness do not tag parameters)
        image = synthetic_image(96)
        rep = adapter.generate(load(ROOT / "pipelines/vanilla.yaml"), [image], [PROMPT], max_new_tokens=1)
    assert rep.dtype == str(want).replace("torch.", "") and rep.dtype_reason == why
    assert rep.device == "cuda:0" and not vd.violations


def test_run_report_and_help_say_which_dtype(capsys):
    from typer.testing import CliRunner

    from nuwa_graph.apps.cli import app
    from nuwa_graph.apps.runner import run_command

    assert run_command(ROOT / "pipelines/vanilla.yaml", model="tiny-llava", max_new_tokens=1, dtype="auto",
                       device="cpu") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "float32 (auto: float32 on cpu)" in out
    text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output.replace("│", " ").split())
    assert "float16: LLaVA, LLaVA-NeXT, LLaVA-OneVision;" in text and "bfloat16: the Qwen-VL line, InternVL" in text


# ---- RoPE frequencies stay float32 -------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_half_presets_keep_rope_frequencies_as_from_pretrained(preset, tmp_path):
    adapter = _preset(preset, torch.bfloat16)
    fp32 = _preset(preset)
    fp32.model.save_pretrained(tmp_path)
    loaded = type(fp32.model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    want = {n: b.dtype for n, b in loaded.named_buffers() if b.is_floating_point()}
    got = {n: b.dtype for n, b in adapter.model.named_buffers() if b.is_floating_point()}
    assert any(n.endswith("inv_freq") for n in want)
    assert got == want
    for n, b in adapter.model.named_buffers():
        if n.endswith("inv_freq"):
            torch.testing.assert_close(b, dict(fp32.model.named_buffers())[n], rtol=0, atol=0)


def test_benchmark_models_keep_rope_frequencies_in_float32():
    bench = importlib.import_module("benchmarks.bench_adapters")
    args = Namespace(vision_hidden=64, vision_layers=1, llm_hidden=128, llm_layers=1)
    for make in (bench.random_llava, bench.random_qwen):
        adapter = make(torch.float16, "cpu", "sdpa", args)
        bufs = {n: b.dtype for n, b in adapter.model.named_buffers() if n.endswith("inv_freq")}
        assert bufs and set(bufs.values()) == {torch.float32}, bufs
        assert {p.dtype for p in adapter.model.parameters()} == {torch.float16}


# ---- bounded score blocks in Qwen's attention_received -------------------------------------------
def test_attention_received_blocks_stay_near_the_element_budget(monkeypatch):
    from nuwa_graph.adapters import qwen

    torch.manual_seed(0)
    q, k = torch.randn(4, 1024, 8), torch.randn(4, 1024, 8)
    cu = torch.tensor([0, 1024])
    full = qwen.attention_received(q, k, cu, 0.35, chunk=1024)
    sizes = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.softmax:
                sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(qwen, "CHUNK_ELEMENTS", 4 * 64 * 1024, raising=False)
    with Spy():
        got = qwen.attention_received(q, k, cu, 0.35)
    assert max(sizes) <= 4 * 64 * 1024 and len(sizes) == 16
    torch.testing.assert_close(got, full)


# ---- applying a Keep: one gather, not one copy per kept token ----------------------------------
class CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _calls_in(monkeypatch, owner, name, run):
    counter = CountCalls()
    real = getattr(owner, name)

    def counted(*a, **kw):
        with counter:
            return real(*a, **kw)

    monkeypatch.setattr(owner, name, counted)
    run()
    monkeypatch.undo()
    return counter.n


def test_a_pre_llm_keep_costs_the_same_for_any_count(tiny_llava, tiny_image, monkeypatch):
    from nuwa_graph.adapters.generation import Generation

    calls = {}
    for budget in (64, 288):  # 7 and 32 kept tokens of 64
        pipe = load(ROOT / "pipelines/random.yaml", {"budget": budget})
        calls[budget] = _calls_in(monkeypatch, Generation, "_apply_pre_keep",
                                  lambda pipe=pipe: tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=1))
    assert calls[64] == calls[288], calls


def test_merged_rows_at_llm_k_cost_the_same_for_any_count(tiny_llava, tiny_image, monkeypatch):
    from nuwa_graph.adapters import session

    calls = {}
    for budget in (64, 192):  # SparseVLM recycles more tokens into more merged rows at a larger budget
        pipe = load(ROOT / "pipelines/sparsevlm.yaml", {"budget": budget})
        calls[budget] = _calls_in(monkeypatch, session, "gather_hidden",
                                  lambda pipe=pipe: tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=1))
    assert calls[64] == calls[192], calls


# ---- SDPA can pick its flash kernel in pruned layers --------------------------------------------
def test_unpadded_pruned_layers_give_sdpa_no_mask(tiny_llava, tiny_image, monkeypatch):
    """A segment after an llm.K prune, unpadded: no 4-D mask (SDPA runs is_causal and may pick its
    flash kernel); in a left-padded batch the mask stays."""
    from transformers.integrations import sdpa_attention

    masks: list = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, q, k, v, attention_mask, **kw):
        masks.append((getattr(module, "layer_idx", None), q.shape[2], attention_mask))
        return real(module, q, k, v, attention_mask, **kw)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    pipe = load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2})
    tiny_llava.generate(pipe, [tiny_image], [PROMPT], max_new_tokens=2, stop_at_eos=False)
    pruned = [m for layer, _, m in masks if layer is not None and layer >= 2]
    assert pruned and all(m is None for m in pruned)
    masks.clear()
    tiny_llava.generate(pipe, [tiny_image] * 2, [PROMPT, "how many shapes are there in the image ?"],
                        max_new_tokens=2, stop_at_eos=False)
    pruned = [m for layer, _, m in masks if layer is not None and layer >= 2]
    assert pruned and all(m is not None and m.dim() == 4 for m in pruned)


# ---- SparseVLM's tie-break in half precision follows the official code ---------------------------
def test_sparsevlm_density_is_computed_in_the_hidden_dtype_as_the_official_code():
    """The official cluster_and_merge computes the densities, and adds the 1e-6 noise, in the hidden
    states' dtype (float16 in its runs). Recomputed here independently in float16: the node
    picks the same centres, and the noise is below float16's resolution near 1."""
    from nuwa_graph.nodes.sparsevlm import dpc_knn_merge

    torch.manual_seed(0)
    x = torch.randn(40, 16).half()
    x[20:] = x[:20]  # duplicated rows: equal densities in pairs
    noise = torch.rand(40)
    _, centres = dpc_knn_merge(x, 5, noise, "seeded-noise")
    dist = torch.cdist(x.float(), x.float()).half() / 4.0
    density = (-(dist.topk(5, largest=False).values ** 2).mean(-1)).exp()
    assert density.dtype == torch.float16
    noisy = density + noise.half() * 1e-6
    assert torch.equal(noisy[density > 0.5], density[density > 0.5])  # the noise vanishes near 1
    # the centres are those of the official rule on the float16 densities
    higher = (noisy[None, :] > noisy[:, None]).half()
    delta = (dist * higher + dist.max() * (1 - higher)).min(-1).values
    assert set(torch.topk(delta * noisy, 5).indices.tolist()) == set(centres.tolist())
