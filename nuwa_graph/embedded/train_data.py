"""The trainer's batches, a function of (seed, scene indices): conversations for the LLM, patch
labels for the vision pre-training, and the scene curriculum."""

from __future__ import annotations

import numpy as np
import torch

from ..world import shapes as W
from ..world.boxes import box_to_tokens
from .build import pixel_values
from .train_config import TrainConfig


class Vocab:
    """Fast word -> id for the world's own (space-separated) text; checked against the tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.v = tok.get_vocab()
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.image = self.v["<image>"]

    def ids(self, text: str) -> list[int]:
        return [self.v[w] for w in text.lower().split()]


def _turns(seed: int, index: int, cfg: TrainConfig):
    """(scene, [(question, answer)]) for training scene `index`, turns in a seeded random order."""
    scene, g_items, v_items = W.samples(seed, index, cfg.grounding_turns, cfg.vqa_turns)
    turns = [(g.question, box_to_tokens(g.box, scene.size, scene.size)) for g in g_items]
    turns += [(v.question, v.answer) for v in v_items]
    rng = np.random.default_rng([seed, index, 3])
    for _ in range(cfg.point_turns):
        p = W.point_item(scene, rng)
        if p is not None:
            turns.append((p.question, p.answer))
    order = np.random.default_rng([seed, index, 2]).permutation(len(turns))
    return scene, [turns[int(k)] for k in order]


def max_objects_at(step: int, cfg: TrainConfig) -> int:
    """The curriculum: the most objects a training scene of LM step `step` may have."""
    frac = step / cfg.lm_steps
    for cap, until in cfg.curriculum:
        if frac < float(until):
            return int(cap)
    return W.MAX_OBJECTS


def next_indices(seed: int, start: int, n: int, max_objects: int) -> tuple[list[int], int]:
    """The next n training scene indices from `start` with at most `max_objects` objects; new start."""
    out: list[int] = []
    i = start
    while len(out) < n:
        if max_objects >= W.MAX_OBJECTS or len(W.make_scene(seed, i).objects) <= max_objects:
            out.append(i)
        i += 1
    return out, i


def lm_batch(seed: int, indices: list[int], cfg: TrainConfig, vocab: Vocab, grid: int):
    """Token ids, loss weights (answers 1, questions cfg.question_weight, rest 0), pixel values."""
    n_img = grid * grid
    seqs, wts, images = [], [], []
    for idx in indices:
        scene, turns = _turns(seed, idx, cfg)
        images.append(scene.render()[0])
        ids = [vocab.bos] + vocab.ids("user :") + [vocab.image] * n_img
        w = [0.0] * len(ids)
        for k, (q, a) in enumerate(turns):
            if k:
                ids += vocab.ids("user :")
                w += [0.0, 0.0]
            q_ids = vocab.ids(q) + vocab.ids("assistant :")
            a_ids = vocab.ids(a) + [vocab.eos]
            ids += q_ids + a_ids
            w += [cfg.question_weight] * len(q_ids) + [1.0] * len(a_ids)
        seqs.append(ids)
        wts.append(w)
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), vocab.pad, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    weights = torch.zeros((B, L))
    for b, (s, w) in enumerate(zip(seqs, wts)):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        weights[b, : len(w)] = torch.tensor(w)
    return {"input_ids": input_ids, "attention_mask": mask, "weights": weights, "pixel_values": pixel_values(images)}


N_CLS_OUT = len(W.COLOR_NAMES) + len(W.SHAPES) + len(W.COLOR_NAMES) * len(W.SHAPES) + (W.MAX_OBJECTS + 1)


def vision_batch(seed: int, indices: list[int], grid: int):
    imgs, labels, attrs, counts = [], [], [], []
    for idx in indices:
        scene = W.make_scene(seed, idx)
        imgs.append(scene.render()[0])
        labels.append(scene.patch_labels().reshape(-1))
        a = np.zeros(N_CLS_OUT - (W.MAX_OBJECTS + 1), dtype=np.float32)
        for o in scene.objects:
            c, s = W.COLOR_NAMES.index(o.color), W.SHAPES.index(o.shape)
            a[c] = 1
            a[len(W.COLOR_NAMES) + s] = 1
            a[len(W.COLOR_NAMES) + len(W.SHAPES) + c * len(W.SHAPES) + s] = 1
        attrs.append(a)
        counts.append(len(scene.objects))
    return (pixel_values(imgs), torch.from_numpy(np.stack(labels)).long(), torch.from_numpy(np.stack(attrs)),
            torch.tensor(counts))
