"""The auxiliary CLIP model CDPruner reads: the text tower (with its projection) and the
image-side `visual_projection` of the checkpoint a LLaVA vision tower comes from.

CDPruner (Theia-4869/CDPruner @ 9541616c, llava/model/multimodal_encoder/clip_encoder.py
`load_text_tower` / `forward`) loads CLIPTextModelWithProjection, CLIPTokenizerFast and the
visual projection from the vision tower's own name (openai/clip-vit-large-patch14-336 for
LLaVA-1.5) and computes, in float32:
- the question's text embeddings: tokenized without truncation (BOS ... EOS), right-padded
  with id 0 / mask 0 to a multiple of the text tower's 77 positions, one row per 77-token
  chunk, `text_embeds` (the projection of the pooled EOS state);
- the patches' embeddings: the tower's post_layernorm on hidden_states[-2] patches, then
  `visual_projection` on them in float32.
`ClipText` does the same; `clip_text_name` finds the checkpoint of a LLaVA config (None: this
tower has no known CLIP text tower, e.g. the embedded model's); `build_tiny_clip_text` makes a
small random one from a config for the tiny preset (no hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RunError

# (image_size, patch_size, hidden_size, layers) of a CLIP vision tower -> its public checkpoint
KNOWN_TOWERS = {(336, 14, 1024, 24): "openai/clip-vit-large-patch14-336",
                (224, 14, 1024, 24): "openai/clip-vit-large-patch14"}


def clip_text_name(config: Any) -> str | None:
    """The CLIP checkpoint of a LLaVA config's vision tower, or None when it is not known."""
    named = getattr(config, "mm_vision_tower", None) or getattr(config.vision_config, "_name_or_path", "")
    if isinstance(named, str) and "clip" in named.lower():
        return named
    vc = config.vision_config
    shape = (getattr(vc, "image_size", None), getattr(vc, "patch_size", None), getattr(vc, "hidden_size", None),
             getattr(vc, "num_hidden_layers", None))
    return KNOWN_TOWERS.get(shape)  # type: ignore[arg-type]


@dataclass
class ClipText:
    """A CLIP text tower with projection, its tokenizer and the image-side projection (float32)."""

    text_model: nn.Module  # CLIPTextModelWithProjection
    visual_projection: nn.Module
    tokenizer: Any
    name: str

    @torch.no_grad()
    def text_embeds(self, question: str, device: torch.device | str) -> torch.Tensor:
        """(M, d_proj) float32: one row per 77-token chunk of the question."""
        enc = self.tokenizer(text=[question], return_tensors="pt")
        width = int(self.text_model.config.max_position_embeddings)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        chunks = (ids.shape[1] - 1) // width + 1
        pad = chunks * width - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1).reshape(-1, width).to(device)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1).reshape(-1, width).to(device)
        return self.text_model(input_ids=ids, attention_mask=mask).text_embeds.float()

    @torch.no_grad()
    def image_embeds(self, patches: torch.Tensor, post_layernorm: nn.Module) -> torch.Tensor:
        """(n, d_proj) float32: visual_projection(post_layernorm(patches).float()), on the
        projection's device (the tower may sit on another GPU under a device_map)."""
        normed = post_layernorm(patches).float()
        return self.visual_projection(normed.to(self.visual_projection.weight.device))


def load_clip_text(name: str, device: torch.device | str) -> ClipText:
    """The CLIP text tower, tokenizer and visual projection of checkpoint `name` (hub id or
    folder; offline when cached), float32 on `device`."""
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizerFast

    try:
        tok = CLIPTokenizerFast.from_pretrained(name)
        text = CLIPTextModelWithProjection.from_pretrained(name, dtype=torch.float32)
        projection = CLIPModel.from_pretrained(name, dtype=torch.float32).visual_projection
    except Exception as exc:  # noqa: BLE001  (any loading failure gets the same advice)
        raise RunError(f"CDPruner's official relevance needs the CLIP text tower of {name!r}, which could not be "
                       f"loaded ({type(exc).__name__}: {exc}); make the checkpoint available (offline: in the Hugging "
                       f"Face cache), or run the LLM-embedding variant with --set relevance=llm") from None
    return ClipText(text.to(device).eval(), projection.to(device).eval(), tok, name)


def _tiny_tokenizer(words: list[str]) -> Any:
    """A word-level tokenizer that wraps text in BOS ... EOS, as CLIP's does (pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>", *words]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_tiny_clip_text(vision_hidden: int, words: list[str], seed: int = 0, width: int = 64, layers: int = 2,
                         heads: int = 4, positions: int = 77) -> ClipText:
    """A random CLIP text tower + visual projection built from a config (tests, the tiny preset;
    the benchmark at CLIP-L's text shape: width 768, 12 layers, 12 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = _tiny_tokenizer(words)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=positions, projection_dim=width,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModelWithProjection(cfg)
        projection = nn.Linear(vision_hidden, width, bias=False)
    return ClipText(text.eval(), projection.eval(), tok, "tiny-clip-text")
