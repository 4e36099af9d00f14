"""Prompts and answer parsing shared by `nuwa-graph eval` and the lmms-eval plugin.

Two styles:
- `native` (the default of `nuwa-graph eval`): the prompt templates as given, wrapped by the
  adapter's own chat format, boxes parsed by `world.boxes.parse_box` (coordinate tokens,
  normalised or pixel brackets);
- `lmms-eval`: what lmms-eval 0.7 does, so numbers are comparable with the field's harness:
  its RefCOCO REC prompt (`refcoco_bbox_rec_*` tasks), the short-answer VQA post-prompt of
  its GQA / VQAv2 tasks, the first `[a, b, c, d]` in the answer read as a box normalised to
  0..1 (no such group = the box [0, 0, 0, 0], IoU 0), and the chat text its own model for the
  checkpoint builds (`chat_text`; `LMMS_MODELS`: `llava_hf` for LLaVA and LLaVA-NeXT, `qwen2_vl`,
  `qwen2_5_vl`, `qwen3_vl` for the Qwen-VL generations, `internvl_hf` for InternVL3 / 3.5 `-hf`
  checkpoints and `llava_hf` for LLaVA-OneVision `-hf` checkpoints).

lmms-eval 0.7.3 (the version the `lmms` extra pins) runs the InternVL `-hf` checkpoints only
through its chat model `internvl_hf` (lmms_eval/models/chat/internvl_hf.py; `internvl3` /
`internvl3_5` load the remote-code checkpoints), and `--model llava_hf` resolves to its chat
model too (lmms_eval/models/chat/llava_hf.py, which loads LLaVA-OneVision `-hf` checkpoints;
the simple `llava_onevision` loads the original LLaVA-NeXT-repo checkpoints). Both chat models
render one user message [image, text] (the task's text as given) through the processor's chat
template, with no system message of their own (`chat_messages_text`; `LMMS_CHAT_FAMILIES`).
"""

from __future__ import annotations

import re
from typing import Any

# lmms-eval's refcoco_bbox_rec_* prompt (task text; the same words so that scores compare)
LMMS_REC_PROMPT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
                   "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide "
                   "the bounding box coordinate of the region this sentence describes: {expression}")
LMMS_VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
STYLES = ("native", "lmms-eval")

# llava_hf's fallback when a checkpoint's tokenizer has no chat template (Vicuna v1 with its system line)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."  # the default system_prompt of lmms-eval's qwen2_vl / 2_5_vl / 3_vl
# model family -> lmms-eval 0.7's model for such a checkpoint (whose chat text `chat_text` builds);
# its `llava_hf` loads LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints alike
LMMS_MODELS = {"llava": "llava_hf", "llava_next": "llava_hf", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl",
               "qwen3_vl": "qwen3_vl", "internvl": "internvl_hf", "llava_onevision": "llava_hf"}
# families whose lmms-eval model is a chat model rendering the processor's template over [image, text]
# (`chat_messages_text`): internvl_hf, and llava_hf's chat class for OneVision checkpoints
LMMS_CHAT_FAMILIES = ("internvl", "llava_onevision")

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_NUM = r"(-?\d+(?:\.\d+)?)"
_LMMS_BOX = re.compile(r"\[\s*" + r",\s*".join([_NUM] * 4) + r"\s*\]")


def unescape(text: str) -> str:
    """Shell-typed escapes in a prompt: `\\n` -> newline, `\\t` -> tab, `\\\\` -> backslash; any
    other backslash is kept as typed."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


# --- lmms-eval's RefCOCO scoring -------------------------------------------------------------------
def parse_lmms_box(answer: str) -> list[float] | None:
    """The first `[a, b, c, d]` (integers or decimals, comma-separated) of an answer, or None."""
    m = _LMMS_BOX.search(answer)
    return [float(g) for g in m.groups()] if m else None


def lmms_iou(a, b) -> float:
    """IoU as lmms-eval's RefCOCO metric computes it: areas from the corners as given (a box with
    x1 < x0 is not repaired), intersection clipped at 0; 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def lmms_grounding_score(answer: str, box, width: int, height: int, threshold: float = 0.5) -> dict[str, Any]:
    """Score one answer as lmms-eval's refcoco_bbox_rec task does: the pixel target is normalised
    by the image size; an unparsed answer is the box [0, 0, 0, 0]. Same keys as
    `evaluate.grounding_score` (`box` is the parsed normalised box)."""
    target = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    pred = parse_lmms_box(answer)
    v = lmms_iou(pred if pred is not None else [0.0, 0.0, 0.0, 0.0], target)
    return {"parsed": pred is not None, "iou": v, "correct": v >= threshold,
            "box": None if pred is None else [round(c, 4) for c in pred]}


# --- chat text as lmms-eval's models build it ----------------------------------------------------------
def _tokenizer(adapter):
    return getattr(adapter.processor, "tokenizer", adapter.processor)


def llava_chat_text(processor, context: str, chat_template: str | None = None, images: int = 1) -> str:
    """The text lmms-eval's `llava_hf` gives a LLaVA checkpoint: `<image>\\n` before the context
    (one `<image>` per image, joined by spaces; unless it has one), one user message, the
    tokenizer's chat template (else Vicuna v1 with its system line), generation prompt added.

    A template written for list contents (the processor-style templates of llava-hf checkpoints
    under transformers 5) renders a plain-string message without its text (`USER:  ASSISTANT:`);
    the same message is then rendered with list contents (an image part, then the text), which is
    what the template was written for."""
    tok = getattr(processor, "tokenizer", processor)
    text_part = context.replace("<image>\n", "", 1) if context.startswith("<image>\n") else context
    if "<image>" not in context:
        context = " ".join(["<image>"] * images) + f"\n{context}"
    template = chat_template or getattr(tok, "chat_template", None)
    if template is None:
        return f"{VICUNA_SYSTEM} USER: {context} ASSISTANT:"
    text = tok.apply_chat_template([{"role": "user", "content": context}], chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    if text_part.strip() and text_part.strip() not in text:
        content = [{"type": "image"}] * images + [{"type": "text", "text": text_part}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                       tokenize=False, add_generation_prompt=True)
    return text


def qwen_chat_text(processor, context: str, system_prompt: str | None = QWEN_SYSTEM, model: str = "qwen2_5_vl",
                   images: int = 1) -> str:
    """The text lmms-eval's `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` give (the same messages): a
    system message, then one user message with the image(s) before the context (`<image>`
    placeholders removed), through the checkpoint's chat template, generation prompt added."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"this Qwen-VL checkpoint has no chat template (chat_template.jinja / .json); lmms-eval's "
                         f"{model} needs one")
    context = context.replace("<image>", "")
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": context}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_messages_text(processor, context: str, model: str = "internvl_hf", images: int = 1) -> str:
    """The text lmms-eval's chat models `internvl_hf` and `llava_hf` (chat class) give: the task's
    message is one user turn, the image then the text (as given: no `<image>` added or removed),
    rendered by the processor's chat template with the generation prompt; no system message of
    their own (the template's default, if any, stays). A context that already holds the
    processor's image token would give two image placeholders for one image (the processor then
    fails inside lmms-eval): refused."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"this checkpoint has no chat template (chat_template.jinja / .json); lmms-eval's {model} "
                         f"renders the processor's template")
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in context:
        raise ValueError(f"the task text holds the image token {image_token!r}; lmms-eval's {model} puts the image "
                         f"before the text itself, so the prompt would have two image placeholders for one image")
    messages = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": context}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(adapter, context: str, system_prompt: str | None = None, chat_template: str | None = None,
              images: int = 1) -> str:
    """The full prompt text lmms-eval's own model for this checkpoint would build (LMMS_MODELS:
    `llava_hf` for LLaVA-1.5 and NeXT, `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` for the Qwen-VL line,
    the chat models `internvl_hf` and `llava_hf` for InternVL and OneVision); the adapter takes it as
    it is."""
    family = getattr(adapter, "family", "")
    if family in LMMS_CHAT_FAMILIES:
        model = LMMS_MODELS[family]
        if system_prompt is not None or chat_template is not None:
            what = "system_prompt" if system_prompt is not None else "chat_template"
            raise ValueError(f"{what}: lmms-eval's {model} (chat model) renders the processor's own chat template "
                             f"with no system message of its own; leave {what} out for {family}")
        return chat_messages_text(adapter.processor, context, model, images)
    if family in LMMS_MODELS and family.startswith("qwen"):
        return qwen_chat_text(adapter.processor, context, QWEN_SYSTEM if system_prompt is None else system_prompt,
                              LMMS_MODELS[family], images)
    if LMMS_MODELS.get(family) == "llava_hf":
        if system_prompt is not None:
            raise ValueError("system_prompt: lmms-eval's llava_hf has none (the chat template decides); "
                             "leave it out for LLaVA")
        return llava_chat_text(adapter.processor, context, chat_template, images)
    raise ValueError(f"no lmms-eval prompt format for model family {family!r} (known: {', '.join(LMMS_MODELS)})")


INTERNVL_LMMS_PATCHES = (1, 12)  # internvl_hf's min_patches / max_patches, passed to the processor on every call


def internvl_tiles_as_lmms(adapter, min_patches: int = INTERNVL_LMMS_PATCHES[0],
                           max_patches: int = INTERNVL_LMMS_PATCHES[1]) -> None:
    """Tile an InternVL image as lmms-eval's `internvl_hf` does: it hands the processor
    `min_patches` / `max_patches` (default 1 and 12) on every call, whatever the checkpoint's
    preprocessor config says, and the processor always crops to patches (InternVLProcessor's
    default); set on the adapter's image processor, so its tile layout and the processor agree."""
    if not (isinstance(min_patches, int) and isinstance(max_patches, int) and 1 <= min_patches <= max_patches):
        raise ValueError(f"min_patches={min_patches!r}, max_patches={max_patches!r}: give whole numbers with "
                         f"1 <= min_patches <= max_patches (internvl_hf's defaults: 1 and 12)")
    ip = adapter.processor.image_processor
    ip.crop_to_patches, ip.min_patches, ip.max_patches = True, min_patches, max_patches


def lmms_eval_style(adapter):
    """(prompt_fn, score_fn) for `evaluate(...)`: lmms-eval's chat text and RefCOCO scoring; an
    InternVL adapter's image processor is set to tile as `internvl_hf` does (min 1, max 12 tiles)."""
    from .data import GroundingSample
    from .errors import EvalError
    from .scoring import vqa_score

    family = getattr(adapter, "family", "")
    if family not in LMMS_MODELS:
        known = ", ".join(f"{f} ({m})" for f, m in LMMS_MODELS.items())
        raise EvalError(f"--prompt-style lmms-eval: lmms-eval's prompt format is known for the model families "
                        f"{known}, not for {family!r}; use --prompt-style native")

    if family == "internvl":  # the image tiled as internvl_hf tiles it
        internvl_tiles_as_lmms(adapter)

    def prompt_fn(sample, text: str) -> str:
        return chat_text(adapter, text)

    def score_fn(sample, answer: str, image) -> dict[str, Any]:
        if isinstance(sample, GroundingSample):
            w, h = (sample.width or image.size[0]), (sample.height or image.size[1])
            return lmms_grounding_score(answer, sample.box, w, h)
        return vqa_score(answer, sample.answers)

    return prompt_fn, score_fn


__all__ = ["INTERNVL_LMMS_PATCHES", "LMMS_CHAT_FAMILIES", "LMMS_MODELS", "LMMS_REC_PROMPT", "LMMS_VQA_PROMPT", "STYLES",
           "chat_messages_text", "chat_text", "internvl_tiles_as_lmms", "llava_chat_text", "lmms_eval_style",
           "lmms_grounding_score", "lmms_iou", "parse_lmms_box", "qwen_chat_text", "unescape"]
