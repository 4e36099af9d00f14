"""The `tiny-llava` preset: a small but real LLaVA built offline from configs.

The real transformers classes (CLIP vision tower, LLaVA projector, Llama decoder) at toy
sizes, random weights from a fixed seed, an offline word-level tokenizer (`tokenizers` +
`PreTrainedTokenizerFast`) and an offline `LlavaProcessor` with `LlavaImageProcessorPil`.

Geometry: 112 px images, 14 px patches -> an 8 x 8 grid = 64 visual tokens (+ CLS in CLIP);
CLIP 4 layers, hidden 64, 4 heads; Llama 4 layers, hidden 64, 4 heads, 2 KV heads (GQA).
LLaVA-1.5 conventions: `vision_feature_layer=-2`, strategy `default` (CLS dropped).
Nothing here touches the network; building takes well under a second.
"""

from __future__ import annotations

import torch

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


def build_tokenizer():
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


def build_tiny_llava(seed: int = TINY_SEED):
    """(model, processor) with weights drawn from `seed`; the global RNG is left untouched."""
    from transformers import LlavaForConditionalGeneration

    proc = build_processor()
    tok = proc.tokenizer
    cfg = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                       tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
        # the default init is small; widen it a little so that attention rows are not uniform
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), proc


def tiny_llava(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-llava` preset as a ready adapter."""
    from .llava import LlavaAdapter

    model, proc = build_tiny_llava(seed)
    model = model.to(device=device, dtype=dtype)
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
