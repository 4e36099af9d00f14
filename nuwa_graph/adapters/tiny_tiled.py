"""Offline presets of the tiled families, built from configs with a fixed seed (the real
transformers classes at toy size, random weights: compare logits, not texts).

- `tiny-llava-next`: `LlavaNextForConditionalGeneration`, CLIP (112 px crops, patch 14 -> 8 x 8
  = 64 tokens per crop, 4 layers) + Llama (4 layers, GQA), pinpoints the v1.6 set scaled to
  112 px (1x2, 2x1, 2x2, 3x1, 1x3 tiles): a wide image gives 5 crops and 64 + rows x 17 tokens;
  the word-level tokenizer of tiny-llava, a PIL `LlavaNextImageProcessorPil`.
"""

from __future__ import annotations

import torch

from .tiny import IMAGE_SIZE, PATCH, TINY_SEED, build_tokenizer, seeded_model

NEXT_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE],
                  [3 * IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 3 * IMAGE_SIZE]]


def next_processor(tokenizer=None, image_size: int = IMAGE_SIZE):
    """An offline LlavaNextProcessor (PIL image processing, CLIP normalisation, `image_size` px
    crops, the v1.6 pinpoints scaled to them)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tokenizer or build_tokenizer()
    pins = [[h * image_size // IMAGE_SIZE, w * image_size // IMAGE_SIZE] for h, w in NEXT_PINPOINTS]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size}, image_grid_pinpoints=pins)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>")


def next_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=NEXT_PINPOINTS, pad_token_id=tok.pad_token_id)


def build_tiny_llava_next(seed: int = TINY_SEED):
    """(model, processor), eval mode, fp32; the global RNG is left untouched."""
    from transformers import LlavaNextForConditionalGeneration

    proc = next_processor()
    model = seeded_model(LlavaNextForConditionalGeneration, next_config(proc.tokenizer), proc.tokenizer, seed)
    with torch.random.fork_rng(devices=[]):  # the newline row: a visible, seeded vector
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            model.model.image_newline.normal_(0.0, 0.5)
    return model, proc


def tiny_llava_next(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-llava-next` preset as a ready adapter."""
    from .llava_next import LlavaNextAdapter

    model, proc = build_tiny_llava_next(seed)
    return LlavaNextAdapter(model.to(device=device, dtype=dtype), proc, name="tiny-llava-next", dtype=dtype,
                            device=device)


def wide_image(width: int = 200, height: int = 150, seed: int = 0):
    """A deterministic wide picture of coloured shapes (maps to 2x2 tiles on the tiny pinpoints, unpad cuts rows)."""
    from .tiny import synthetic_image

    return synthetic_image(336, seed).resize((width, height))
