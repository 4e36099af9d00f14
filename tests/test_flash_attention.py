"""The flash-attention path of every family on a CPU: transformers' flash kernels swapped for
SDPA stand-ins (tests/_flash_standin.py) that record the implementation name and every call.

For every shipped pipeline on every family's tiny preset (adapters.PRESETS), in a left-padded
batch of two and, for pipelines that prune inside the LLM, one prompt alone:
- the kernel is loaded by its own name, flash_attention_2, never by the session's registered
  name (which transformers would send to the hub-kernel loader: "Could not find the currently
  requested flash attention implementation");
- kept tokens equal SDPA's and step logits agree within float32 tolerance;
- one unpadded prompt runs the dense kernel in every LLM layer: no varlen call, which gapped
  (PESP) or M-RoPE position ids would trigger by looking like packed sequences; on a virtual
  GPU (tests/_virtual_devices.py) each of its decode steps makes one host copy (the token), no
  other sync; a padded batch runs varlen calls whose cu_seqlens are the rows' valid lengths;
- Qwen's vision saliency (vision.attention_received) equals SDPA's at a window block and a
  full block, and a single call over several windows (flash's varlen form, with
  cu_seq_lens_q) is summed window by window.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from _flash_standin import FlashStandIn, use_flash
from _virtual_devices import batch_images, device_map, one_host_copy_per_step, virtual_run

from nuwa_graph import RunError, load
from nuwa_graph.adapters import PRESETS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on one thread
PIPELINES = sorted(str(p.relative_to(ROOT / "pipelines"))[:-5] for p in (ROOT / "pipelines").rglob("*.yaml"))
PROMPTS = ["what colour is the square ?", "how many shapes are there in the image ? describe the image"]
NEW_TOKENS = 3


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset(request):
    mod, fn = PRESETS[request.param]
    return getattr(importlib.import_module(mod), fn)(dtype=torch.float32, device="cpu")


def _run(adapter, pipe, B):
    return adapter.generate(pipe, batch_images(adapter)[:B], PROMPTS[:B], max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                            return_logits=True)


def _prunes_in_llm(ex) -> bool:
    return any(s.layer is not None for s in ex.sites())


@pytest.mark.parametrize("name", PIPELINES)
def test_flash_path_matches_sdpa(preset, name, monkeypatch):
    pipe = load(ROOT / "pipelines" / f"{name}.yaml")
    try:
        ex = preset._bind(pipe)
    except RunError:
        pytest.skip(f"{name} is refused on {preset.name} (tests/test_pipelines_e2e.py checks the refusal)")
    batches = (2, 1) if _prunes_in_llm(ex) else (2,)
    ref = {B: _run(preset, pipe, B) for B in batches}
    flash = FlashStandIn(preset).install(monkeypatch)
    use_flash(preset, monkeypatch)
    for B in batches:
        flash.calls.clear()
        if B == 1:  # on a virtual GPU: a pruned segment's flash step reads nothing back (no sync)
            with virtual_run(preset, device_map(preset, None)) as vd:
                rep = _run(preset, pipe, B)
            assert not vd.violations, vd.violations
            one_host_copy_per_step(vd, range(1, NEW_TOKENS - 1), copies=2)  # the token and its logits
        else:
            rep = _run(preset, pipe, B)
        assert set(flash.names) == {"flash_attention_2"}, flash.names
        assert rep.attn_implementation == "flash_attention_2"
        assert rep.kept == ref[B].kept
        assert rep.new_tokens == ref[B].new_tokens
        diff = (torch.stack(rep.step_logits) - torch.stack(ref[B].step_logits)).abs().max().item()
        assert diff <= 1e-4, diff
        llm = [c for c in flash.calls if c.phase in ("prefill", "decode")]
        assert llm, "no LLM layer ran flash attention"
        if B == 1:  # one unpadded prompt: never read as packed sequences
            assert all(c.kind == "dense" for c in llm), [c for c in llm if c.kind != "dense"][:3]
        else:  # padded: varlen over each row's valid tokens (a pruned segment whose rows happen to come
            # out the same length is unpadded and runs dense: a padded one run dense would attend to
            # the padding, which the logits check above catches)
            assert any(c.kind == "varlen" for c in llm), "the padded prompts never ran varlen"
            for c in llm:
                assert c.kind == "dense" or len(c.cu_k) == B + 1, c
    assert preset.model.config.text_config._attn_implementation == "sdpa"  # restored after the session


def test_the_session_name_alone_cannot_load_a_kernel(monkeypatch):
    """The stand-in fails as transformers does for any name but the kernel's (so the test above
    would catch a session that passed its own name)."""
    flash = FlashStandIn().install(monkeypatch)
    with pytest.raises(ValueError, match="Could not find the currently requested flash attention"):
        flash._lazy_imports("nuwa_rows_llava_0_abcdef")


def test_qwen_vision_saliency_under_flash_equals_sdpa(monkeypatch):
    """attention_received at a window block and at a full block, two images in one batch."""
    from nuwa_graph import load_text
    from nuwa_graph.adapters.tiny import tiny_qwen

    adapter = tiny_qwen()
    text = """
name: recv
nodes:
  - name: s
    type: scorer.attention-received
    params: {layer: LAYER}
  - name: top
    type: selector.top-k
    params: {k: 9}
    inputs: {scores: s.scores}
  - name: keep
    type: applier.keep
    params: {site: vision}
    inputs: {selection: top.selection}
"""
    for layer in (0, 1):  # block 0 attends in windows, block 1 over the whole image
        pipe = load_text(text.replace("LAYER", str(layer)))
        _, ref = adapter.forward_logits(pipe, batch_images(adapter), PROMPTS)
        flash = FlashStandIn(adapter).install(monkeypatch)
        use_flash(adapter, monkeypatch)
        _, got = adapter.forward_logits(pipe, batch_images(adapter), PROMPTS)
        monkeypatch.undo()
        assert any(c.phase == "vision" for c in flash.calls)
        torch.testing.assert_close(torch.cat(ref.vision["recv"][layer]), torch.cat(got.vision["recv"][layer]),
                                   atol=1e-5, rtol=1e-5)
        assert [a.ids.tolist() for a in ref.state.actions[0]] == [a.ids.tolist() for a in got.state.actions[0]]


def test_qwen_vision_saliency_reads_cu_seq_lens():
    """A vision attention call over several windows at once (as flash's varlen path makes one, with
    cu_seq_lens_q) gives each patch the attention received inside its own window only."""
    from types import SimpleNamespace

    from nuwa_graph.adapters.qwen import attention_received
    from nuwa_graph.adapters.tiny import tiny_qwen

    adapter = tiny_qwen()
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    run = SimpleNamespace(vision={"attn_blocks": {0}, "recv": {0: []}})
    module = SimpleNamespace(scaling=8 ** -0.5)
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    adapter.on_vision_attention(run, 0, module, q, k, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu})
    per_window = torch.cat([attention_received(q[0][:, a:b], k[0][:, a:b], torch.tensor([0, b - a]), module.scaling)
                            for a, b in ((0, 4), (4, 8), (8, 12))])
    torch.testing.assert_close(run.vision["recv"][0][0], per_window)
