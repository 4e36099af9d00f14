"""More signal kinds, registered like those of signals.py (`signal_kind`): what the field's
baselines read beyond attention rows and vision hidden states.

- `llm.keys`: the key states of one decoder layer, for the image tokens present or for the
  text after the image (DART ranks both by the L1 norm of the keys of layer K-1, after RoPE).
- `llm.token_hidden`: the hidden states at the input of a decoder layer of the image tokens or
  of the text after the image, optionally through the model's FINAL norm (DART's similarity).
- `vision.clip_embeds` / `vision.clip_text_embeds`: the CLIP embeddings CDPruner's relevance
  compares, the patches' through the vision tower's post-LayerNorm and the checkpoint's
  visual projection, the question's through the CLIP text tower of the same checkpoint (an
  auxiliary model the adapter loads; families without one refuse these kinds).

The package imports this module (nuwa_graph/__init__.py), so the kinds are known wherever a
pipeline is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .signals import SignalRequest, _AtLLMLayer, _bool, _choice, _VisionLayer, arg, signal_kind

_TOKENS_DOC = "'image': the image tokens present (stream order); 'text': the prompt tokens after the image block"


@signal_kind
@dataclass(frozen=True)
class LLMKeys(_AtLLMLayer):
    """Key states of LLM layer `layer` as its attention uses them (GQA groups repeated to the
    query heads), for the image tokens present or the text after the image. Read at llm.K:
    with rope and layer < K the keys of layer `layer`'s forward; otherwise computed at the
    input of layer `layer` from its own input_layernorm and k_proj (RoPE with the current
    positions when `rope`)."""

    KIND: ClassVar[str] = "llm.keys"
    SHAPE: ClassVar[str] = "(heads, n_present, d) or (heads, t, d), d = head_dim"
    rope: bool = arg(True, _bool, "keys after RoPE (what the layer attends with) or before it")
    tokens: str = arg("image", _choice("image", "text"), _TOKENS_DOC)

    def synthetic(self, geom, present, rand):
        n = present if self.tokens == "image" else geom.text_after
        return rand(geom.llm_heads, n, max(1, geom.llm_width // geom.llm_heads))


@signal_kind
@dataclass(frozen=True)
class LLMTokenHidden(_AtLLMLayer):
    """Hidden states at the input of LLM layer `layer` (the output of layer `layer` - 1) of the
    image tokens present or of the text after the image, as they are (`norm: none`) or through
    the model's final norm (`norm: final`, DART)."""

    KIND: ClassVar[str] = "llm.token_hidden"
    SHAPE: ClassVar[str] = "(n_present, d) or (t, d)"
    tokens: str = arg("image", _choice("image", "text"), _TOKENS_DOC)
    norm: str = arg("none", _choice("none", "final"), "'final': through the language model's final norm")

    def synthetic(self, geom, present, rand):
        return rand(present if self.tokens == "image" else geom.text_after, geom.llm_width)


@signal_kind
@dataclass(frozen=True)
class VisionClipEmbeds(_VisionLayer):
    """CLIP image-side embeddings of the patches of vision hidden_states[layer] (CLS dropped):
    the tower's post_layernorm, then the CLIP checkpoint's visual_projection (CDPruner), float32."""

    KIND: ClassVar[str] = "vision.clip_embeds"
    SHAPE: ClassVar[str] = "(n, d), d = the CLIP projection width"

    def synthetic(self, geom, present, rand):
        return rand(geom.n_visual, geom.vision_width)


@signal_kind
@dataclass(frozen=True)
class VisionClipTextEmbeds(SignalRequest):
    """CLIP text embeddings of the prompt's question from the text tower of the vision tower's
    checkpoint: one row per 77-token chunk (text_embeds at the pooled EOS position), float32."""

    KIND: ClassVar[str] = "vision.clip_text_embeds"
    SHAPE: ClassVar[str] = "(chunks, d), d = the CLIP projection width"

    def synthetic(self, geom, present, rand):
        return rand(1, geom.vision_width)


__all__ = ["LLMKeys", "LLMTokenHidden", "VisionClipEmbeds", "VisionClipTextEmbeds"]
