"""What lmms-eval's models for the Qwen-VL line do to a picture and an answer around the
prompt (per family), so that the plugin hands the adapter what lmms-eval's own model would:
kept apart from integrations/lmms.py because it needs no lmms-eval to import."""

from __future__ import annotations

from typing import NamedTuple

QWEN_MIN_PIXELS = 256 * 28 * 28     # qwen2_5_vl's defaults in lmms-eval 0.7
QWEN_MAX_PIXELS = 1605632


class QwenLmms(NamedTuple):
    """What lmms-eval 0.7's model for a Qwen-VL family does around the prompt."""

    min_pixels: int
    max_pixels: int
    jpeg: bool  # the image goes through a JPEG data URL (quality 85) first
    drop_blank_line_stop: bool  # "\n\n" is removed from the task's stop strings
    strip: bool  # the answer is stripped after the stops


QWEN_LMMS = {
    "qwen2_vl": QwenLmms(3136, 602112, jpeg=True, drop_blank_line_stop=False, strip=True),
    "qwen2_5_vl": QwenLmms(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS, jpeg=True, drop_blank_line_stop=True, strip=False),
    "qwen3_vl": QwenLmms(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS, jpeg=False, drop_blank_line_stop=True, strip=False),
}


def qwen_image_as_lmms(image, factor: int, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS,
                       jpeg: bool = True):
    """The picture lmms-eval's Qwen models hand the processor: re-encoded as JPEG (quality 85,
    their data URL; not on qwen3_vl: `jpeg=False`), then resized so both sides are multiples of
    `factor` (patch x merge) with the pixel count inside [min_pixels, max_pixels] (qwen-vl-utils'
    rule)."""
    import io
    import math

    from PIL import Image

    img = image.convert("RGB")
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    w, h = img.size
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return img.resize((wb, hb))
