"""Multi-turn data (several questions about one image) and how an eval runs it.

Format (JSON Lines or a JSON list; docs/evaluation.md, "Multi-turn"): one record per image,

    {"id": "d0", "image": "images/000000.png", "width": 168, "height": 168,
     "turns": [{"question": "what color is the small circle ?", "answers": ["red"]},
               {"question": "where is the red circle ?", "bbox": [10, 12, 30, 30]}]}

A turn with `answers` (or `answer`) is a VQA turn (exact match); a turn with `bbox` ([x, y, w,
h], or [x0, y0, x1, y1] with `--bbox-format xyxy`) or `box_xyxy` is a grounding turn (Acc@0.5 of
the box in the answer); its `question` is asked verbatim (no prompt template). The shapes
world writes one (`world.write_split(..., n_turns=3)`).

Modes, per turn t > 1 (`run_dialogs`):
- `reuse`: turn 1 prunes; later turns continue its KV cache (adapters/conversation.py): the
  image's kept tokens, their keys and values and the conversation so far are reused, nothing
  is pruned again;
- `prune`: every turn is a fresh run over the whole conversation (the same token ids), so the
  pipeline prunes again with the latest question last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .data import (
    BadRecord,
    _answers,
    _Bad,
    _box,
    _collect,
    _first_key,
    _Ids,
    _image,
    _no_placeholder,
    _open,
    _record_id,
    _size,
    read_records,
)

MODES = ("reuse", "prune")


@dataclass
class DialogTurn:
    question: str
    answers: list[str] = field(default_factory=list)  # VQA turn
    box: tuple[float, float, float, float] | None = None  # grounding turn: x0, y0, x1, y1 pixels

    @property
    def kind(self) -> str:
        return "grounding" if self.box is not None else "vqa"


@dataclass
class DialogSample:
    id: str
    image: str | bytes
    turns: list[DialogTurn]
    width: int | None = None
    height: int | None = None
    record: int = -1

    def load_image(self) -> Image.Image:
        return _open(self.image)


def is_dialog(rec: Any) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("turns"), list)


def load_dialogs(path: str | Path, image_root: str | Path | None = None, bbox_format: str = "xywh",
                 limit: int | None = None, problems: list[BadRecord] | None = None,
                 image_template: str | None = None) -> list[DialogSample]:
    """Dialog samples from a multi-turn file (see the module doc); bad records as load_vqa."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[DialogSample] = []
    ids = _Ids()
    for n, rec in enumerate(read_records(path)):
        try:
            if not is_dialog(rec):
                raise _Bad("turns", "no list of turns (a multi-turn record: {\"image\": ..., \"turns\": [...]})")
            turns = []
            for k, t in enumerate(rec["turns"]):
                where = f"turns[{k}]"
                if not isinstance(t, dict):
                    raise _Bad(where, f"not an object (a {type(t).__name__})")
                q = t.get("question")
                if not isinstance(q, str) or not q.strip():
                    raise _Bad(f"{where}.question", "no question text")
                _no_placeholder(q, f"{where}.question")
                try:
                    if any(t.get(k2) is not None for k2 in ("bbox", "box_xyxy", "bbox_xyxy")):
                        turns.append(DialogTurn(q.strip(), box=_box(t, bbox_format)))
                    else:
                        turns.append(DialogTurn(q.strip(), answers=_answers(t, True)))
                except _Bad as exc:
                    raise _Bad(f"{where}.{exc.field}", exc.message) from None
            if not turns:
                raise _Bad("turns", "empty: a dialog needs at least one turn")
            image = _image(rec, root, f"{path}: record {n}", image_template)
            w, h = _size(rec, ("image_width", "width")), _size(rec, ("image_height", "height"))
            rid = _record_id(rec, ("id", "question_id", "dialog_id"))
            ids.check(rid, n, _first_key(rec, ("id", "question_id", "dialog_id")))
        except _Bad as exc:
            _collect(path, problems, n, exc)
            continue
        out.append(DialogSample(rid or str(n), image, turns, w, h, n))
        if limit is not None and len(out) >= limit:
            break
    return out


def turn_batches(samples: list[DialogSample], batch: int) -> list[list[DialogSample]]:
    """Batches of dialogs with the same number of turns (a batch continues one KV cache), in
    file order within each length."""
    by_len: dict[int, list[DialogSample]] = {}
    for s in samples:
        by_len.setdefault(len(s.turns), []).append(s)
    return [group[i:i + batch] for group in by_len.values() for i in range(0, len(group), batch)]


def run_dialogs(adapter, pipeline, chunk: list[DialogSample], images: list, mode: str, max_new_tokens: int,
                seed: int | None) -> list[Any]:
    """One batch of dialogs in `mode`: a RunReport per turn (answers per sample)."""
    from ..adapters.conversation import Conversation

    conv = Conversation()
    reports = []
    n_turns = len(chunk[0].turns)
    for t in range(n_turns):
        questions = [s.turns[t].question for s in chunk]
        if mode == "reuse":
            rep = adapter.generate(pipeline, images, questions, max_new_tokens=max_new_tokens, seed=seed,
                                   conversation=conv)
        else:  # prune again: a fresh run over the same token ids as `reuse` would feed
            history = None
            if t:
                conv.history = [h + n for h, n in zip(conv.history, conv.next_ids(adapter, questions))]
                history = conv.history
            first = [s.turns[0].question for s in chunk]
            rep = adapter.generate(pipeline, images, first, max_new_tokens=max_new_tokens, seed=seed,
                                   prompt_ids=history)
            conv.answers = [list(a) for a in rep.new_tokens]
            if not conv.history:
                conv.history = [[] for _ in chunk]
        reports.append(rep)
    return reports
