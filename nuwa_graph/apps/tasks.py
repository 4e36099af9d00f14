"""The data of an eval: one Task per data file (kind detected, every record checked first) and
the built-in shapes-world sample set."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..safe_io import probe_image
from .data import BadRecord, DataFormatError, load_grounding, load_vqa, read_records
from .dialogs import is_dialog, load_dialogs
from .errors import EvalError

SAMPLE_SEED = 4242          # world seed of the built-in sample set (training uses 0, held-out eval 1000003)
SAMPLE_IMAGES = 40          # scenes in the built-in sample set (1 grounding + 1 VQA question each)
KINDS = ("grounding", "vqa", "dialog")


@dataclass
class Task:
    kind: str          # "grounding" | "vqa" | "dialog" (several questions per image: apps/dialogs.py)
    source: str        # the data file
    samples: list      # GroundingSample | VQASample
    skipped: int = 0   # bad records left out (--skip-bad-records)

    @property
    def name(self) -> str:
        return self.kind


def detect_kind(path: str | Path) -> str:
    """'dialog' if the records carry turns, 'grounding' if they carry a box, else 'vqa' if
    they carry a question."""
    try:
        recs = read_records(path)
    except DataFormatError as exc:
        raise EvalError(str(exc)) from None
    if not recs:
        raise EvalError(f"data file {str(path)!r} holds no records")
    rec = recs[0]
    if not isinstance(rec, dict):
        raise EvalError(f"data file {str(path)!r}: record 0 is not an object")
    if is_dialog(rec):
        return "dialog"
    if any(rec.get(k) is not None for k in ("bbox", "box_xyxy", "bbox_xyxy")):
        return "grounding"
    if any(isinstance(rec.get(k), str) for k in ("question", "text", "prompt")):
        return "vqa"
    raise EvalError(f"data file {str(path)!r}: cannot tell grounding from VQA (record 0 has no bbox / box_xyxy and "
                    f"no question); prefix the path with grounding: or vqa:")


MAX_LISTED_PROBLEMS = 50     # bad records listed in one error message (the count is always given)
# a data file is read whole: past this size it is refused before reading (raise it with the
# environment variable NUWA_GRAPH_MAX_DATA_BYTES on a machine with the memory for it)
MAX_DATA_BYTES = 1 << 30


def _max_data_bytes() -> int:
    raw = os.environ.get("NUWA_GRAPH_MAX_DATA_BYTES")
    if raw is None:
        return MAX_DATA_BYTES
    try:
        return int(raw)
    except ValueError:
        raise EvalError(f"NUWA_GRAPH_MAX_DATA_BYTES={raw!r}: give a whole number of bytes") from None


def _read_task(text: str, kind: str | None, limit: int | None, bbox_format: str, problems: list[BadRecord],
               image_root: str | Path | None = None, image_template: str | None = None) -> Task:
    path = Path(text).expanduser()
    if not path.is_file():
        raise EvalError(f"data file {text!r} does not exist; pass --data with a RefCOCO-style JSON (grounding) "
                        f"or a VQA JSONL file, or leave --data out for the built-in sample set")
    size, limit_bytes = path.stat().st_size, _max_data_bytes()
    if size > limit_bytes:
        raise EvalError(f"data file {text!r} is {size} bytes; at most {limit_bytes} are read (limit MAX_DATA_BYTES; "
                        f"set NUWA_GRAPH_MAX_DATA_BYTES to raise it, or split the file)")
    found: list[BadRecord] = []
    try:
        kind = kind or detect_kind(path)
        if kind == "dialog":
            samples: list = load_dialogs(path, image_root, bbox_format, limit, found, image_template)
        elif kind == "grounding":
            samples = load_grounding(path, image_root, bbox_format=bbox_format, limit=limit, problems=found,
                                     image_template=image_template)
        else:
            samples = load_vqa(path, image_root, image_template, limit=limit, problems=found, require_answers=True)
    except DataFormatError as exc:
        raise EvalError(f"data file {text!r} is not valid {kind or 'grounding/VQA'} data: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"data file {text!r} could not be read ({type(exc).__name__}: {exc})") from None
    checked: dict[Any, str | None] = {}
    for s in samples:  # every image is probed (header only) before anything runs
        for one in (s.image if isinstance(s.image, list) else [s.image]):
            key = one if isinstance(one, str) else id(one)
            if key not in checked:
                problem = checked[key] = probe_image(one)
                if problem:
                    found.append(BadRecord(str(path), s.record, "image", problem))
    bad = {b.record for b in found}
    task = Task(kind, str(path), [s for s in samples if s.record not in bad], skipped=len(bad))
    problems += sorted(found, key=lambda b: b.record)
    return task


def load_data(specs: Iterable[str | Path], limit: int | None = None, bbox_format: str = "xywh",
              skip_bad: bool = False, image_root: str | Path | None = None,
              image_template: str | None = None) -> list[Task]:
    """One Task per data file; `grounding:PATH` / `vqa:PATH` force the kind, else it is detected.
    Two files of the same kind are two tasks (named kind, kind#2, ...). `image_root` (else each
    file's folder) resolves relative image paths; `image_template` names images from record
    fields (e.g. "{imageId}.jpg") where a record has no image field.

    Every record of every file is checked first (see data.py; images are probed). Bad records
    raise one EvalError listing them all (file, record, field), or with `skip_bad` are left out
    and counted in `Task.skipped`."""
    if bbox_format not in ("xywh", "xyxy"):
        raise EvalError(f"--bbox-format {bbox_format!r}: use xywh ([x, y, w, h], COCO / lmms-eval) or xyxy "
                        f"([x0, y0, x1, y1])")
    tasks: list[Task] = []
    problems: list[BadRecord] = []
    for spec in specs:
        text = str(spec)
        kind = None
        for k in KINDS:
            if text.startswith(k + ":"):
                kind, text = k, text[len(k) + 1:]
        tasks.append(_read_task(text, kind, limit, bbox_format, problems, image_root, image_template))
    if problems and not skip_bad:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise EvalError(f"{len(problems)} bad data record{'s' if len(problems) != 1 else ''} (nothing was run):\n"
                        f"{shown}" + (f"\n  ... and {more} more" if more > 0 else "")
                        + "\nfix them, or pass --skip-bad-records to leave them out (the count is reported)")
    for t in tasks:
        if not t.samples:
            raise EvalError(f"data file {t.source!r} holds no usable {t.kind} samples"
                            + (f" ({t.skipped} bad records skipped)" if t.skipped else ""))
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.kind] = seen.get(t.kind, 0) + 1
        if seen[t.kind] > 1:
            t.kind = f"{t.kind}#{seen[t.kind]}"
    return tasks


def sample_data(out_dir: str | Path, n_images: int = SAMPLE_IMAGES, seed: int = SAMPLE_SEED,
                n_turns: int = 0) -> list[Path]:
    """The built-in sample set: shapes-world scenes [0, n_images) of world `seed`, written once
    to `out_dir` (reused when its world.json matches) -> [refcoco.json, vqa.jsonl], and
    dialog.jsonl (up to `n_turns` questions per scene) when n_turns > 0."""
    from ..world import write_split

    out = Path(out_dir)
    world = out / "world.json"
    paths = [out / "refcoco.json", out / "vqa.jsonl"] + ([out / "dialog.jsonl"] if n_turns else [])
    try:
        meta = json.loads(world.read_text())
        fresh = (meta.get("seed"), meta.get("n_images"), meta.get("start"), meta.get("n_turns", 0)) == \
            (seed, n_images, 0, n_turns)
    except (OSError, ValueError):
        fresh = False
    if not fresh or not all(p.is_file() for p in paths):
        write_split(out, n_images, seed, n_grounding=1, n_vqa=1, n_turns=n_turns)
    return paths

