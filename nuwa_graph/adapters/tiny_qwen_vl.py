"""The offline presets `tiny-qwen2-vl` and `tiny-qwen3-vl`: the real transformers classes at toy
sizes, random weights from a fixed seed, and the tokenizer and PIL processor machinery of
`tiny-qwen` (tiny.py), so all three Qwen-VL generations run the same tests in seconds.

- tiny-qwen2-vl: `Qwen2VLForConditionalGeneration`, vision 4 blocks of width 32 (no windows),
  patch 4 (a merged token = 8 x 8 px), LLM 4 layers of width 64 (M-RoPE sections [2, 3, 3]).
- tiny-qwen3-vl: `Qwen3VLForConditionalGeneration`, vision 4 blocks of width 32, patch 4 (as
  tiny-qwen: a merged token = 8 x 8 px; the real model's 16 is read from the config everywhere,
  see the benchmark's random-qwen3-vl), DeepStack from blocks 1, 2, 3 (added after LLM layers 0, 1, 2),
  learned position embeddings on an 8 x 8 grid; LLM 4 layers of width 64 with QK-norm and
  interleaved M-RoPE (sections [4, 2, 2]).

Both take up to TINY_MAX_TOKENS merged tokens per image (a 448 x 448 photo fits) within a
context of TINY_CONTEXT. Nothing here touches the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .loading import to_dtype_as_loaded
from .tiny import TINY_SPECIALS, TINY_VISION_TOKENS, seeded_model, tiny_qwen_tokenizer

if TYPE_CHECKING:
    from .qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter

TINY_MAX_TOKENS = 1024  # merged tokens per image at most (the processor's max_pixels)
TINY_CONTEXT = 2048  # max_position_embeddings: the largest image + a prompt + generated tokens


def _token_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}


def _text_config(vocab_size: int, ids: dict[str, int], section: list[int], **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
                bos_token_id=None, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<pad>"],
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0, **extra})


def _special_ids(ids: dict[str, int]) -> dict[str, Any]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def tiny_qwen2_vl_config(vocab_size: int, ids: dict[str, int], patch_size: int = 4):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        vision_config=dict(depth=4, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=_text_config(vocab_size, ids, [2, 3, 3]), **_special_ids(ids),
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<pad>"])


def tiny_qwen3_vl_config(vocab_size: int, ids: dict[str, int], patch_size: int = 4):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3]),
        text_config=dict(_text_config(vocab_size, ids, [4, 2, 2], mrope_interleaved=True), head_dim=16),
        **_special_ids(ids))


def _build(kind: str, seed: int):
    """(model, processor) of a tiny preset: fp32, eval mode, weights drawn from `seed`."""
    import transformers

    from .qwen_processing import qwen_processor

    tok = tiny_qwen_tokenizer()
    ids = _token_ids(tok)
    if kind == "qwen2_vl":
        config, cls = tiny_qwen2_vl_config(len(tok), ids), transformers.Qwen2VLForConditionalGeneration
        processor_class = "Qwen2VLProcessor"
    else:
        config, cls = tiny_qwen3_vl_config(len(tok), ids), transformers.Qwen3VLForConditionalGeneration
        processor_class = "Qwen3VLProcessor"
    unit = config.vision_config.patch_size * 2
    processor = qwen_processor(tok, patch_size=config.vision_config.patch_size, merge_size=2, min_pixels=unit * unit,
                               max_pixels=TINY_MAX_TOKENS * unit * unit, processor_class=processor_class)
    return seeded_model(cls, config, tok, seed), processor


def build_tiny_qwen2_vl(seed: int = 0):
    return _build("qwen2_vl", seed)


def build_tiny_qwen3_vl(seed: int = 0):
    return _build("qwen3_vl", seed)


def tiny_qwen2_vl(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Qwen2VLAdapter:
    """The `tiny-qwen2-vl` preset as a ready adapter."""
    from .qwen_vl import Qwen2VLAdapter

    model, processor = build_tiny_qwen2_vl(seed)
    model = to_dtype_as_loaded(model, dtype, device)  # RoPE tables stay float32, as from_pretrained keeps them
    return Qwen2VLAdapter(model, processor, name="tiny-qwen2-vl", dtype=dtype, device=device)


def tiny_qwen3_vl(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Qwen3VLAdapter:
    """The `tiny-qwen3-vl` preset as a ready adapter."""
    from .qwen_vl import Qwen3VLAdapter

    model, processor = build_tiny_qwen3_vl(seed)
    model = to_dtype_as_loaded(model, dtype, device)  # RoPE tables stay float32, as from_pretrained keeps them
    return Qwen3VLAdapter(model, processor, name="tiny-qwen3-vl", dtype=dtype, device=device)


def unit_pixels(adapter) -> int:
    """Pixels per merged token side (patch x merge) of a Qwen-VL adapter's model."""
    vc = adapter.model.config.vision_config
    return int(vc.patch_size) * int(vc.spatial_merge_size)
