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

Relative image paths are resolved against `image_root`, else the data file's folder.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


class DataFormatError(ValueError):
    """A data file that cannot be read as the expected format (message names file and record)."""


@dataclass
class GroundingSample:
    id: str
    image: str | bytes            # path, or encoded image bytes
    expression: str
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 pixels
    width: int | None = None
    height: int | None = None
    meta: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        return _open(self.image)


@dataclass
class VQASample:
    id: str
    image: str | bytes
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        return self.answers[0] if self.answers else None

    def load_image(self) -> Image.Image:
        return _open(self.image)


def _open(image: str | bytes) -> Image.Image:
    if isinstance(image, bytes):
        return Image.open(io.BytesIO(image)).convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSON list / JSON object with a list / JSON Lines file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if obj is None or (isinstance(obj, dict) and path.suffix == ".jsonl"):
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{n}: not JSON: {exc}") from None
        return recs
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("data", "annotations", "samples", "refs", "questions"):
            if isinstance(obj.get(key), list):
                return obj[key]
        return [obj]
    raise DataFormatError(f"{path}: expected a list of records")


def _first(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


def _image(rec: dict, root: Path, where: str, template: str | None = None) -> str | bytes:
    img = _first(rec, ("image", "image_path", "file_name", "img_path", "filename"))
    if isinstance(img, dict):
        if img.get("bytes"):
            b = img["bytes"]
            return base64.b64decode(b) if isinstance(b, str) else bytes(b)
        img = img.get("path")
    if img is None and template:
        try:
            img = template.format(**rec)
        except (KeyError, ValueError) as exc:
            raise DataFormatError(f"{where}: image_template {template!r} does not fit: {exc}") from None
    if not isinstance(img, str) or not img:
        raise DataFormatError(f"{where}: no image (expected one of image, image_path, file_name, img_path"
                              f"{' or an image_template' if template is None else ''})")
    p = Path(img)
    return str(p if p.is_absolute() else root / p)


def _expressions(rec: dict) -> list[str]:
    v = _first(rec, ("answer", "sentences", "expressions", "expression", "sent", "caption", "text"))
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    out = []
    for s in v:
        if isinstance(s, dict):
            s = s.get("sent") or s.get("raw")
        if isinstance(s, str) and s.strip():
            out.append(s)
    return out


def load_grounding(path: str | Path, image_root: str | Path | None = None, bbox_format: str = "xywh",
                   limit: int | None = None, image_template: str | None = None) -> list[GroundingSample]:
    """Grounding samples (one per expression) from a RefCOCO-style file; see the module doc."""
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError("bbox_format must be 'xywh' or 'xyxy'")
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[GroundingSample] = []
    for n, rec in enumerate(read_records(path)):
        where = f"{path}: record {n}"
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: not an object")
        if rec.get("box_xyxy") is not None or rec.get("bbox_xyxy") is not None:
            x0, y0, x1, y1 = map(float, _first(rec, ("box_xyxy", "bbox_xyxy")))
        elif rec.get("bbox") is not None:
            b = [float(v) for v in rec["bbox"]]
            if len(b) != 4:
                raise DataFormatError(f"{where}: bbox must have 4 numbers")
            x0, y0, x1, y1 = (b[0], b[1], b[0] + b[2], b[1] + b[3]) if bbox_format == "xywh" else b
        else:
            raise DataFormatError(f"{where}: no box (expected bbox [x, y, w, h] or box_xyxy)")
        exprs = _expressions(rec)
        if not exprs:
            raise DataFormatError(f"{where}: no referring expression (answer, sentences, expression, ...)")
        image = _image(rec, root, where, image_template)
        rid = str(_first(rec, ("question_id", "id", "ann_id", "ref_id")) or n)
        w = _first(rec, ("image_width", "width"))
        h = _first(rec, ("image_height", "height"))
        meta = {k: v for k, v in rec.items() if k in ("kind", "target", "split", "category", "question")}
        for j, e in enumerate(exprs):
            out.append(GroundingSample(rid if len(exprs) == 1 else f"{rid}-{j}", image, e.strip(), (x0, y0, x1, y1),
                                       int(w) if w else None, int(h) if h else None, dict(meta)))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _answers(rec: dict) -> list[str]:
    v = rec.get("answers")
    if v is None:
        v = _first(rec, ("answer", "multiple_choice_answer", "label"))
    if v is None:
        return []
    if isinstance(v, (str, int, float)):
        return [str(v)]
    return [str(a["answer"] if isinstance(a, dict) else a) for a in v]


def load_vqa(path: str | Path, image_root: str | Path | None = None, image_template: str | None = None,
             limit: int | None = None) -> list[VQASample]:
    """VQA samples from a GQA / VQAv2-style JSONL or JSON file; see the module doc."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[VQASample] = []
    for n, rec in enumerate(read_records(path)):
        where = f"{path}: record {n}"
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: not an object")
        q = _first(rec, ("question", "text", "prompt"))
        if not isinstance(q, str):
            raise DataFormatError(f"{where}: no question (expected question, text or prompt)")
        rid = str(_first(rec, ("question_id", "questionId", "id")) or n)
        meta = {k: v for k, v in rec.items() if k in ("kind", "category", "types", "question_type", "answer_type")}
        out.append(VQASample(rid, _image(rec, root, where, image_template), q.strip(), _answers(rec), meta))
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
