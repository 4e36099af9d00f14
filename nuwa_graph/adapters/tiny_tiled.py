"""Offline presets of the tiled families, built from configs with a fixed seed (the real
transformers classes at toy size, random weights: compare logits, not texts).

- `tiny-llava-next`: `LlavaNextForConditionalGeneration`, CLIP (112 px crops, patch 14 -> 8 x 8
  = 64 tokens per crop, 4 layers) + Llama (4 layers, GQA), pinpoints the v1.6 set scaled to
  112 px (1x2, 2x1, 2x2, 3x1, 1x3 tiles): a wide image gives 5 crops and 64 + rows x 17 tokens;
  the word-level tokenizer of tiny-llava, a PIL `LlavaNextImageProcessorPil`.
- `tiny-internvl` (InternVL3.5 shape): InternViT with a CLS token (64 px tiles of 4 px patches,
  4 layers), 0.5 pixel shuffle -> 8 x 8 = 64 tokens per tile, up to 6 tiles + a thumbnail,
  Qwen3 LLM with QK-norm (4 layers); GotOcr2 PIL processing.
- `tiny-llava-onevision`: SigLIP without CLS (112 px crops, 8 x 8 tokens), Qwen2 LLM, pinpoints
  up to 3x3 tiles with `anyres_max_4`, so a large image's canvas is interpolated as in the
  released models (`anyres_max_9`).
Builders take sizes, so the benchmark makes real-shape random models from the same code.
"""

from __future__ import annotations

import torch

from .loading import to_dtype_as_loaded  # RoPE tables stay float32, as from_pretrained keeps them
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
    return LlavaNextAdapter(to_dtype_as_loaded(model, dtype, device), proc, name="tiny-llava-next", dtype=dtype,
                            device=device)


def wide_image(width: int = 200, height: int = 150, seed: int = 0):
    """A deterministic wide picture of coloured shapes (maps to 2x2 tiles on the tiny pinpoints, unpad cuts rows)."""
    from .tiny import synthetic_image

    return synthetic_image(336, seed).resize((width, height))


def wide_pictures(family: str) -> list:
    """Two wide pictures of different crop counts for a tiled family's checks (tests, gpu_check):
    InternVL 1x3 tiles + thumbnail and 2x2 + thumbnail (64 px tiles); AnyRes (LLaVA-NeXT,
    OneVision) 1x2 and 2x2 tiles, cut by unpad. The first is the one single-picture checks use:
    on tiny-llava-next in float16/bfloat16 one crop of the 2x2 picture has no PruMerge+ outlier
    (the official code divides by zero there; the node refuses), a property of the tiny random
    weights, which gpu_check's half-precision agreement would otherwise stop on."""
    if family == "internvl":
        return [wide_image(160, 64), wide_image(200, 150)]
    return [wide_image(240, 120), wide_image(200, 150)]


# --- tiny-internvl: InternVL3.5 shape (InternViT with CLS, pixel shuffle, Qwen3 LLM with QK-norm) ---
INTERNVL_TILE = 64  # px per tile: 4 px patches -> 16 x 16 patches -> 8 x 8 = 64 tokens per tile after the shuffle
INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "video_token": "<video>"}


def internvl_tokenizer():
    """A word-level tokenizer with Qwen's chat tokens and InternVL's image tokens (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny import TINY_SPECIALS, TINY_WORDS

    words = list(TINY_SPECIALS) + list(INTERNVL_SPECIALS.values()) + ["user", "assistant"] + TINY_WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", padding_side="left", extra_special_tokens=INTERNVL_SPECIALS)


def internvl_processor(tok=None, tile: int = INTERNVL_TILE, units: int = 64, max_patches: int = 6):
    """InternVLProcessor with PIL GotOcr2 processing (tiles of `tile` px, thumbnail last), no torchvision."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .internvl import internvl_processor_class

    tok = tok or internvl_tokenizer()
    ip = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                  max_patches=max_patches)
    return internvl_processor_class()(image_processor=ip, tokenizer=tok, video_processor=None,
                                      image_seq_length=units)


def internvl_config(tok, tile: int = INTERNVL_TILE, patch: int = 4, vision_hidden: int = 32, vision_layers: int = 4,
                    text_hidden: int = 64, text_layers: int = 4):
    from transformers import InternVLConfig, Qwen3Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_hidden_layers=vision_layers, num_attention_heads=max(2, vision_hidden // 64),
                                  image_size=[tile, tile], patch_size=[patch, patch], use_mean_pooling=True)
    heads = max(4, text_hidden // 128)
    text = Qwen3Config(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=max(2, heads // 2),
                       head_dim=text_hidden // heads, vocab_size=len(tok), max_position_embeddings=4096,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")


def build_tiny_internvl(seed: int = TINY_SEED):
    """(model, processor), eval mode, fp32; the global RNG is left untouched."""
    from transformers import InternVLForConditionalGeneration

    proc = internvl_processor()
    model = seeded_model(InternVLForConditionalGeneration, internvl_config(proc.tokenizer), proc.tokenizer, seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the CLS token: a visible, seeded vector
        torch.manual_seed(seed + 1)
        model.model.vision_tower.embeddings.cls_token.normal_(0.0, 0.5)
        for layer in model.model.vision_tower.encoder.layer:  # layer scale: let every block count
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
    return model, proc


def tiny_internvl(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-internvl` preset (InternVL3.5 shape) as a ready adapter."""
    from .internvl import InternVLAdapter

    model, proc = build_tiny_internvl(seed)
    return InternVLAdapter(to_dtype_as_loaded(model, dtype, device), proc, name="tiny-internvl", dtype=dtype, device=device)


# --- tiny-llava-onevision: SigLIP (no CLS) + Qwen2, AnyRes with anyres_max_4 ----------------
def onevision_processor(tok=None, image_size: int = IMAGE_SIZE, patch: int = PATCH, pinpoints=None,
                        aspect: str = "anyres_max_4"):
    """An offline LlavaOnevisionProcessor (PIL, `image_size` px crops, pinpoints up to 3x3 crops)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .llava_onevision import onevision_processor_class

    if tok is None:
        tok = build_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    pins = pinpoints or [[image_size * i, image_size * j] for i in range(1, 4) for j in range(1, 4)]
    ip = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size}, image_grid_pinpoints=pins)
    return onevision_processor_class()(image_processor=ip, tokenizer=tok, video_processor=None,
                                       num_image_tokens=(image_size // patch) ** 2, vision_feature_select_strategy="full",
                                       vision_aspect_ratio=aspect, image_token="<image>")


def onevision_config(proc, image_size: int = IMAGE_SIZE, patch: int = PATCH, vision_hidden: int = 64,
                     vision_layers: int = 4, text_hidden: int = 64, text_layers: int = 4):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tok = proc.tokenizer
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=max(4, vision_hidden // 64),
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    heads = max(4, text_hidden // 128)
    text = Qwen2Config(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=max(2, heads // 2), vocab_size=len(tok),
                       max_position_embeddings=8192, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio=proc.vision_aspect_ratio,
                                image_grid_pinpoints=proc.image_processor.image_grid_pinpoints,
                                pad_token_id=tok.pad_token_id)


def build_tiny_llava_onevision(seed: int = TINY_SEED):
    """(model, processor), eval mode, fp32; the global RNG is left untouched."""
    from transformers import LlavaOnevisionForConditionalGeneration

    proc = onevision_processor()
    model = seeded_model(LlavaOnevisionForConditionalGeneration, onevision_config(proc), proc.tokenizer, seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        model.model.image_newline.normal_(0.0, 0.5)
    return model, proc


def tiny_llava_onevision(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-llava-onevision` preset as a ready adapter."""
    from .llava_onevision import LlavaOnevisionAdapter

    model, proc = build_tiny_llava_onevision(seed)
    return LlavaOnevisionAdapter(to_dtype_as_loaded(model, dtype, device), proc, name="tiny-llava-onevision", dtype=dtype,
                                 device=device)
