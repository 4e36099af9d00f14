"""No host<->device traffic per layer in the hot path (docs/CONTRACTS.md), checked on a CPU.

A TorchFunctionMode counts the calls that would copy between devices or sync on a GPU
(`.to(<device>)`, `.cpu()`, `.cuda()`, `.tolist()`, `.item()`) during generate(). The
difference between a 6-token and a 2-token run is what the decode steps cost. With FastV
pruning at layer 1 (a segment of three layers) or layer 3 (one layer) of the tiny LLaVA the
steps cost the same: the pruned segment's mask and RoPE tables are built once per step, not
per layer. (On one device most counted `.to` calls are no-ops; they are the calls that
would copy under a device_map.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from nuwa_graph import load

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "what colour is the square ?"
_METHODS = {"cpu", "cuda", "tolist", "item"}


class CountCopies(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METHODS or name == "to" and ("device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            self.n += 1
        return func(*args, **kwargs)


def _calls(adapter, image, pipe, new_tokens: int) -> int:
    with CountCopies() as c:
        adapter.generate(pipe, [image], [PROMPT], max_new_tokens=new_tokens, stop_at_eos=False)
    return c.n


def _per_step(adapter, image, pipe) -> float:
    return (_calls(adapter, image, pipe, 6) - _calls(adapter, image, pipe, 2)) / 4


def test_decode_steps_make_no_per_layer_copies(tiny_llava, tiny_image):
    vanilla = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/vanilla.yaml"))
    long_seg = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 1}))
    short_seg = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 3}))
    # per forward, not per layer: the token ids to the host (the one real copy), and no-op moves the
    # stock model makes itself (embedding ids, its mask, its RoPE inv_freq)
    assert vanilla <= 4
    # a pruned segment adds a constant per step (its key_valid / last_pos / RoPE table), the same
    # whether it spans layers 1-3 or layer 3 alone: nothing is built per layer
    assert long_seg == short_seg, (long_seg, short_seg)
    assert long_seg - vanilla <= 3, (vanilla, long_seg)


def test_baselines_pruning_inside_the_llm_cost_what_fastv_costs_per_step(tiny_llava, tiny_image):
    """DART (keep at llm.1) and VTW (withdraw at llm.1) leave the same segments as FastV at K=1:
    the same copies per decode step, whatever the site computed at prefill."""
    fastv = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 1}))
    dart = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/dart.yaml", {"budget": 144, "K": 1}))
    vtw = _per_step(tiny_llava, tiny_image, load(ROOT / "pipelines/vtw.yaml", {"budget": 144}))  # K = 1 on 4 layers
    assert dart == fastv and vtw == fastv, (fastv, dart, vtw)
