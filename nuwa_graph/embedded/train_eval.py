"""The trainer's own held-out evaluation (world seed + offset) and the fixed check slice of the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..apps.data import exact_match
from ..world import shapes as W
from ..world.boxes import iou, parse_box
from .build import load_embedded, pixel_values
from .train_config import EVAL_WORLD_OFFSET


def eval_set(seed: int, n: int):
    """n held-out grounding and n VQA samples: (image, question, truth, kind) from world seed + offset."""
    ws = seed + EVAL_WORLD_OFFSET
    g: list[tuple] = []
    v: list[tuple] = []
    i = 0
    while len(g) < n or len(v) < n:
        scene, gi, vi = W.samples(ws, i, 1, 1)
        img = scene.render()[0]
        if gi and len(g) < n:
            g.append((img, gi[0].question, gi[0].box, gi[0].kind))
        if vi and len(v) < n:
            v.append((img, vi[0].question, vi[0].answer, vi[0].kind))
        i += 1
    return g, v


@torch.no_grad()
def generate_answers(model, tok, items, max_new_tokens: int, batch: int = 64) -> list[str]:
    from .build import prompt
    out = []
    for s in range(0, len(items), batch):
        chunk = items[s: s + batch]
        enc = tok([prompt(q) for _, q, _, _ in chunk], return_tensors="pt", padding=True)
        enc["input_ids"] = _expand_image(enc["input_ids"], tok, model.config.image_seq_length)
        enc["attention_mask"] = (enc["input_ids"] != tok.pad_token_id).long()
        gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             pixel_values=pixel_values([img for img, _, _, _ in chunk]),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def _expand_image(ids: torch.Tensor, tok, n: int) -> torch.Tensor:
    """Left-padded ids with one <image> -> n <image> placeholders (what LlavaProcessor does)."""
    image = tok.convert_tokens_to_ids("<image>")
    rows = []
    for r in ids.tolist():
        r = [t for t in r if t != tok.pad_token_id]
        k = r.index(image)
        rows.append(r[:k] + [image] * n + r[k + 1:])
    L = max(len(r) for r in rows)
    return torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in rows])


def evaluate(model, tok, g_items, v_items) -> dict:
    """Grounding Acc@0.5 (+ mean IoU, parse rate) and VQA exact match, overall and per kind."""
    was_training = model.training
    model.eval()
    res: dict = {}
    if g_items:
        preds = generate_answers(model, tok, g_items, 5)
        ious = [iou(parse_box(p, img.shape[1], img.shape[0]), box) for p, (img, _, box, _) in zip(preds, g_items)]
        res["grounding_acc50"] = float(np.mean([x >= 0.5 for x in ious]))
        res["grounding_miou"] = float(np.mean(ious))
        res["grounding_parsed"] = float(np.mean([parse_box(p, img.shape[1], img.shape[0]) is not None
                                                 for p, (img, *_) in zip(preds, g_items)]))
        res["grounding_by_kind"] = _by_kind([x >= 0.5 for x in ious], [k for *_, k in g_items])
        res["grounding_examples"] = [(q, p) for (_, q, _, _), p in list(zip(g_items, preds))[:3]]
    if v_items:
        preds = generate_answers(model, tok, v_items, 2)
        ok = [exact_match(p, [a]) for p, (_, _, a, _) in zip(preds, v_items)]
        res["vqa_em"] = float(np.mean(ok))
        res["vqa_by_kind"] = _by_kind(ok, [k for *_, k in v_items])
        res["vqa_examples"] = [(q, p) for (_, q, _, _), p in list(zip(v_items, preds))[:3]]
    model.train(was_training)
    return res


SLICE_N = 100  # the fixed check slice: the first 100 grounding and 100 VQA samples of the held-out eval set


def slice_accuracy(path: str | Path | None = None, seed: int = 0, n: int = SLICE_N) -> dict:
    """Grounding Acc@0.5 and VQA EM of a saved model (default: the shipped weights) on the fixed
    slice; docs/embedded.md records the shipped model's values and a test holds it to them."""
    model, proc = load_embedded(path)
    g, v = eval_set(seed, n)
    r = evaluate(model, proc.tokenizer, g, v)
    return {"grounding_acc50": r["grounding_acc50"], "vqa_em": r["vqa_em"], "n": n}


def _by_kind(ok, kinds) -> dict:
    out: dict = {}
    for o, k in zip(ok, kinds):
        out.setdefault(str(k), []).append(float(o))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(out.items())}
