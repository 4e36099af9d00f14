"""The offline preset `tiny-smolvlm`: `SmolVLMForConditionalGeneration` at toy size with image
splitting on, built from a config with a fixed seed (random weights: compare logits, not texts).

SigLIP without CLS (64 px crops of 4 px patches, 4 layers), pixel shuffle 2 -> 8 x 8 = 64
tokens per crop, Llama LLM (4 layers, GQA); the image processor resizes an image's longest
edge to 128 px and cuts it into up to 2 x 2 tiles of 64 px, plus the global image: a 200 x 150
picture is 2 x 2 tiles + global = 5 runs of 64 `<image>` tokens with text between them. The
tokenizer is word level with SmolVLM's image tokens (`<fake_token_around_image>`,
`<row_i_col_j>`, `<global-img>`) and `\\n` as a token, so the prompt has the real layout;
PIL image processing (`SmolVLMImageProcessorPil`); the stock `SmolVLMProcessor` (it needs the
`num2words` package). `build_smolvlm(model_cls=Idefics3ForConditionalGeneration)` gives the
same model as Idefics3 (the tests load both through checkpoint folders).
"""

from __future__ import annotations

import torch

from .loading import to_dtype_as_loaded
from .tiny import TINY_SEED, TINY_WORDS, seeded_model

SMOLVLM_TILE = 64  # px per crop: 4 px patches -> 16 x 16 patches -> 8 x 8 = 64 tokens after the shuffle
SMOLVLM_SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>", "\n"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def smolvlm_tokenizer():
    """A word-level tokenizer with SmolVLM's special tokens, `\\n` one of them (offline)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SMOLVLM_SPECIALS + ["User:", "Assistant:"] + TINY_WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SMOLVLM_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<end_of_utterance>", bos_token="<|im_start|>", padding_side="left",
                                   extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                                                         "image_token": "<image>",
                                                         "end_of_utterance_token": "<end_of_utterance>",
                                                         "global_image_token": "<global-img>"})


def smolvlm_processor(tok=None, tile: int = SMOLVLM_TILE, units: int = 64, longest_edge: int = 2 * SMOLVLM_TILE,
                      model_type: str = "smolvlm"):
    """The stock processor with PIL image processing: the longest edge resized to `longest_edge`,
    cut into tiles of `tile` px, the global image last."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from .idefics3 import idefics3_processor

    tok = tok or smolvlm_tokenizer()
    ip = SmolVLMImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                  do_image_splitting=True)
    return idefics3_processor(model_type, ip, tok, units)


def smolvlm_config(tok, tile: int = SMOLVLM_TILE, patch: int = 4, scale: int = 2, vision_hidden: int = 32,
                   vision_layers: int = 4, text_hidden: int = 64, text_layers: int = 4, model_type: str = "smolvlm"):
    from transformers import Idefics3Config, LlamaConfig, SmolVLMConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    vision_cls, config_cls = ((SmolVLMVisionConfig, SmolVLMConfig) if model_type == "smolvlm"
                              else (Idefics3VisionConfig, Idefics3Config))
    vision = vision_cls(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                        num_attention_heads=max(2, vision_hidden // 64), image_size=tile, patch_size=patch)
    heads = max(4, text_hidden // 64)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=max(2, heads // 2), vocab_size=len(tok),
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    return config_cls(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      scale_factor=scale, pad_token_id=tok.pad_token_id)


def build_smolvlm(seed: int = TINY_SEED, model_type: str = "smolvlm"):
    """(model, processor), eval mode, fp32; the global RNG is left untouched. `model_type`:
    smolvlm or idefics3 (the same model in the other class)."""
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    proc = smolvlm_processor(model_type=model_type)
    cls = SmolVLMForConditionalGeneration if model_type == "smolvlm" else Idefics3ForConditionalGeneration
    model = seeded_model(cls, smolvlm_config(proc.tokenizer, model_type=model_type), proc.tokenizer, seed)
    return model, proc


def tiny_smolvlm(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = TINY_SEED):
    """The `tiny-smolvlm` preset as a ready adapter."""
    from .idefics3 import Idefics3Adapter

    model, proc = build_smolvlm(seed)
    return Idefics3Adapter(to_dtype_as_loaded(model, dtype, device), proc, name="tiny-smolvlm", dtype=dtype,
                           device=device)
