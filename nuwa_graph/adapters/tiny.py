"""The offline presets: `tiny-llava` (a small but real LLaVA) and `tiny-qwen` (a small
Qwen2.5-VL), built from configs.

tiny-llava: the real transformers classes (CLIP vision tower, LLaVA projector, Llama decoder) at toy
sizes, random weights from a fixed seed, an offline word-level tokenizer (`tokenizers` +
`PreTrainedTokenizerFast`) and an offline `LlavaProcessor` with `LlavaImageProcessorPil`.

Geometry: 112 px images, 14 px patches -> an 8 x 8 grid = 64 visual tokens (+ CLS in CLIP);
CLIP 4 layers, hidden 64, 4 heads; Llama 4 layers, hidden 64, 4 heads, 2 KV heads (GQA).
LLaVA-1.5 conventions: `vision_feature_layer=-2`, strategy `default` (CLS dropped).

tiny-qwen: `Qwen2_5_VLForConditionalGeneration` with window attention (full attention at
blocks 1 and 3), M-RoPE, an offline word-level tokenizer with Qwen's vision tokens and a
PIL processor; `tiny_qwen_image()` gives an image whose merged grid is TINY_GRID (5 x 7).
Nothing here touches the network; building takes well under a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .loading import to_dtype_as_loaded

if TYPE_CHECKING:
    from .qwen import QwenAdapter

TINY_SEED = 0
IMAGE_SIZE = 112
PATCH = 14

# a small closed vocabulary: enough for prompts about a synthetic image of coloured shapes
WORDS = (
    "a an the is are of on in at to and or what which where how many color colour shape shapes image picture "
    "describe there this that it left right top bottom middle center above below next red green blue yellow "
    "purple orange black white gray circle square triangle star rectangle big small one two three four five "
    "yes no USER ASSISTANT : ? . , ! \n"
).split(" ")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def build_tokenizer() -> Any:
    """A word-level fast tokenizer with `<image>` as a special token; pads on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in SPECIALS + [w for w in WORDS if w]:
        vocab.setdefault(w, len(vocab))
    for w in ("USER:", "ASSISTANT:"):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_processor(tokenizer=None, image_size: int = IMAGE_SIZE):
    """An offline LlavaProcessor (PIL image processor, CLIP normalisation, `image_size` px)."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    tok = tokenizer or build_tokenizer()
    ip = LlavaImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")


def build_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                       pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=pad_id)


def seeded_model(model_cls, config, tok, seed: int):
    """`model_cls(config)` in eval mode with weights drawn from `seed` (the global RNG is left
    untouched) and the tokenizer's pad and EOS ids in its generation config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        # the default init is small; widen it a little so that attention rows are not uniform
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def build_tiny_llava(seed: int = TINY_SEED):
    """(model, processor) with weights drawn from `seed`; the global RNG is left untouched."""
    from transformers import LlavaForConditionalGeneration

    proc = build_processor()
    tok = proc.tokenizer
    cfg = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                       tok.eos_token_id)
    model = seeded_model(LlavaForConditionalGeneration, cfg, tok, seed)
    return model.eval(), proc


def tiny_llava(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-llava` preset as a ready adapter."""
    from .llava import LlavaAdapter

    model, proc = build_tiny_llava(seed)
    model = to_dtype_as_loaded(model, dtype, device)  # RoPE tables stay float32, as from_pretrained keeps them
    return LlavaAdapter(model, proc, name="tiny-llava", dtype=dtype, device=device)


def synthetic_image(size: int = 336, seed: int = 0):
    """A deterministic picture of coloured shapes on a plain background (the default image)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (235, 232, 225))
    d = ImageDraw.Draw(img)
    colors = [(220, 40, 40), (40, 160, 60), (40, 80, 210), (240, 200, 30), (140, 60, 170)]
    for i in range(5):
        r = rng.randint(size // 12, size // 6)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        c = colors[i % len(colors)]
        kind = i % 3
        if kind == 0:
            d.ellipse([x - r, y - r, x + r, y + r], fill=c)
        elif kind == 1:
            d.rectangle([x - r, y - r, x + r, y + r], fill=c)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=c)
    return img


# --- tiny-qwen: a small Qwen2.5-VL (window attention, M-RoPE) ------------------------------
TINY_WORDS = (
    "what is the color of shape shapes a an left right top bottom middle center above below "
    "red green blue yellow purple orange white black gray circle square triangle star "
    "how many are there where describe image picture in on at to and or ? . , yes no "
    "one two three four five six seven eight nine zero small large big"
).split()
TINY_SPECIALS = ("<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def tiny_qwen_tokenizer():
    """A word-level tokenizer built offline, with Qwen's vision special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(TINY_SPECIALS) + list(TINY_VISION_TOKENS) + TINY_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": list(TINY_VISION_TOKENS)})
    return tok


def tiny_qwen_config(vocab_size: int, token_ids: dict[str, int], depth: int = 4, patch_size: int = 4,
                     window_size: int = 16, vision_hidden: int = 32, text_hidden: int = 64, text_layers: int = 4):
    """A tiny Qwen2.5-VL config: window attention (windows of 2x2 merged tokens with the
    defaults) with full attention at blocks 1 and 3, out_hidden_size = text hidden, 4 text
    layers with 4 heads (head_dim 16, mrope_section [2, 3, 3] sums to head_dim / 2)."""
    from transformers import Qwen2_5_VLConfig

    text_heads = 4
    head_dim = text_hidden // text_heads
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           out_hidden_size=text_hidden, fullatt_block_indexes=[i for i in range(depth) if i % 2 == 1],
                           in_channels=3),
        text_config=dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=None, eos_token_id=token_ids["<|endoftext|>"],
                         pad_token_id=token_ids["<pad>"],
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=token_ids["<|endoftext|>"], pad_token_id=token_ids["<pad>"],
    )


# merged grid of the tiny preset's default image: 5 x 7 (odd on both sides), i.e. 40 x 56 pixels
TINY_GRID = (5, 7)


def build_tiny_qwen(seed: int = 0):
    """A tiny, randomly initialised Qwen2.5-VL with an offline tokenizer and processor.

    Returns (model, processor), eval mode, fp32. `tiny_qwen_image()` gives an image whose
    merged grid is TINY_GRID (5 x 7 merged tokens = 10 x 14 patches of 4 px) and
    `tiny_qwen_prompt()` a prompt with the image placeholder block. Weights are drawn with a
    larger spread than the default init so that pruning visibly changes the logits.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .qwen import qwen_processor

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}
    config = tiny_qwen_config(len(tok), ids)
    processor = qwen_processor(tok, patch_size=config.vision_config.patch_size, merge_size=2,
                               min_pixels=8 * 8, max_pixels=64 * 8 * 8 * 16)
    return seeded_model(Qwen2_5_VLForConditionalGeneration, config, tok, seed), processor


def tiny_qwen(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> QwenAdapter:
    """The `tiny-qwen` preset as a ready adapter."""
    from .qwen import QwenAdapter

    model, processor = build_tiny_qwen(seed)
    model = to_dtype_as_loaded(model, dtype, device)  # RoPE tables stay float32, as from_pretrained keeps them
    return QwenAdapter(model, processor, name="tiny-qwen", dtype=dtype, device=device)


def tiny_qwen_image(grid: tuple[int, int] = TINY_GRID, seed: int = 0, unit: int = 8):
    """A random RGB PIL image whose merged grid is `grid` (unit = patch_size * merge_size px)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(grid[0] * unit, grid[1] * unit, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def tiny_qwen_prompt(question: str = "what is the color of the shape ?") -> str:
    """The prompt layout the adapter expects: text, the image block, text."""
    return f"<|im_start|> describe <|vision_start|><|image_pad|><|vision_end|> {question} <|im_end|>"
