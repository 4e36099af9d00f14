"""What a run did and cost: the RunReport, and the peak-memory probe around a run."""

from __future__ import annotations

import re
import tracemalloc
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from .state import AdapterRun

if TYPE_CHECKING:
    from .generation import Generation


@dataclass
class RunReport:
    """What a run did and cost. Lists are per sample."""

    model: str
    pipeline: str
    answers: list[str]
    new_tokens: list[list[int]]
    visual_tokens_per_layer: list[list[int]]  # measured in the layer hooks at prefill
    visual_tokens_avg: list[float]
    visual_tokens_full: int
    prefill_ms: float
    decode_ms_per_token: float
    decode_steps: int
    peak_memory_bytes: int
    peak_memory_source: str
    kv_cache_bytes: int
    node_ms: dict[str, float]
    kept: list[dict[str, list[int]]]  # per sample: site -> kept original ids (last Keep there)
    actions: list[list[dict[str, Any]]]  # per sample: every Keep (site, node, count, positions)
    device: str = "cpu"
    dtype: str = "float32"
    schedule: dict[str, Any] = field(default_factory=dict)  # file run, variable values and their origin, sites
    signals: list[str] = field(default_factory=list)  # every model signal read: "kind(args) at site"
    flops: list[dict[str, Any]] = field(default_factory=list)  # per sample: nuwa_graph.flops.run_flops
    attn_implementation: str = "sdpa"
    peak_memory_above_start_bytes: int | None = None  # CUDA: peak minus what was allocated before (the weights)
    visual_tokens_full_per_sample: list[int] = field(default_factory=list)  # image tokens before pruning
    # per sample: the image's parts as picture views (label, rows x cols ids; Geometry.views), [] for one grid
    views: list[list[Any]] = field(default_factory=list)
    geometry: list[str] = field(default_factory=list)  # per sample: the parts, e.g. "grid 24x24, tiles 36x48, ..."
    # per sample: [rows, cols] of an image that is one grid (its kept ids are raster ids; the Qwen-VL line's
    # merged grid differs per image), None where `views` draw it
    grids: list[list[int] | None] = field(default_factory=list)
    dtype_reason: str = ""  # why this dtype (--dtype auto: the dtype the family's official code runs)
    devices: list[str] = field(default_factory=list)  # every device holding part of the model
    peak_memory_per_device: dict[str, int] = field(default_factory=dict)  # CUDA: each GPU's peak
    node_ms_synchronized: bool = True  # node times include their GPU work (every device synchronised)
    ttft_ms: float = 0.0  # time to first token: from the generate call (inputs encoded) to the first token id on the host
    # per sample, the run's Keep actions as tensors, for a replay on another prompt (nuwa_graph/replay.py);
    # not part of to_dict()
    keeps: list[list[Any]] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, keeps=[]))
        out.pop("keeps")
        return out



Devices: TypeAlias = "torch.device | str | list[torch.device]"


def model_devices(model: Any, fallback: torch.device | str) -> list[torch.device]:
    """Every device that holds part of `model`: those of its `hf_device_map` (set by accelerate
    under a device_map; ints are GPU indices; offloaded "disk" parts are left out), else
    `fallback` (the adapter's device)."""
    dmap = getattr(model, "hf_device_map", None) or {}
    out: list[torch.device] = []
    for v in dmap.values():
        if v == "disk":
            continue
        d = torch.device("cuda", v) if isinstance(v, int) else torch.device(v)
        if d not in out:
            out.append(d)
    return out or [torch.device(fallback)]


def _devices(devices: Devices) -> list[torch.device]:
    return [torch.device(d) for d in devices] if isinstance(devices, list) else [torch.device(devices)]


def sync(devices: Devices) -> None:
    """Wait for the queued work of every CUDA device given (one device or a list)."""
    for d in _devices(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


class PeakMemory:
    """Peak memory of a block: torch.cuda on GPU (summed over every CUDA device given: under a
    device_map each GPU holds its share; `per_device` keeps each); on CPU the process peak RSS
    (VmHWM, reset through /proc/self/clear_refs), else tracemalloc (Python heap only)."""

    def __init__(self, devices: Devices):
        self.devices = _devices(devices)
        self.cuda = [d for d in self.devices if d.type == "cuda"]
        self.device = self.cuda[0] if self.cuda else self.devices[0]
        self.source = ""
        self.peak = 0
        self.start = 0
        self.per_device: dict[str, int] = {}
        self._tm = False

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def __enter__(self):
        if self.cuda:
            for d in self.cuda:
                torch.cuda.reset_peak_memory_stats(d)
            self.start = sum(int(torch.cuda.memory_allocated(d)) for d in self.cuda)
            self.source = "torch.cuda.max_memory_allocated" + (
                f" (sum over {', '.join(str(d) for d in self.cuda)})" if len(self.cuda) > 1 else "")
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if self._hwm() is not None:
                self.source = "peak RSS of the process (VmHWM)"
                return self
        except OSError:
            pass
        self.source = "tracemalloc (Python heap only)"
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._tm = True
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.per_device = {str(d): int(torch.cuda.max_memory_allocated(d)) for d in self.cuda}
            self.peak = sum(self.per_device.values())
        elif self.source.startswith("peak RSS"):
            self.peak = int(self._hwm() or 0)
        else:
            self.peak = int(tracemalloc.get_traced_memory()[1])
            if self._tm:
                tracemalloc.stop()
        return False


def build_report(adapter: Generation, r: AdapterRun, new_tokens: list[list[int]], prefill_s: float, decode_s: float,
                 steps: int, mem: PeakMemory, kv: int) -> RunReport:
    """The RunReport of a finished run (times in seconds, memory as measured by `mem`)."""
    assert r.state is not None
    kept: list[dict[str, list[int]]] = []
    actions: list[list[dict[str, Any]]] = []
    for b in range(r.B):
        kb: dict[str, list[int]] = {}
        ab = []
        for a in r.state.actions[b]:
            kb[a.site] = a.ids.tolist()
            ab.append({"site": a.site, "node": a.node, "kept": int(a.ids.numel()),
                       "merged": a.tokens is not None,
                       "positions": None if a.positions is None else a.positions.policy})
        kept.append(kb)
        actions.append(ab)
    counts = [c[: adapter.n_layers] for c in r.counts]
    flops = [run_flops_of(adapter, r, b, counts[b]) for b in range(r.B)]
    return RunReport(
        model=adapter.name, pipeline=r.ex.pipeline.name,
        answers=[adapter.decode_text(t) for t in new_tokens], new_tokens=new_tokens,
        visual_tokens_per_layer=counts,
        visual_tokens_avg=[sum(c) / len(c) if c else 0.0 for c in counts],
        visual_tokens_full=r.layouts[0].n_image if r.layouts else 0,
        prefill_ms=prefill_s * 1e3, decode_ms_per_token=(decode_s / steps * 1e3) if steps else 0.0,
        decode_steps=steps, peak_memory_bytes=mem.peak, peak_memory_source=mem.source, kv_cache_bytes=kv,
        node_ms={k: v * 1e3 for k, v in r.state.timings.items()}, kept=kept, actions=actions,
        device=str(adapter.device), dtype=str(adapter.dtype).replace("torch.", ""), flops=flops,
        attn_implementation=adapter.attn_implementation,
        peak_memory_above_start_bytes=(mem.peak - mem.start) if mem.cuda else None,
        visual_tokens_full_per_sample=[lay.n_image for lay in r.layouts],
        views=[[] if g.simple else [list(v) for v in g.views()] for g in r.state.geometries],
        geometry=[g.describe() for g in r.state.geometries],
        grids=[[int(x) for x in g.grid] if g.simple else None for g in r.state.geometries],
        dtype_reason=adapter.dtype_reason, devices=[str(d) for d in mem.devices],
        peak_memory_per_device=dict(mem.per_device),
        node_ms_synchronized=r.state.sync is not None or not mem.cuda,
    )


def run_flops_of(adapter: Generation, r: AdapterRun, b: int, counts: list[int]) -> dict[str, Any]:
    """FLOPs of sample b (nuwa_graph/flops.py); a model whose config lacks a field says so."""
    from ..flops import run_flops

    assert r.state is not None
    try:
        geom = r.state.geometries[b]
        images = [(g.grid if g.simple else None, max(1, len(g.crops))) for g in geom.blocks] or None
        return run_flops(adapter.model.config, int(r.segments[0].n_text[b]), counts, r.layouts[b].n_image,
                         geom.grid if geom.simple else None, max(1, len(geom.crops)), images)
    except (AttributeError, TypeError, ValueError) as exc:
        return {"unavailable": f"FLOPs cannot be counted for this config: {exc}"}


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key and value tensors (0 without a cache)."""
    kv = 0
    for lay in getattr(cache, "layers", []):
        for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
            if isinstance(t, torch.Tensor):
                kv += t.numel() * t.element_size()
    return kv
