"""The embedded model: a small LLaVA (real transformers classes) for the shapes world.

`build_model()` makes an untrained `LlavaForConditionalGeneration` (CLIP vision tower +
Llama text model + the LLaVA projector), `build_processor()` its `LlavaProcessor`
(`LlavaImageProcessorPil` + a word-level `PreTrainedTokenizerFast` with `<image>` and the
coordinate tokens `<x0>..<x15>`, `<y0>..<y15>`), and `load_embedded()` the trained model
shipped in `nuwa_graph/embedded/weights/` (offline, float32 on CPU).

Prompt format (LLaVA-1.5's): "USER: <image>\\n{question} ASSISTANT:", answer "{answer}</s>".
The processor expands `<image>` into 144 placeholders (12 x 12 patches of 14 px on a
168 px image; the CLS token is dropped by `vision_feature_select_strategy="default"`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..world.boxes import BINS, coord_tokens
from ..world.shapes import IMAGE_SIZE, PATCH, vocabulary

WEIGHTS_DIR = Path(__file__).parent / "weights"
PROMPT = "USER: <image>\n{question} ASSISTANT:"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Sizes of the shipped model: CLIP-style ViT 6 x 128, Llama 16 x 128 (half of LLaVA-1.5's 32 layers,
# so 32-layer schedules keep their proportions; docs/embedded.md). Tests that only need the
# architecture pass text_layers=4 for speed.
DEFAULT_DIMS = dict(vision_hidden=128, vision_layers=6, vision_heads=4, vision_mlp=512,
                    text_hidden=128, text_layers=16, text_heads=4, text_mlp=512)


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


def build_tokenizer(bins: int = BINS):
    """Word-level fast tokenizer: specials, coordinate tokens, then the world's words (lower-cased input)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + coord_tokens(bins) + vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False, single_word=False) for t in coord_tokens(bins)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor(image_size: int = IMAGE_SIZE):
    from transformers import LlavaImageProcessorPil
    return LlavaImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                  "width": image_size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def build_processor(tokenizer=None, image_size: int = IMAGE_SIZE, patch_size: int = PATCH):
    from transformers import LlavaProcessor
    tokenizer = tokenizer or build_tokenizer()
    return LlavaProcessor(image_processor=build_image_processor(image_size), tokenizer=tokenizer,
                          patch_size=patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH, **dims):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    d = {**DEFAULT_DIMS, **dims}
    vision = CLIPVisionConfig(hidden_size=d["vision_hidden"], intermediate_size=d["vision_mlp"],
                              num_hidden_layers=d["vision_layers"], num_attention_heads=d["vision_heads"],
                              image_size=image_size, patch_size=patch_size, projection_dim=d["vision_hidden"],
                              hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d["text_hidden"], intermediate_size=d["text_mlp"],
                       num_hidden_layers=d["text_layers"], num_attention_heads=d["text_heads"],
                       num_key_value_heads=d["text_heads"], max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    grid = image_size // patch_size
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=grid * grid,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2)
    cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def build_model(seed: int = 0, tokenizer=None, **dims):
    """(untrained LlavaForConditionalGeneration, LlavaProcessor), initialised from `seed`."""
    from transformers import LlavaForConditionalGeneration
    processor = build_processor(tokenizer)
    cfg = build_config(processor.tokenizer, **dims)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (processor.tokenizer.bos_token_id,
                                                           processor.tokenizer.eos_token_id,
                                                           processor.tokenizer.pad_token_id)
    gen.do_sample, gen.max_new_tokens = False, 8
    return model.eval(), processor


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) float32 from RGB uint8 arrays already at the model's size.

    Equal to what the LlavaImageProcessorPil of `build_processor` gives for 168 x 168 images
    (its resize and crop are then the identity); the training loop uses it to skip PIL.
    """
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def save_embedded(model, processor, out_dir: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None):
    """save_pretrained of model (weights stored as `dtype`, loaded back as float32) and processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dtype = next(model.parameters()).dtype
    model.to(dtype)
    try:
        model.save_pretrained(out)
    finally:
        model.to(state_dtype)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"   # upcast on load: fp16 storage only keeps the files small
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = "float32"
    if extra:
        cfg["nuwa_embedded"] = extra
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    return out


def load_embedded(path: str | Path | None = None, attn_implementation: str | dict | None = None):
    """(model, processor) from a saved embedded model directory (default: the shipped weights)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    path = Path(path) if path else WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no embedded model at {path}: train it with scripts/train_embedded.py")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kw)
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor
