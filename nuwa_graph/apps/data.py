"""Loaders for grounding and VQA data in the formats real evaluations use.

Grounding (RefCOCO / RefCOCO+ / RefCOCOg). Accepted files: a JSON list, a JSON object
holding the list under `data`, `annotations`, `samples` or `refs`, or JSON Lines. Each
record needs
- an image: `image` (a path, or an lmms-eval/HF-datasets dict with `path` and/or base64
  `bytes`), else `file_name`, `image_path`, `img_path` or `filename`;
- one or more expressions: `answer` (a string or list: the lmms-lab/RefCOCO* export stores
  the referring expressions there), `sentences` (list of strings or of dicts with `sent` /
  `raw`, as in the refer toolkit), `expressions`, `expression`, `sent`, `caption` or `text`;
- a box in pixels: `bbox` as [x, y, w, h] (COCO, lmms-eval; `bbox_format="xyxy"` for
  exports such as the Qwen-VL refcoco_*.jsonl that store [x0, y0, x1, y1]), or
  `box_xyxy` / `bbox_xyxy` as [x0, y0, x1, y1].
Optional: `question_id` / `id` / `ann_id` / `ref_id`, `image_width` / `width`,
`image_height` / `height`. Every expression becomes one sample, as lmms-eval does.

VQA (GQA, VQAv2, TextVQA-like JSON Lines or JSON list). Each record needs a question
(`question`, `text` or `prompt`), an image (`image`, `image_path`, `file_name`, `img_path`,
or `imageId` (GQA) / `image_id` (VQAv2) through `image_template`, e.g.
"{imageId}.jpg" or "COCO_val2014_{image_id:012d}.jpg") and, for scoring, answers:
`answer` (string; GQA's short answer), `answers` (list of strings or of dicts with
`answer`, VQAv2), `multiple_choice_answer` or `label`. Ids: `question_id`, `questionId`, `id`.
A record may give several images (`images`: a list, each as `image`): one prompt of several
images, which its question places with one `<image>` each, or which go before it in order.

Every record is checked before anything runs: a box must be 4 finite numbers with positive
width and height, image sizes positive whole numbers, base64 image bytes valid, ids unique
in a file, and (for eval: `require_answers`) a VQA record needs a reference answer. With `problems=[]` the loaders collect
every bad record (file, record number, field) instead of stopping at the first.

Relative image paths are resolved against `image_root`, else the data file's folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .data_images import _Bad, _first, _first_key, _image, _images


class DataFormatError(ValueError):
    """A data file that cannot be read as the expected format (message names file and record)."""


@dataclass(frozen=True)
class BadRecord:
    """One record that cannot be scored correctly: where it is and what is wrong."""

    file: str
    record: int            # 0-based position in the file
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}, field {self.field!r}: {self.message}"


@dataclass
class GroundingSample:
    id: str
    image: str | bytes            # path, or encoded image bytes
    expression: str
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 pixels
    width: int | None = None
    height: int | None = None
    meta: dict = field(default_factory=dict)
    record: int = -1              # position of its record in the data file (for messages)

    def load_image(self) -> Image.Image:
        return _open(self.image)


@dataclass
class VQASample:
    id: str
    image: str | bytes | list  # a list: one prompt of several images
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)
    record: int = -1

    @property
    def answer(self) -> str | None:
        return self.answers[0] if self.answers else None

    def load_image(self) -> Image.Image | list[Image.Image]:
        return [_open(im) for im in self.image] if isinstance(self.image, list) else _open(self.image)


def _open(image: str | bytes) -> Image.Image:
    from ..safe_io import open_image

    return open_image(image, "image")


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSON list / JSON object with a list / JSON Lines file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {exc.start}); data files are JSON or JSON Lines") from None
    stripped = text.lstrip()
    if not stripped:
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply") from None
    if obj is None or (isinstance(obj, dict) and path.suffix == ".jsonl"):
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{n}: not JSON: {exc}") from None
                except RecursionError:
                    raise DataFormatError(f"{path}:{n}: JSON nested too deeply") from None
        return recs
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("data", "annotations", "samples", "refs", "questions"):
            if isinstance(obj.get(key), list):
                return obj[key]
        return [obj]
    raise DataFormatError(f"{path}: expected a list of records")


def _number(v, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(field, f"expected a number, got {type(v).__name__} {v!r}"[:160])
    if not math.isfinite(v):
        raise _Bad(field, f"{v} is not a finite number")
    return float(v)


def _box(rec: dict, bbox_format: str) -> tuple[float, float, float, float]:
    key = _first_key(rec, ("box_xyxy", "bbox_xyxy", "bbox"))
    raw = rec.get(key)
    if raw is None:
        raise _Bad("bbox", "no box (expected bbox [x, y, w, h] or box_xyxy [x0, y0, x1, y1])")
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise _Bad(key, f"expected a list of 4 numbers, got {raw!r}"[:160])
    b = [_number(v, key) for v in raw]
    xyxy = key != "bbox" or bbox_format == "xyxy"
    x0, y0, x1, y1 = b if xyxy else (b[0], b[1], b[0] + b[2], b[1] + b[3])
    if x1 <= x0 or y1 <= y0:
        raise _Bad(key, f"box {raw} has zero or negative size (width {x1 - x0:g}, height {y1 - y0:g})")
    return x0, y0, x1, y1


def _size(rec: dict, keys: tuple[str, ...]) -> int | None:
    v = _first(rec, keys)
    if v is None:
        return None
    k = _first_key(rec, keys)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 1:
        raise _Bad(k, f"expected a positive whole number of pixels, got {v!r}"[:160])
    return int(v)


def _expressions(rec: dict) -> list[str]:
    v = _first(rec, ("answer", "sentences", "expressions", "expression", "sent", "caption", "text"))
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if not isinstance(v, list):
        return []
    out = []
    for s in v:
        if isinstance(s, dict):
            s = s.get("sent") or s.get("raw")
        if isinstance(s, str) and s.strip():
            out.append(s)
    return out


IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")


def _no_placeholder(text: str, field: str) -> str:
    """Data text may not carry an image placeholder: the adapter adds exactly one per prompt, and
    a prompt holding one is taken as already formatted (no chat template): results would change."""
    for ph in IMAGE_PLACEHOLDERS:
        if ph in text:
            raise _Bad(field, f"holds the image placeholder {ph!r}; give plain text (the image is added once per "
                              f"prompt by the model's adapter)")
    return text


def _record_id(rec: dict, keys: tuple[str, ...]) -> str | None:
    v = _first(rec, keys)
    if v is None or isinstance(v, (dict, list)):
        return None
    return str(v)


class _Ids:
    """Duplicate ids within one file: a second record with an id already seen is bad."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def check(self, rid: str | None, n: int, field: str) -> None:
        if rid is None:
            return
        if rid in self.seen:
            raise _Bad(field, f"duplicate id {rid!r} (also record {self.seen[rid]}); every record needs its own id")
        self.seen[rid] = n


def _collect(path: Path, problems: list[BadRecord] | None, n: int, exc: _Bad) -> None:
    bad = BadRecord(str(path), n, exc.field, exc.message)
    if problems is None:
        raise DataFormatError(str(bad))
    problems.append(bad)


def load_grounding(path: str | Path, image_root: str | Path | None = None, bbox_format: str = "xywh",
                   limit: int | None = None, problems: list[BadRecord] | None = None,
                   image_template: str | None = None) -> list[GroundingSample]:
    """Grounding samples (one per expression) from a RefCOCO-style file; see the module doc.

    A bad record raises DataFormatError, or, when `problems` is a list, is appended there and
    skipped (every bad record of the file is then reported, not only the first)."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError("bbox_format must be 'xywh' or 'xyxy'")
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[GroundingSample] = []
    ids = _Ids()
    id_keys = ("question_id", "id", "ann_id", "ref_id")
    for n, rec in enumerate(read_records(path)):
        try:
            if not isinstance(rec, dict):
                raise _Bad("-", f"not an object (a {type(rec).__name__})")
            box = _box(rec, bbox_format)
            exprs = _expressions(rec)
            if not exprs:
                raise _Bad("answer", "no referring expression (answer, sentences, expression, ...)")
            for e in exprs:
                _no_placeholder(e, _first_key(rec, ("answer", "sentences", "expressions", "expression", "sent",
                                                    "caption", "text")))
            image = _image(rec, root, f"{path}: record {n}", image_template)
            w = _size(rec, ("image_width", "width"))
            h = _size(rec, ("image_height", "height"))
            rid0 = _record_id(rec, id_keys)
            ids.check(rid0, n, _first_key(rec, id_keys))
        except _Bad as exc:
            _collect(path, problems, n, exc)
            continue
        rid = rid0 or str(n)
        meta = {k: v for k, v in rec.items() if k in ("kind", "target", "split", "category", "question")}
        for j, e in enumerate(exprs):
            out.append(GroundingSample(rid if len(exprs) == 1 else f"{rid}-{j}", image, e.strip(), box, w, h,
                                       dict(meta), n))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _answers(rec: dict, required: bool) -> list[str]:
    v = rec.get("answers")
    key = "answers"
    if v is None:
        key = _first_key(rec, ("answer", "multiple_choice_answer", "label"))
        v = _first(rec, ("answer", "multiple_choice_answer", "label"))
    if v is None and not required:
        return []
    if v is None:
        raise _Bad("answers", "no reference answer (answers, answer, multiple_choice_answer or label): the sample "
                              "could never be scored correct")
    if isinstance(v, bool):
        raise _Bad(key, f"expected text, got {v!r}")
    if isinstance(v, (str, int, float)):
        return [str(v)]
    if not isinstance(v, list) or not v:
        raise _Bad(key, f"expected an answer or a non-empty list of answers, got {v!r}"[:160])
    out = []
    for a in v:
        if isinstance(a, dict):
            if not isinstance(a.get("answer"), (str, int, float)):
                raise _Bad(key, f"an answer object without an 'answer' text: {a!r}"[:160])
            a = a["answer"]
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise _Bad(key, f"expected text answers, got {a!r}"[:160])
        out.append(str(a))
    return out


def load_vqa(path: str | Path, image_root: str | Path | None = None, image_template: str | None = None,
             limit: int | None = None, problems: list[BadRecord] | None = None,
             require_answers: bool = False) -> list[VQASample]:
    """VQA samples from a GQA / VQAv2-style JSONL or JSON file; see the module doc and load_grounding.
    `require_answers`: a record without a reference answer is bad (eval: it could never score)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[VQASample] = []
    ids = _Ids()
    id_keys = ("question_id", "questionId", "id")
    for n, rec in enumerate(read_records(path)):
        try:
            if not isinstance(rec, dict):
                raise _Bad("-", f"not an object (a {type(rec).__name__})")
            q = _first(rec, ("question", "text", "prompt"))
            if not isinstance(q, str) or not q.strip():
                raise _Bad("question", "no question text (expected question, text or prompt)")
            many = _images(rec, root, f"{path}: record {n}")
            if not (many is not None and q.count("<image>") == len(many)):  # else: where each image goes
                _no_placeholder(q, _first_key(rec, ("question", "text", "prompt")))
            image: str | bytes | list = _image(rec, root, f"{path}: record {n}", image_template) if many is None else many
            answers = _answers(rec, require_answers)
            rid = _record_id(rec, id_keys)
            ids.check(rid, n, _first_key(rec, id_keys))
        except _Bad as exc:
            _collect(path, problems, n, exc)
            continue
        meta = {k: v for k, v in rec.items() if k in ("kind", "category", "types", "question_type", "answer_type")}
        out.append(VQASample(rid or str(n), image, q.strip(), answers, meta, n))
        if limit is not None and len(out) >= limit:
            break
    return out


_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(s: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed (VQA-style normalisation)."""
    s = _PUNCT.sub(" ", str(s).lower())
    return " ".join(w for w in s.split() if w not in _ARTICLES)


def exact_match(pred: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """VQAv2 accuracy: min(1, matches / 3) over the (usually 10) human answers."""
    p = normalize_answer(pred)
    return min(1.0, sum(p == normalize_answer(a) for a in answers) / 3.0)
