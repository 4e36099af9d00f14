"""Virtual CUDA devices on a CPU: GPU semantics for tests, without a GPU.

`VirtualDevices` is a `TorchFunctionMode`. Every tensor carries a device tag (`cuda:0`,
`cuda:1`, or none = the CPU) while its data stays on the CPU:

- `x.device`, `x.is_cuda`, `x.is_cpu`, `x.get_device()` answer the tag, so code that branches
  on "cuda" runs its CUDA branch and `device=x.device` / `.to(h.device)` carry the tag on;
- factories with `device="cuda:N"`, `.to(...)`, `.cuda()`, `.cpu()` run on the CPU and tag the
  result (a new tensor when the device changes, as on a GPU);
- every op that mixes devices as CUDA refuses it is recorded as a violation: tensors on two
  GPUs, a non-scalar CPU tensor with a GPU tensor (CPU index tensors for `gather`,
  `index_select`, `scatter` ... included), `numpy()` of a GPU tensor. What CUDA allows is
  allowed: 0-dim CPU tensors as scalars, `copy_` and `x[idx]` / `x[idx] = v` with a CPU index
  (counted as the host-to-device copy CUDA makes of it);
- host syncs (`item`, `tolist`, `bool`/`int`/`float` of a tensor, `nonzero`, `unique`,
  boolean-mask indexing, `torch.equal`...) and host<->device copies (`.cpu()`, `.to(...)`,
  `torch.tensor(data, device=...)`, a Python list or CPU tensor used as an index of a GPU
  tensor) are recorded as `Event`s with the file:line of the first project frame and the
  current `label` (the test sets it, e.g. per decode step);
- `dispatch(model, device_map)` places modules (tags their parameters and buffers) and wraps
  each mapped module's `forward` the way accelerate's `AlignDevicesHook` does
  (`add_hook_to_module` replaces `forward`), so forward pre-hooks run BEFORE the inputs are
  moved to the module's device, as they do under accelerate; `model.hf_device_map` is set;
- `torch.cuda.synchronize`, `is_available`, `device_count`, `current_device`, `set_device` and
  the memory statistics are stubbed; calls are recorded (`synchronized`, `memory_reads`).

Limits: CUDA's cross-device rules are modelled by hand (below); no CUDA kernel, dtype support,
numerics, stream or generator is modelled; accelerate is imitated, not run.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import GetSetDescriptorType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
_PROJECT = (str(ROOT / "nuwa_graph"), str(ROOT / "nodes"), str(ROOT / "scripts"), str(ROOT / "benchmarks"))
_HERE = str(Path(__file__).resolve())
_TB = torch._C.TensorBase

_TAG = "_virtual_device"
_DEVICE_PROPS = {_TB.device: "device", _TB.is_cuda: "is_cuda", _TB.is_cpu: "is_cpu"}
# methods whose Python result needs the GPU's data on the host: a sync (and a device-to-host copy)
_HOST_READS = {_TB.item: "item", _TB.tolist: "tolist", _TB.__bool__: "bool", _TB.__int__: "int",
               _TB.__float__: "float", _TB.__index__: "index", torch.Tensor.__contains__: "in",
               torch.Tensor.__format__: "format", torch.Tensor.__repr__: "repr", torch.equal: "torch.equal",
               torch.allclose: "torch.allclose", _TB.equal: "equal", _TB.allclose: "allclose",
               _TB.is_nonzero: "is_nonzero"}
# ops whose output size depends on the data: the host waits for the GPU to learn it
_DATA_DEPENDENT = {torch.nonzero: "nonzero", _TB.nonzero: "nonzero", torch.Tensor.unique: "unique",
                   torch.unique: "unique", torch.unique_consecutive: "unique_consecutive",
                   torch.masked_select: "masked_select", _TB.masked_select: "masked_select",
                   torch.argwhere: "argwhere", torch.bincount: "bincount", _TB.bincount: "bincount"}
_NUMPY = {_TB.numpy, torch.Tensor.__array__}
# data from the host: a host-to-device copy when made on a GPU
_FROM_HOST = {torch.tensor, torch.as_tensor}


def tag_of(t: torch.Tensor) -> str:
    return getattr(t, _TAG, "cpu")


def _set_tag(t: torch.Tensor, dev: str) -> None:
    if dev == "cpu":
        if hasattr(t, _TAG):
            delattr(t, _TAG)
    else:
        setattr(t, _TAG, dev)


@dataclass
class Event:
    kind: str  # d2h | h2d | d2d | sync
    op: str
    where: str  # file:line of the innermost project frame
    label: str
    blocking: bool = True
    origin: str = ""  # whose code made it: adapter (nuwa_graph), node (nodes/), model (transformers), other

    @property
    def is_sync(self) -> bool:
        """Whether the host waits for the GPU here (a d2d copy is queued, a non-blocking copy too)."""
        return self.kind in ("d2h", "sync") or (self.kind == "h2d" and self.blocking)

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.where} [{self.label}]"


def project_frame() -> tuple[str, str]:
    """(file:line of the innermost frame in the project (nuwa_graph/, nodes/, scripts/,
    benchmarks/), else of the first frame outside torch and this file; and whose work it is:
    `model` (the innermost frame outside torch is transformers' or accelerate's), `node` (a
    node of nodes/ is on the stack), `adapter` (the rest of nuwa_graph) or `other`)."""
    f = sys._getframe(2)
    where = fallback = innermost = None
    node = False
    while f is not None:
        name = f.f_code.co_filename
        if name != _HERE and "/torch/" not in name:
            innermost = innermost or name
            node = node or name.startswith(_PROJECT[1])
            if where is None and name.startswith(_PROJECT):
                where = f"{Path(name).relative_to(ROOT)}:{f.f_lineno}"
            if fallback is None:
                fallback = f"{name}:{f.f_lineno}"
        f = f.f_back
    inner = innermost or ""
    origin = ("model" if "/transformers/" in inner or "/accelerate/" in inner else "node" if node
              else "adapter" if inner.startswith(_PROJECT[0]) else "other")
    return where or fallback or "?", origin


def _tensors(obj: Any, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        if depth < 3:
            for x in obj:
                if isinstance(x, torch.Tensor):
                    yield x
                elif isinstance(x, (list, tuple, dict)):
                    yield from _tensors(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (list, tuple, dict)):
                yield from _tensors(x, depth + 1)


def _tag_all(out: Any, dev: str, depth: int = 0) -> None:
    if isinstance(out, torch.Tensor):
        _set_tag(out, dev)
    elif depth < 2 and isinstance(out, (list, tuple)):
        for x in out:
            _tag_all(x, dev, depth + 1)


class VirtualDevices(TorchFunctionMode):
    """See the module docstring. `with VirtualDevices(2) as vd: ...`; then `vd.violations`,
    `vd.events`, `vd.count(kind, label=...)`."""

    def __init__(self, n_devices: int = 2):
        super().__init__()
        self.n = n_devices
        self.current = 0
        self.violations: list[str] = []
        self.events: list[Event] = []
        self.label = "start"
        self.synchronized: list[str] = []
        self.memory_reads: list[tuple[str, str]] = []
        self._undo: list[Any] = []
        self._placed: list[torch.nn.Module] = []
        self._placed_tensors: list[torch.Tensor] = []
        self._special = {_TB.get_device: self._get_device, _TB.to: lambda f, a, k: self._to(a[0], a[1:], k),
                         _TB.cuda: self._cuda, _TB.cpu: self._cpu, _TB.copy_: self._copy,
                         _TB.__getitem__: lambda f, a, k: self._getitem(f, a),
                         _TB.__setitem__: lambda f, a, k: self._setitem(f, a),
                         **{fn: self._numpy for fn in _NUMPY}}

    # ---- devices -----------------------------------------------------------------------------
    def norm(self, device: Any) -> str:
        if device is None:
            return "cpu"
        if isinstance(device, int):
            return f"cuda:{device}"
        d = torch.device(device)
        if d.type == "cuda":
            idx = self.current if d.index is None else d.index
            if not 0 <= idx < self.n:
                raise RuntimeError(f"CUDA error: invalid device ordinal {idx} (virtual: {self.n} devices)")
            return f"cuda:{idx}"
        if d.type == "cpu":
            return "cpu"
        return str(d)  # meta etc.: real devices, left alone

    def _record(self, kind: str, op: str, blocking: bool = True) -> None:
        where, origin = project_frame()
        self.events.append(Event(kind, op, where, self.label, blocking, origin))

    def _violation(self, what: str) -> None:
        self.violations.append(f"{what} at {project_frame()[0]} [{self.label}]")

    def select(self, kind: str | None = None, label: str | None = None, origin: str | None = None,
               syncs: bool = False) -> list[Event]:
        return [e for e in self.events if (kind is None or e.kind == kind) and (label is None or e.label == label)
                and (origin is None or e.origin == origin) and (not syncs or e.is_sync)]

    def count(self, kind: str | None = None, label: str | None = None, origin: str | None = None,
              syncs: bool = False) -> int:
        return len(self.select(kind, label, origin, syncs))

    def summary(self, label: str | None = None) -> Counter:
        return Counter(e.kind for e in self.events if label is None or e.label == label)

    # ---- the mode ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if type(owner) is GetSetDescriptorType:  # a property: .shape, .dtype, .T, .data ... or .device
            prop = _DEVICE_PROPS.get(owner)
            if prop is not None:
                return self._device_property(prop, args[0])
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):  # .T, .mT, .data, ...: a view on the same device
                _set_tag(out, tag_of(args[0]))
            return out
        special = self._special.get(func)
        if special is not None:
            return special(func, args, kwargs)
        if func in _HOST_READS:
            if any(tag_of(t) != "cpu" for t in _tensors(args)):
                self._record("d2h", _HOST_READS[func])
            return func(*args, **kwargs)
        return self._generic(func, args, kwargs)

    def _get_device(self, func, args, kwargs):
        t = tag_of(args[0])
        return int(t.split(":")[1]) if t.startswith("cuda") else -1

    def _cuda(self, func, args, kwargs):
        dev = args[1] if len(args) > 1 else kwargs.get("device")
        return self._move(args[0], self.norm("cuda" if dev is None else dev), "cuda", bool(kwargs.get("non_blocking", False)))

    def _cpu(self, func, args, kwargs):
        return self._move(args[0], "cpu", "cpu", False)

    def _numpy(self, func, args, kwargs):
        if tag_of(args[0]) != "cpu":
            self._violation(f"numpy() of a {tag_of(args[0])} tensor (CUDA: TypeError, call .cpu() first)")
        return func(*args, **kwargs)

    def _copy(self, func, args, kwargs):
        dst, src = tag_of(args[0]), tag_of(args[1])
        if dst != src and not (src == "cpu" and args[1].dim() == 0):
            kind = "h2d" if src == "cpu" else "d2h" if dst == "cpu" else "d2d"
            self._record(kind, "copy_", not bool(kwargs.get("non_blocking", len(args) > 2 and args[2])))
        return func(*args, **kwargs)

    def _device_property(self, name: str, t: torch.Tensor):
        dev = tag_of(t)
        if name == "device":
            return torch.device(dev) if dev != "cpu" else t.device
        if name == "is_cuda":
            return dev.startswith("cuda")
        return dev == "cpu" and t.device.type == "cpu"

    def _move(self, t: torch.Tensor, dst: str, op: str, non_blocking: bool, dtype=None, copy=False) -> torch.Tensor:
        src = tag_of(t)
        out = t.to(dtype=dtype, copy=copy) if dtype is not None or copy else t
        if dst != src:
            if out is t:
                out = t.clone()
            kind = "h2d" if src == "cpu" else "d2h" if dst == "cpu" else "d2d"
            if t.numel():  # an empty tensor moves no data
                self._record(kind, op, blocking=not non_blocking or kind == "d2h")
        _set_tag(out, dst)
        return out

    def _to(self, t: torch.Tensor, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        copy = bool(kwargs.pop("copy", False))
        if args and isinstance(args[0], torch.Tensor):
            other = args[0]
            return self._move(t, tag_of(other), "to", bool(kwargs.get("non_blocking", False)), other.dtype, copy)
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        dst = tag_of(t) if device is None else self.norm(device)
        return self._move(t, dst, "to", bool(non_blocking), dtype, copy)

    def _index_tensors(self, idx: Any):
        items = idx if isinstance(idx, tuple) else (idx,)
        for i in items:
            if isinstance(i, torch.Tensor):
                yield i, "tensor"
            elif isinstance(i, list):
                yield i, "list"

    def _check_index(self, base: torch.Tensor, idx: Any) -> None:
        dev = tag_of(base)
        for i, kind in self._index_tensors(idx):
            if kind == "list":
                if dev != "cpu":
                    self._record("h2d", "index with a Python list")
                continue
            idev = tag_of(i)
            if i.dtype == torch.bool and i.dim() > 0 and dev != "cpu":
                self._record("sync", "boolean-mask index")
            if idev == dev or (i.dim() == 0 and idev == "cpu"):
                continue
            if idev == "cpu" and dev != "cpu":
                self._record("h2d", "CPU index tensor into a GPU tensor")
            else:
                self._violation(f"indexing a {dev} tensor with a {idev} index")

    def _getitem(self, func, args):
        base, idx = args[0], args[1]
        self._check_index(base, idx)
        out = func(*args)
        _tag_all(out, tag_of(base))
        return out

    def _setitem(self, func, args):
        base, idx, value = args
        self._check_index(base, idx)
        if isinstance(value, torch.Tensor):
            vdev, dev = tag_of(value), tag_of(base)
            if vdev != dev and not (vdev == "cpu" and value.dim() == 0):
                kind = "h2d" if vdev == "cpu" else "d2h" if dev == "cpu" else "d2d"
                self._record(kind, "setitem")
        return func(*args)

    def _generic(self, func, args, kwargs):
        forced = None
        if "device" in kwargs:
            kwargs = dict(kwargs)
            forced = self.norm(kwargs["device"])
            if forced.startswith("cuda"):
                kwargs["device"] = "cpu"
                kwargs.pop("pin_memory", None)
            else:
                forced = None if forced == "cpu" else forced
                if forced is not None:  # meta etc.: a real device
                    return func(*args, **kwargs)
        devs = set()
        for t in _tensors((args, kwargs)):
            d = tag_of(t)
            if d == "cpu" and t.dim() == 0 and t.device.type == "cpu":
                continue  # a CPU scalar: CUDA kernels take it as a number
            devs.add(d)
        if len(devs) > 1:
            self._violation(f"{getattr(func, '__name__', func)} mixes {', '.join(sorted(devs))}")
        dev = forced or next((d for d in sorted(devs) if d != "cpu"), None) or (devs.pop() if devs else "cpu")
        if dev != "cpu" and func in _DATA_DEPENDENT:
            self._record("sync", _DATA_DEPENDENT[func])
        if dev != "cpu" and func in (torch.repeat_interleave, _TB.repeat_interleave) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor) and args[1].dim() > 0:
            self._record("sync", "repeat_interleave with tensor repeats")
        out = func(*args, **kwargs)
        if forced is not None and func in _FROM_HOST and isinstance(out, torch.Tensor) and out.numel():
            self._record("h2d", f"torch.{func.__name__}(host data, device=...)")
        if dev != "cpu":
            _tag_all(out, dev)
        return out

    # ---- context: stubs for torch.cuda ---------------------------------------------------------
    def __enter__(self):
        vd = self

        def synchronize(device=None):
            vd.synchronized.append(vd.norm("cuda" if device is None else device))

        def memory(name):
            def read(device=None):
                vd.memory_reads.append((name, vd.norm("cuda" if device is None else device)))
                return 0
            return read

        def set_device(device):
            vd.current = int(vd.norm(device).split(":")[1])

        stubs = {"synchronize": synchronize, "is_available": lambda: True, "device_count": lambda: vd.n,
                 "current_device": lambda: vd.current, "set_device": set_device,
                 "reset_peak_memory_stats": memory("reset_peak_memory_stats"),
                 "memory_allocated": memory("memory_allocated"),
                 "max_memory_allocated": memory("max_memory_allocated")}
        for name, fn in stubs.items():
            self._undo.append((torch.cuda, name, getattr(torch.cuda, name)))
            setattr(torch.cuda, name, fn)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for module in self._placed:  # the data never moved: back to the CPU, untagged
                for t in list(module.parameters()) + list(module.buffers()):
                    _set_tag(t, "cpu")
            self._placed = []
            for t in self._placed_tensors:
                _set_tag(t, "cpu")
            self._placed_tensors = []
            while self._undo:
                obj, name, old = self._undo.pop()
                if old is _MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)

    # ---- placing modules -------------------------------------------------------------------------
    def place(self, module: torch.nn.Module, device: Any) -> None:
        """Put a module's parameters and buffers on a virtual device (their data stays put)."""
        dev = self.norm(device)
        self._placed.append(module)
        for p in module.parameters():
            _set_tag(p, dev)
        for b in module.buffers():
            _set_tag(b, dev)

    def dispatch(self, model: torch.nn.Module, device_map: dict[str, Any]) -> None:
        """accelerate's dispatch_model, imitated: each mapped module (names as in hf_device_map,
        "" = the whole model) goes to its device, and its `forward` is wrapped to move every
        tensor argument there first (after the module's forward pre-hooks, as with accelerate)."""
        tensors = {n for n, _ in list(model.named_parameters()) + list(model.named_buffers())}
        for name in sorted(device_map, key=len):  # parents first, children override
            if name in tensors:  # one parameter or buffer mapped by its name
                t = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
                _set_tag(t, self.norm(device_map[name]))
                self._placed_tensors.append(t)
                continue
            self.place(model.get_submodule(name) if name else model, device_map[name])
        for name, device in device_map.items():
            if name and name not in tensors:
                module = model.get_submodule(name)
                # a container is never called (its children are: Qwen3-VL's deepstack_merger_list);
                # accelerate aligns the children's inputs (attach_execution_device_hook), so do that
                targets = list(module.children()) if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) \
                    else [module]
                for target in targets:
                    self._wrap_forward(target, self.norm(device))
        self._undo.append((model, "hf_device_map", getattr(model, "hf_device_map", _MISSING)))
        model.hf_device_map = dict(device_map)

    def _wrap_forward(self, module: torch.nn.Module, dev: str) -> None:
        old = module.forward

        def send(x):
            if isinstance(x, torch.Tensor):
                return x.to(dev)
            if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
                return type(x)(send(v) for v in x)
            if isinstance(x, dict):
                return {k: send(v) for k, v in x.items()}
            return x

        def new_forward(*args, **kwargs):
            return old(*send(args), **send(kwargs))

        had = "forward" in vars(module)
        module.forward = functools.update_wrapper(new_forward, old)
        self._undo.append((module, "forward", old if had else _MISSING))


class _Missing:
    pass


_MISSING = _Missing()


def device_map(adapter, boundary: int | None = None, vision_device: int = 0,
               vision_boundary: int | None = None) -> dict[str, int]:
    """A device_map laid out as `infer_auto_device_map` lays out a VLM, for any family (found
    through the adapter's own extension points, not module names):

    - decoder layers [0, boundary) and the input embeddings on cuda:0; layers [boundary, n),
      every other part of the text model (final norm, rotary embedding) and the LM head on
      cuda:1 (the last GPU, as accelerate puts them); `boundary=None`: the LLM on cuda:0;
    - everything else (vision tower, projector, ...) on `vision_device`, except that with
      `vision_boundary` the vision blocks (the parents of `vision_attention_modules()`) before
      that index go to the other GPU (the tower is split; its last blocks, whose outputs the
      signals read, stay on `vision_device`)."""
    model = adapter.model
    names = {id(m): n for n, m in model.named_modules()}
    pinned: dict[int, int] = {}
    last = 0 if boundary is None else 1
    for i, layer in enumerate(adapter.decoder_layers()):
        pinned[id(layer)] = 0 if boundary is None or i < boundary else 1
    emb = model.get_input_embeddings()
    for child in adapter.text_model().children():
        if child is not adapter.decoder_layers():
            pinned[id(child)] = 0 if child is emb else last
    head = adapter.lm_head()
    # a head tied to the input embeddings (small Qwen3 LLMs, as in tiny-internvl) shares their
    # weight: accelerate keeps tied parameters on one device, the embeddings'
    pinned[id(head)] = 0 if getattr(head, "weight", None) is emb.weight else last
    if vision_boundary is not None:
        for i, attn in enumerate(adapter.vision_attention_modules()):
            block = model.get_submodule(names[id(attn)].rsplit(".", 1)[0])
            pinned[id(block)] = 1 - vision_device if i < vision_boundary else vision_device
    dmap: dict[str, int] = {}

    def assign(module: torch.nn.Module) -> None:
        for child in module.children():
            if id(child) in pinned:
                dmap[names[id(child)]] = pinned[id(child)]
            elif any(id(m) in pinned for m in child.modules()):
                assign(child)
            else:
                dmap[names[id(child)]] = vision_device
        # a tensor held by a module whose children are split (LLaVA-NeXT's `model.image_newline`):
        # accelerate lists it before the children and maps it by its own name, to the device it
        # is filling first (cuda:0)
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            dmap[f"{names[id(module)]}.{pname}" if names[id(module)] else pname] = 0

    assign(model)
    return dmap


@contextmanager
def virtual_run(adapter, dmap: dict[str, int], n_devices: int = 2):
    """`adapter` dispatched over virtual GPUs by `dmap`, its device the input embeddings' GPU;
    events are labelled `pre` (vision and pre-LLM sites), `prefill` (the LLM prefill and the
    first token) and `stepN` (decode step N: its forward and the pick of its token)."""
    saved = adapter.device
    emb = next(n for n, m in adapter.model.named_modules() if m is adapter.model.get_input_embeddings())
    with VirtualDevices(n_devices) as vd:
        vd.dispatch(adapter.model, dmap)
        adapter.device = torch.device(f"cuda:{dmap[emb]}")
        for module in adapter.auxiliary_modules():  # loaded on the adapter's device (load_clip_text)
            vd.place(module, adapter.device)
        calls = [0]

        def label(module, args, kwargs):
            vd.label = "prefill" if calls[0] == 0 else f"step{calls[0]}"
            calls[0] += 1

        hook = adapter.text_model().register_forward_pre_hook(label, with_kwargs=True)
        vd.label = "pre"
        try:
            yield vd
        finally:
            hook.remove()
            adapter.device = saved


def one_host_copy_per_step(vd: VirtualDevices, steps: range, gpus_copy: bool = False, copies: int = 1) -> None:
    """Each decode step in `steps` makes exactly one host copy, the next token's ids (in
    generation.py; `copies=2` with return_logits, which also copies the step's logits), and no
    other sync; copies between GPUs only if allowed, the same number in every step."""
    per_step = []
    for step in steps:
        events = vd.select(label=f"step{step}")
        host = [e for e in events if e.kind != "d2d"]
        ok = len(host) == copies and all(e.kind == "d2h" and e.where.startswith("nuwa_graph/adapters/generation")
                                         for e in host)
        assert ok, f"decode step {step}: " + "; ".join(map(str, host))
        d2d = [e for e in events if e.kind == "d2d"]
        assert gpus_copy or not d2d, d2d
        per_step.append(len(d2d))
    assert len(set(per_step)) <= 1, f"copies between GPUs grow with the steps: {per_step}"


def batch_images(adapter) -> list:
    """Two pictures for a left-padded batch of two on `adapter`: 96 px synthetic ones, or on a
    model that cuts images into crops two wide ones of different crop counts."""
    from nuwa_graph.adapters.tiny import synthetic_image

    if adapter.model_variables().get("crops", 1) <= 1:
        return [synthetic_image(96, seed=0), synthetic_image(96, seed=3)]
    from nuwa_graph.adapters.tiny_tiled import wide_pictures

    return wide_pictures(adapter.family)
