"""The shapes world: procedural scenes of coloured shapes, deterministic by seed.

A scene is a textured grey background with 2-6 non-overlapping shapes. Every object has a
colour, a shape, a size class and a pixel box. From a scene the world draws

- grounding samples: a referring expression that picks out exactly one object (attribute
  words, superlatives such as 'the leftmost red circle', regions such as 'the shape in the
  bottom right') and its box;
- VQA samples: colour, shape, size, count, existence and relative-position questions with a
  one-word answer.

Everything is a pure function of (seed, index): `make_scene(seed, i)` is the same scene in
every process and on every machine, so a split is reproducible without storing it.
`resolve()` re-reads an expression against a scene independently of the generator; the
tests use it to check that every expression refers to its target only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boxes import BINS
from .language import Desc, parse_desc, referring_expressions, resolve
from .scene import (
    COLOR_NAMES,
    COLORS,
    GAP,
    GROUNDING_TEMPLATE,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MIN_OBJECTS,
    N_OBJECT_CLASSES,
    NUMBERS,
    PATCH,
    PLURAL,
    REGION_MARGIN,
    REGIONS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIDES,
    SIZE_RANGE,
    SIZES,
    SUPERLATIVE_MARGIN,
    SUPERLATIVES,
    Obj,
    Scene,
    _rng,
    make_scene,
    object_class,
)


@dataclass
class GroundingItem:
    expression: str
    kind: str
    target: int
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 pixels

    @property
    def question(self) -> str:
        return GROUNDING_TEMPLATE.format(expression=self.expression)


@dataclass
class VQAItem:
    question: str
    answer: str
    kind: str
    targets: list[int]   # objects the question is about (attention targets); may be empty


def grounding_items(scene: Scene, n: int, rng: np.random.Generator, spatial_bias: float = 0.6) -> list[GroundingItem]:
    """Up to n grounding items for distinct targets where possible; spatial phrasings are preferred."""
    order = list(rng.permutation(len(scene.objects)))
    items: list[GroundingItem] = []
    for k in range(n):
        t = int(order[k % len(order)])
        exprs = referring_expressions(scene, t)
        if not exprs:
            continue
        spatial = [e for e in exprs if e[0] != "attribute"]
        pool = spatial if spatial and rng.random() < spatial_bias else exprs
        kind, expr, _ = pool[int(rng.integers(len(pool)))]
        items.append(GroundingItem(expr, kind, t, scene.objects[t].box))
    return items


def _unique_phrase(scene: Scene, i: int, rng, exclude: str | None = None, spatial: bool = True) -> str | None:
    """A noun phrase ('the red circle', 'the leftmost square') naming object i only."""
    cands = []
    for kind, expr, d in referring_expressions(scene, i):
        if exclude and getattr(d, exclude) is not None:
            continue
        if kind != "attribute" and not spatial:
            continue
        cands.append(expr)
    return cands[int(rng.integers(len(cands)))] if cands else None


VQA_KINDS = ["color", "shape", "size", "count", "exist", "relation"]


def vqa_item(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> VQAItem | None:
    kind = kind or VQA_KINDS[int(rng.integers(len(VQA_KINDS)))]
    objs = scene.objects
    if kind in ("color", "shape", "size"):
        for i in rng.permutation(len(objs)):
            phrase = _unique_phrase(scene, int(i), rng, exclude=kind)
            if phrase:
                ans = getattr(objs[int(i)], kind)
                word = "color" if kind == "color" else kind
                return VQAItem(f"what {word} is {phrase} ?", ans, kind, [int(i)])
        return None
    if kind == "count":
        r = rng.random()
        o = objs[int(rng.integers(len(objs)))]
        if r < 0.15:
            d = Desc()
        elif r < 0.45:
            d = Desc(color=o.color)
        elif r < 0.75:
            d = Desc(shape=o.shape)
        elif r < 0.9:
            d = Desc(color=o.color, shape=o.shape)
        else:  # possibly absent combination
            d = Desc(color=COLOR_NAMES[int(rng.integers(6))], shape=SHAPES[int(rng.integers(4))])
        ids = d.select(scene)
        return VQAItem(f"how many {d.phrase(plural=True)} are there ?", str(len(ids)), kind, ids)
    if kind == "exist":
        want_yes = rng.random() < 0.5
        if want_yes:
            o = objs[int(rng.integers(len(objs)))]
            d = Desc(o.size if rng.random() < 0.3 else None, o.color, o.shape)
        else:
            for _ in range(20):
                d = Desc(None, COLOR_NAMES[int(rng.integers(6))], SHAPES[int(rng.integers(4))])
                if not d.select(scene):
                    break
        ids = d.select(scene)
        return VQAItem(f"is there a {d.phrase()} ?", "yes" if ids else "no", kind, ids)
    if kind == "relation":
        pairs = [(a, b) for a in range(len(objs)) for b in range(len(objs)) if a != b]
        for j in rng.permutation(len(pairs)):
            a, b = pairs[int(j)]
            word = list(RELATIONS)[int(rng.integers(4))]
            axis, sign = RELATIONS[word]
            delta = objs[b].center[axis] - objs[a].center[axis]   # > 0: b is right of / below a
            if abs(delta) < RELATION_MARGIN:
                continue
            pa = _unique_phrase(scene, a, rng, spatial=False)
            pb = _unique_phrase(scene, b, rng, spatial=False)
            if not pa or not pb:
                continue
            yes = (delta * -sign) > 0  # 'a left of b' (sign -1): b.x - a.x > 0
            return VQAItem(f"is {pa} {word} {pb} ?", "yes" if yes else "no", kind, [a, b])
        return None
    raise ValueError(f"unknown VQA kind {kind!r}")


def vqa_items(scene: Scene, n: int, rng: np.random.Generator) -> list[VQAItem]:
    items: list[VQAItem] = []
    kinds = [str(k) for k in rng.permutation(VQA_KINDS)]
    for k in range(n * 3):
        if len(items) == n:
            break
        it = vqa_item(scene, rng, kinds[k % len(kinds)])
        if it is not None:
            items.append(it)
    return items


POINT_TEMPLATE = "what is in {cell} ?"


@dataclass
class PointItem:
    """A training-only pointing question: which object lies under one coordinate-token cell."""

    question: str
    answer: str          # '{size} {color} {shape}' of the object under the cell
    target: int
    cell: tuple[int, int]   # (column bin, row bin) of the <xA> <yB> tokens


def point_item(scene: Scene, rng: np.random.Generator, bins: int = BINS) -> PointItem | None:
    """'what is in <xA> <yB> ?' -> 'large red circle', or None if no object has a clean cell.

    Only cells lying wholly inside one object's box, whose centre pixel is on that object,
    are asked about, so the answer is unique. Not used by `samples()` (held-out sets are
    unchanged); the embedded model's trainer mixes it in to help grounding through data.
    """
    _, omap = scene.render()
    step = scene.size / bins
    cands = []
    for k, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.box
        for cy in range(bins):
            for cx in range(bins):
                if not (x0 <= cx * step and (cx + 1) * step <= x1 and y0 <= cy * step and (cy + 1) * step <= y1):
                    continue
                if omap[int((cy + 0.5) * step), int((cx + 0.5) * step)] == k + 1:
                    cands.append((k, cx, cy))
    if not cands:
        return None
    k, cx, cy = cands[int(rng.integers(len(cands)))]
    o = scene.objects[k]
    return PointItem(POINT_TEMPLATE.format(cell=f"<x{cx}> <y{cy}>"), f"{o.size} {o.color} {o.shape}", k, (cx, cy))


def samples(seed: int, index: int, n_grounding: int = 1, n_vqa: int = 1, size: int = IMAGE_SIZE):
    """(scene, grounding items, VQA items) for scene `index`; deterministic in (seed, index)."""
    scene = make_scene(seed, index, size)
    rng = _rng(seed, index, 1)
    return scene, grounding_items(scene, n_grounding, rng), vqa_items(scene, n_vqa, rng)


def dialog_items(seed: int, index: int, n_turns: int, size: int = IMAGE_SIZE) -> tuple[Scene, list[VQAItem]]:
    """(scene, up to n_turns VQA items of distinct kinds where possible) for a multi-turn
    dialog about scene `index`; its own random stream, so the single-question sets are
    unchanged."""
    scene = make_scene(seed, index, size)
    return scene, vqa_items(scene, n_turns, _rng(seed, index, 5))


def vocabulary() -> list[str]:
    """Every word the world's questions, expressions and answers use (sorted, lower case)."""
    words = set(COLOR_NAMES) | set(SHAPES) | set(SIZES) | set(PLURAL.values()) | {"shape"} | set(NUMBERS)
    words |= set(SUPERLATIVES) | {w for k in list(SIDES) + list(REGIONS) + list(RELATIONS) for w in k.split()}
    words |= set("the on in where is what color size how many are there a yes no ?".split())
    words |= {"user", ":", "assistant"}
    return sorted(words)


# The scene (scene.py) and its language (language.py) are importable from here too, where the
# trainer, the model builder and the tests look for them.
__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "Desc",
    "GAP",
    "GROUNDING_TEMPLATE",
    "GroundingItem",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "NUMBERS",
    "N_OBJECT_CLASSES",
    "Obj",
    "PATCH",
    "PLURAL",
    "POINT_TEMPLATE",
    "PointItem",
    "REGIONS",
    "REGION_MARGIN",
    "RELATIONS",
    "RELATION_MARGIN",
    "SHAPES",
    "SIDES",
    "SIZES",
    "SIZE_RANGE",
    "SUPERLATIVES",
    "SUPERLATIVE_MARGIN",
    "Scene",
    "VQAItem",
    "VQA_KINDS",
    "grounding_items",
    "make_scene",
    "object_class",
    "parse_desc",
    "point_item",
    "referring_expressions",
    "resolve",
    "samples",
    "vocabulary",
    "vqa_item",
    "vqa_items",
]
