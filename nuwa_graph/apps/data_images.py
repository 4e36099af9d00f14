"""Where a data record's image(s) come from: a path, base64 bytes, an lmms-eval/HF-datasets
dict, an `image_template` over the record's fields, or a list of them (`images`: one prompt
of several images). Paths are resolved against the data root (data.py says the formats)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path


class _Bad(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _first(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


def _first_key(rec: dict, keys: tuple[str, ...]) -> str:
    return next((k for k in keys if rec.get(k) is not None), keys[0])


_IMAGE_KEYS = ("image", "image_path", "file_name", "img_path", "filename")


def _image(rec: dict, root: Path, where: str, template: str | None = None) -> str | bytes:
    key = _first_key(rec, _IMAGE_KEYS)
    img = _first(rec, _IMAGE_KEYS)
    if isinstance(img, dict):
        if img.get("bytes"):
            b = img["bytes"]
            if isinstance(b, str):
                try:
                    return base64.b64decode(b, validate=True)
                except (binascii.Error, ValueError):
                    raise _Bad(f"{key}.bytes", "not valid base64 (the encoded image bytes)") from None
            if isinstance(b, list) and all(isinstance(x, int) and 0 <= x < 256 for x in b):
                return bytes(b)
            raise _Bad(f"{key}.bytes", f"expected base64 text, got {type(b).__name__}")
        img = img.get("path")
    if img is None and template:
        try:
            img = template.format(**rec)
        except (KeyError, ValueError, IndexError, AttributeError) as exc:
            raise _Bad("image_template", f"{template!r} does not fit the record ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, str) or not img:
        raise _Bad(key, "no image (expected one of image, image_path, file_name, img_path"
                        f"{' or an image_template' if template is None else ''})")
    p = Path(img)
    return str(p if p.is_absolute() else root / p)


def _images(rec: dict, root: Path, where: str) -> list | None:
    """A record's `images` list (each entry as `image`), or None when it gives one image."""
    many = rec.get("images")
    if many is None:
        return None
    if not isinstance(many, list) or not many:
        raise _Bad("images", "expected a non-empty list of images (paths or {path, bytes} dicts)")
    return [_image({"image": im}, root, f"{where}: images[{i}]") for i, im in enumerate(many)]


