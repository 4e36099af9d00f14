"""Files in and out without losing anything: output paths checked before work, atomic writes,
bounded image decoding.

- `check_output(path, kind, inputs, option)`: called by every command BEFORE it loads a model,
  so a bad `-o` costs nothing: a file output must not be a folder, a folder output must not be
  a file, no part of the path may be an existing file, the path must be writable, and an
  output may never be one of the command's input files (`draw F -o F`);
- `atomic_write(path, data)`: temp file in the same folder + rename, so an interrupted or
  failed write leaves the old file (or none), never half a file;
- `open_image(src)`: PIL refuses images of more than MAX_IMAGE_PIXELS pixels (decompression
  bombs: a few KB on disk, gigabytes decoded) and any unreadable image, as an ImageError.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from .errors import RunError

MAX_IMAGE_PIXELS = 50_000_000   # width * height of one input image (a 7000 x 7000 photo)


class OutputPathError(RunError):
    """An output path that cannot be written, or that would overwrite an input."""


class ImageError(RunError):
    """An input image that cannot be decoded, or is too large to decode safely."""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | Path, kind: Literal["file", "folder"], inputs: Iterable[str | Path] = (),
                 option: str = "--output", extra_files: Iterable[str] = ()) -> Path:
    """`path` if a `kind` can be written there without harm; OutputPathError otherwise.

    `extra_files` are names the command writes inside a folder output (checked against inputs too)."""
    p = Path(path).expanduser()
    shown = f"{option} {str(path)!r}"
    if str(path).strip() == "":
        raise OutputPathError(f"{option} is empty; give a {kind} path")
    if kind == "file" and p.is_dir():
        raise OutputPathError(f"{shown} is a folder; give a file path, e.g. {str(p / 'out')!r}")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise OutputPathError(f"{shown} is a file; give a folder path (results are written inside it)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{shown} is under {str(parent)!r}, which is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{shown}: the folder {str(parent)!r} is not writable")
            break
    targets = [p] if kind == "file" else [p / name for name in extra_files]
    for src in inputs:
        s = Path(str(src)).expanduser()
        for t in targets:
            if _same(t, s):
                raise OutputPathError(f"{shown} would overwrite the input file {str(src)!r}; give another path")
    return p


def atomic_write(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` via a temp file and a rename (the folder is created if missing)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode(encoding) if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def probe_image(src: str | Path | bytes) -> str | None:
    """Why `src` cannot be used as an image (missing, not an image, too many pixels), or None.
    Reads only the header: cheap enough to run on every sample of a data set before a run."""
    from PIL import Image

    if not isinstance(src, (bytes, bytearray)) and not Path(str(src)).is_file():
        return (f"image {str(src)!r} does not exist (relative paths are read from the data file's folder or "
                "--image-root; see also --image-template)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image is too large to decode safely (a decompression bomb?)"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        return f"image is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} pixels are decoded (limit MAX_IMAGE_PIXELS)"
    return None


def open_image(src: str | Path | bytes, where: str = "image"):
    """An RGB PIL image from a path or encoded bytes; ImageError (naming `where`) when it cannot be used."""
    from PIL import Image

    fh: io.BytesIO | str
    if isinstance(src, (bytes, bytearray)):
        fh, name = io.BytesIO(src), "<bytes>"
    else:
        name = str(src)
        if not Path(name).is_file():
            raise ImageError(f"{where}: {name!r} does not exist (or is not a file)")
        fh = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{where}: {name!r} is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} pixels are "
                                     f"decoded (limit MAX_IMAGE_PIXELS; a decompression bomb?)")
                return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{where}: {name!r} is too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:  # PIL's ways of saying "not an image"
        raise ImageError(f"{where}: {name!r} could not be read as an image ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'unreadable'}); give a PNG or JPEG") from None
