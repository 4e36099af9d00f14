"""Loading a checkpoint onto its device (the families' `from_pretrained` share this)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RunError
from .family import check_attn_implementation


def load_kwargs(device: str, device_map: str | dict | None, attn_implementation: str) -> dict[str, Any]:
    """from_pretrained keyword arguments: the attention implementation, and the weights loaded
    straight onto `device` (or spread by `device_map`, e.g. 'auto') where accelerate is
    installed; without it the model loads to CPU RAM and is moved (device_map needs it)."""
    import importlib.util

    kw: dict[str, Any] = {"attn_implementation": check_attn_implementation(attn_implementation)}
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if device_map is not None:
        if not has_accelerate:
            raise RunError(f"device_map={device_map!r} needs the accelerate package (pip install accelerate)")
        kw["device_map"] = device_map
    elif has_accelerate:
        kw["device_map"] = str(device)
    return kw


def load_checkpoint(model_cls, id_or_path: str, dtype: torch.dtype, device: str, device_map: str | dict | None,
                    attn_implementation: str) -> tuple[nn.Module, torch.device]:
    """`model_cls.from_pretrained` with load_kwargs, moved to `device` unless a device_map placed
    it; returns the model and the device its inputs go to."""
    kw = load_kwargs(device, device_map, attn_implementation)
    model = model_cls.from_pretrained(id_or_path, dtype=dtype, **kw)
    if "device_map" not in kw:
        model = model.to(device)
    return model, input_device(model, device)


def to_dtype_as_loaded(model: nn.Module, dtype: torch.dtype, device: str | torch.device | None = None) -> nn.Module:
    """`model.to(device, dtype)` leaving what `from_pretrained(dtype=...)` leaves: parameters and
    persistent buffers in `dtype`, non-persistent floating buffers (the RoPE `inv_freq` tables,
    which checkpoints do not hold and which the modules make in float32) as they are. A plain
    `.to(bfloat16)` would round the RoPE frequencies: another model than a loaded checkpoint."""
    kept = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items()
            if name in mod._non_persistent_buffers_set and buf is not None and buf.is_floating_point()]
    model.to(device=device, dtype=dtype)
    for mod, name, buf in kept:
        mod._buffers[name] = buf.to(device) if device is not None else buf
    return model


def input_device(model: nn.Module, fallback: str | torch.device) -> torch.device:
    """The device of the model's input embeddings (where a device_map puts the first layer)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return torch.device(fallback)
