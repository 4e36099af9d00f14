"""The adapter: one Hugging Face VLM bound to the engine, and the registry of families.

An adapter binds one VLM to the engine. `VLMAdapter` is everything that does not depend on
the model family, assembled from one module per concern, each building on the one before:

- family.py: `FamilyHooks`, the extension points a family implements (listed there, with
  their defaults; LLaVA in llava.py is the example) and the checks of a pipeline against
  the model, made BEFORE any forward pass;
- layout.py: the token layout as data and pure tensor functions (segments, blocks, masks,
  applying a Keep at llm.K); queries.py: which query rows `llm.attention` reads;
- signal_rows.py: LLM signal rows (RoPE, attention rows, hidden states) and the signal
  reader (`external`, `pre_llm.*`, `llm.*`; `vision.*` is delegated to the family);
- session.py: the hook session (the registered attention function that computes only the
  attention ROWS a pipeline asked for; decoder-layer pre-hooks that run `llm.K` sites and
  drop tokens from layer K on, also during decoding);
- generation.py: a request from start to answer (vision pass, `vision` and `pre_llm`
  sites, assembly, prefill, decoding with a KV cache); sampling.py: the next-token rule;
- report.py: the `RunReport` and the peak-memory probe; state.py: the per-run state
  (`AdapterRun`); loading.py: checkpoints onto their device;
- this module: `VLMAdapter`, the family registry, `dtype_of`, and the names families and
  callers import from here.

Everything a run touches is per adapter instance and per run; hooks live in `session()` and
are removed on exit, also on error; the attention implementation of both sub-models is restored.
"""

from __future__ import annotations

import torch

from ..errors import RunError
from .family import ATTN_IMPLEMENTATIONS, LLM_SIGNALS, check_attn_implementation, layer_variable_hint
from .generation import Generation
from .layout import Block, Encoded, SampleLayout, Segment, VisionOut
from .loading import input_device, load_checkpoint, load_kwargs
from .report import RunReport
from .sampling import GREEDY, Sampling
from .signal_rows import apply_rope
from .state import AdapterRun


class VLMAdapter(Generation):
    """Drives one VLM through a pipeline. See the module docstring for the extension points."""


# --------------------------------------------------------------------------------------------
# registry of families (load_adapter looks model_type up here)
# --------------------------------------------------------------------------------------------
ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for mt in cls.model_types:
        ADAPTERS[mt] = cls
    return cls


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'fp32' | 'bfloat16' | 'bf16' | 'float16' | 'fp16' -> torch dtype (RunError otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if str(name).lower() not in table:
        raise RunError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return table[str(name).lower()]


__all__ = ["ADAPTERS", "ATTN_IMPLEMENTATIONS", "GREEDY", "AdapterRun", "Block", "Encoded", "LLM_SIGNALS", "RunReport",
           "SampleLayout", "Sampling", "Segment", "VLMAdapter", "VisionOut", "apply_rope", "check_attn_implementation",
           "dtype_of", "input_device", "layer_variable_hint", "load_checkpoint", "load_kwargs", "register_adapter"]
