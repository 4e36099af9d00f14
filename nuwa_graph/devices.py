"""The device and dtype contract between adapters, signals and nodes (docs/CONTRACTS.md).

- Every signal an adapter returns lives on the model's device. Scores (attention rows,
  attention received) are float32; features (hidden states, keys, q/k, projected tokens,
  text embeddings) are in the model's dtype; `external` values are the caller's.
- Every tensor a node makes lives on the device of its inputs (`ctx.device`: the device of
  the stream's ids, which the adapter puts on the model's device). Index lists that must be
  Python (`.tolist()`) are small and made once per site, never per layer or decode step.

`check_signal` and `check_port_value` say what is wrong with one value (an empty list when
nothing is); the contract tests and the `cuda` suite use them on every signal and every node
output of every shipped pipeline.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import torch

# signal kind -> "score" (float32) | "feature" (model dtype) | "caller" (not checked)
SIGNAL_CLASSES: dict[str, str] = {
    "vision.hidden": "feature",
    "vision.hidden_mean": "feature",
    "vision.cls_hidden": "feature",
    "vision.cls_attention": "score",
    "vision.attention_received": "score",
    "vision.keys": "feature",
    "vision.qk_single_head": "feature",
    "vision.merged_hidden_mean": "feature",
    "external": "caller",
    "pre_llm.visual": "feature",
    "pre_llm.text": "feature",
    "llm.attention": "score",
    "llm.hidden": "feature",
}

SCORE_DTYPE = torch.float32


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """cuda == cuda:0 on a one-GPU process; otherwise the types and indices must agree."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index is None or b.index is None:
        return True
    return a.index == b.index


def expected_signal_dtype(kind: str, model_dtype: torch.dtype) -> torch.dtype | None:
    cls = SIGNAL_CLASSES.get(kind, "caller")
    if cls == "score":
        return SCORE_DTYPE
    if cls == "feature":
        return model_dtype
    return None


def check_signal(kind: str, value: Any, device: torch.device | str, model_dtype: torch.dtype) -> list[str]:
    """Problems of one signal value against the contract (empty when it holds)."""
    if SIGNAL_CLASSES.get(kind, "caller") == "caller":
        return []
    if isinstance(value, list) and value:  # per crop (part_views.CropSignals): each crop's tensor
        return [p for v in value for p in check_signal(kind, v, device, model_dtype)]
    if not isinstance(value, torch.Tensor):
        return [f"signal {kind} is a {type(value).__name__}, not a tensor"]
    problems = []
    if not same_device(value.device, device):
        problems.append(f"signal {kind} is on {value.device}, the model is on {device}")
    want = expected_signal_dtype(kind, model_dtype)
    if want is not None and value.dtype != want:
        problems.append(f"signal {kind} is {value.dtype}, the contract says {want}")
    return problems


def tensors_of(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(field path, tensor) for every tensor inside a port value (dataclasses, lists)."""
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(value, torch.Tensor):
        out.append((prefix or "value", value))
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            out.extend(tensors_of(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.extend(tensors_of(v, f"{prefix}[{i}]"))
    return out


def check_port_value(where: str, value: Any, device: torch.device | str) -> list[str]:
    """Every tensor of a node's output value on `device`; ids int64."""
    problems = []
    for path, t in tensors_of(value):
        if not same_device(t.device, device):
            problems.append(f"{where}.{path} is on {t.device}, its inputs on {device}")
        if path.endswith("ids") and t.dtype != torch.long:
            problems.append(f"{where}.{path} is {t.dtype}, ids are int64")
    return problems


__all__ = ["SCORE_DTYPE", "SIGNAL_CLASSES", "check_port_value", "check_signal", "expected_signal_dtype",
           "same_device", "tensors_of"]
