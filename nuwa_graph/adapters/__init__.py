"""Adapters: one per model family; `load_adapter` picks it from the config's model_type.

    adapter = load_adapter("tiny-llava")                      # offline preset
    adapter = load_adapter("llava-hf/llava-1.5-7b-hf", "bfloat16", "cuda")
    report = adapter.generate(pipeline, [image], ["What is in the image?"], max_new_tokens=16)

Presets: `tiny-llava` and `tiny-qwen` (Qwen2.5-VL) in nuwa_graph.adapters.tiny,
`tiny-qwen2-vl` and `tiny-qwen3-vl` in nuwa_graph.adapters.tiny_qwen_vl (each a factory
`(dtype=..., device=...) -> adapter`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..errors import RunError
from .base import ADAPTERS, ATTN_IMPLEMENTATIONS, RunReport, VLMAdapter, check_attn_implementation, dtype_of, register_adapter
from .family import indexed_device
from .loading import to_dtype_as_loaded

# model_type -> module that defines (and @register_adapter-s) its adapter
FAMILY_MODULES = {
    "llava": "nuwa_graph.adapters.llava",
    "qwen2_vl": "nuwa_graph.adapters.qwen_vl",
    "qwen2_5_vl": "nuwa_graph.adapters.qwen",
    "qwen3_vl": "nuwa_graph.adapters.qwen_vl",
    "llava_next": "nuwa_graph.adapters.llava_next",
    "internvl": "nuwa_graph.adapters.internvl",
    "llava_onevision": "nuwa_graph.adapters.llava_onevision",
    "idefics3": "nuwa_graph.adapters.idefics3",
    "smolvlm": "nuwa_graph.adapters.idefics3",
}
# preset -> (module, factory(dtype=..., device=...) -> adapter)
PRESETS = {
    "tiny-llava": ("nuwa_graph.adapters.tiny", "tiny_llava"),
    "tiny-qwen": ("nuwa_graph.adapters.tiny", "tiny_qwen"),
    "tiny-qwen2-vl": ("nuwa_graph.adapters.tiny_qwen_vl", "tiny_qwen2_vl"),
    "tiny-qwen3-vl": ("nuwa_graph.adapters.tiny_qwen_vl", "tiny_qwen3_vl"),
    "tiny-llava-next": ("nuwa_graph.adapters.tiny_tiled", "tiny_llava_next"),
    "tiny-internvl": ("nuwa_graph.adapters.tiny_tiled", "tiny_internvl"),
    "tiny-llava-onevision": ("nuwa_graph.adapters.tiny_tiled", "tiny_llava_onevision"),
    "tiny-smolvlm": ("nuwa_graph.adapters.tiny_idefics3", "tiny_smolvlm"),
}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off here (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import os

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _unreachable(exc: BaseException | None) -> bool:
    """Whether an exception (or its cause) says the hub could not be reached."""
    seen = 0
    while exc is not None and seen < 8:
        name = type(exc).__name__
        if name in ("ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "ReadTimeout",
                    "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _hint(exc: BaseException | None = None) -> str:
    where = (f"use a preset ({', '.join(PRESETS)}), a local directory with a config.json, or a hub id")
    if hub_offline():
        return (f"{where} that is already in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the hub is not "
                f"contacted; unset it to download)")
    if _unreachable(exc):
        return f"{where}; the Hugging Face hub could not be reached from here (check the network or a proxy)"
    return f"{where} (check the spelling; gated models need a token: huggingface-cli login)"


def adapter_class(model_type: str) -> type[VLMAdapter]:
    if model_type not in ADAPTERS and model_type in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[model_type])
    if model_type not in ADAPTERS:
        raise RunError(f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(FAMILY_MODULES))}")
    return ADAPTERS[model_type]


def _model_type(spec: str) -> str:
    p = Path(spec).expanduser()
    if p.exists():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise RunError(f"model path {spec!r} has no config.json; point --model at a saved model directory or "
                           f"{_hint()}")
        try:
            return str(json.loads(cfg.read_text(encoding="utf-8"))["model_type"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise RunError(f"{cfg} is not a model config (it must be a JSON object with a model_type; "
                           f"{type(exc).__name__}: {str(exc)[:200]})") from None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RunError(f"model path {spec!r} does not exist; {_hint()}")
    try:
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(spec).model_type)
    except Exception as exc:  # OSError, ValueError, hub errors
        first = (str(exc).splitlines() or [""])[0][:200]
        raise RunError(f"cannot load model {spec!r} ({type(exc).__name__}: {first}); {_hint(exc)}") from None


def auto_dtype(cls: type[VLMAdapter], device: str | torch.device) -> tuple[torch.dtype, str]:
    """What `--dtype auto` means for a family on a device, and why: on CUDA the dtype the
    family's official code runs (`official_dtype`: float16 for LLaVA, LLaVA-NeXT and
    LLaVA-OneVision, bfloat16 for the Qwen-VL line and InternVL), elsewhere float32."""
    if torch.device(device).type == "cuda":
        return dtype_of(cls.official_dtype), (f"auto: {cls.official_dtype} on CUDA, as {cls.official_dtype_source} "
                                              f"runs it")
    return torch.float32, f"auto: float32 on {torch.device(device).type}"


def load_adapter(model: str = "tiny-llava", dtype: str | torch.dtype = "float32", device: str = "cpu",
                 attn_implementation: str = "sdpa", device_map: str | dict | None = None) -> VLMAdapter:
    """An adapter for a preset name, local model directory or hub id (family from model_type).

    `dtype`: float32 | bfloat16 | float16, or `auto`: on CUDA the dtype the family's official
    code runs (`official_dtype`: float16 for the LLaVA line, bfloat16 for Qwen-VL and
    InternVL), else float32; the adapter's `dtype_reason` says which (in the run report).
    `attn_implementation` (sdpa | flash_attention_2 | eager): what the model's layers run
    (the rows a scorer reads are computed from q and k either way). `device_map` (e.g.
    'auto', needs accelerate) spreads a checkpoint over devices; checkpoints load straight
    onto `device` when accelerate is installed."""
    auto = isinstance(dtype, str) and dtype.strip().lower() == "auto"
    dt = torch.float32 if auto else dtype_of(dtype)
    reason = "" if auto else f"{str(dt).replace('torch.', '')} as asked"
    check_attn_implementation(attn_implementation)
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise RunError(f"bad device {device!r}: {exc}") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if model in PRESETS:
        mod, fn = PRESETS[model]
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise RunError(f"preset {model!r} is not available ({exc})") from None
        if device_map is not None:
            raise RunError(f"device_map applies to checkpoints; preset {model!r} is built on --device {device}")
        if not auto:
            adapter = factory(dtype=dt, device=device)
        else:  # the family is known once built: built in float32 on the CPU, then cast as a checkpoint loads
            adapter = factory(dtype=torch.float32, device="cpu")
            dt, reason = auto_dtype(type(adapter), device)
            to_dtype_as_loaded(adapter.model, dt, device)
            adapter.dtype, adapter.device = dt, indexed_device(device)
        adapter.dtype_reason = reason
        return adapter.set_attn_implementation(attn_implementation)
    mt = _model_type(model)
    cls = adapter_class(mt)
    if auto:
        dt, reason = auto_dtype(cls, device)
    try:
        adapter = cls.from_pretrained(model, dt, device, attn_implementation=attn_implementation,
                                      device_map=device_map)
        adapter.dtype_reason = reason
        return adapter
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - broken config values, missing or corrupt weights, refused pickles, ...
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if type(exc).__name__ == "UnpicklingError":
            first = "pickled weights are refused (they can run code); convert them to model.safetensors"
        raise RunError(f"model {model!r} could not be loaded ({type(exc).__name__}: {first}); a model folder "
                       f"needs a valid config.json, model.safetensors weights (pickled .bin weights and remote code "
                       f"are refused) and its processor files") from None


__all__ = ["ADAPTERS", "ATTN_IMPLEMENTATIONS", "FAMILY_MODULES", "PRESETS", "RunReport", "VLMAdapter", "adapter_class",
           "auto_dtype", "dtype_of", "load_adapter", "register_adapter"]
