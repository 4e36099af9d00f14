"""Checks of prompts and options that run before any generation, so a bad option costs nothing.

- `check_prompt_text`: an empty prompt is an error (never silently replaced by a built-in
  question); a prompt may hold at most one image placeholder (`<image>`, `<|image_pad|>`):
  each prompt comes with exactly one image;
- `check_template`: a prompt template (`--grounding-prompt`, `--vqa-prompt`) must hold its
  field (`{expression}`, `{question}`) and no other braces (`{{`/`}}` for literal ones);
- `check_context`: prompt tokens (with the image's tokens) + `--max-new-tokens` must fit the
  model's context (max_position_embeddings), checked on the longest prompt before the run.
All raise RunError with the option named.
"""

from __future__ import annotations

import string
from typing import Any

from .errors import RunError

IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<|vision_start|>")


def check_prompt_text(prompt: str | None, where: str = "--prompt", images: int = 1) -> None:
    """A prompt holds at most one image placeholder per image (`images`); none is fine too (the
    adapter puts the images before the question)."""
    if prompt is None:
        return
    if not prompt.strip():
        raise RunError(f"{where} is empty; give the question text (or leave {where} out for the built-in question)")
    for ph in IMAGE_PLACEHOLDERS:
        n = prompt.count(ph)
        if n > images:
            raise RunError(f"{where} holds {n} image placeholders {ph!r} for {images} image"
                           f"{'s' if images != 1 else ''}; give one per image (where it goes), or none (the adapter "
                           f"puts the images before the question, in order)")


def check_template(template: str, field: str, option: str) -> None:
    """`template` must format with `{field}` only (literal braces doubled)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise RunError(f"{option} {template!r}: {exc}; write {{{field}}} for the {field} and {{{{ }}}} for a literal "
                       f"brace") from None
    bad = [n for n in names if n != field]
    if bad:
        raise RunError(f"{option} {template!r}: unknown field {{{bad[0]}}}; the only field is {{{field}}} "
                       f"(write {{{{ }}}} for a literal brace)")
    if field not in names:
        raise RunError(f"{option} {template!r} has no {{{field}}}; without it every sample gets the same prompt")
    check_prompt_text(template.replace("{" + field + "}", "x"), option)


def context_length(adapter: Any) -> int | None:
    """The model's context (max_position_embeddings of the language model), if it says."""
    cfg = getattr(getattr(adapter, "model", None), "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(adapter: Any, image: Any, prompt: str, max_new_tokens: int, where: str = "--prompt") -> None:
    """RunError if `prompt` with `image` plus `max_new_tokens` generated tokens cannot fit the model."""
    n_ctx = context_length(adapter)
    if n_ctx is None:
        return
    if max_new_tokens >= n_ctx:
        raise RunError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {n_ctx} tokens "
                       f"(prompt and image tokens come first); give at most a few hundred")
    try:
        n_prompt = int(adapter.encode([image], [prompt]).input_ids.shape[1])  # image: one, or a list
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - the processor's own refusal, e.g. a malformed chat prompt
        raise RunError(f"{where}: the model's processor refused the prompt ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if n_prompt + max_new_tokens > n_ctx:
        raise RunError(f"{where}: {n_prompt} prompt tokens (image included) + --max-new-tokens {max_new_tokens} = "
                       f"{n_prompt + max_new_tokens} tokens, beyond the model's context of {n_ctx}; shorten the "
                       f"prompt or lower --max-new-tokens to at most {max(n_ctx - n_prompt, 0)}")
