"""How the shapes world talks about a scene: attribute descriptions, referring expressions that
pick out exactly one object, and `resolve()`, which reads an expression back independently
of the generator."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .scene import (
    COLORS,
    PLURAL,
    REGION_MARGIN,
    REGIONS,
    SHAPES,
    SIDES,
    SIZES,
    SUPERLATIVE_MARGIN,
    SUPERLATIVES,
    Obj,
    Scene,
)


@dataclass(frozen=True)
class Desc:
    """An attribute description: any of size, colour, shape (None = unconstrained)."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def phrase(self, plural: bool = False) -> str:
        noun = self.shape or "shape"
        words = [w for w in (self.size, self.color) if w] + [PLURAL[noun] if plural else noun]
        return " ".join(words)

    def select(self, scene: Scene) -> list[int]:
        return scene.matches(self.color, self.shape, self.size)


def _descs_of(o: Obj, exclude: str | None = None) -> list[Desc]:
    """Every description that `o` satisfies, optionally without one attribute."""
    out = []
    for s in (None, o.size):
        for c in (None, o.color):
            for h in (None, o.shape):
                d = Desc(s, c, h)
                if exclude and getattr(d, exclude) is not None:
                    continue
                out.append(d)
    return out


def _extreme(scene: Scene, ids: list[int], axis: int, sign: int) -> int | None:
    """The object of `ids` that is clearly the most extreme along axis (None if tied)."""
    if len(ids) < 2:
        return None
    vals = sorted((sign * scene.objects[i].center[axis], i) for i in ids)
    return vals[0][1] if vals[1][0] - vals[0][0] >= SUPERLATIVE_MARGIN else None


def _quadrant(scene: Scene, i: int) -> tuple[int, int] | None:
    cx, cy = scene.objects[i].center
    mid = scene.size / 2
    if abs(cx - mid) < REGION_MARGIN or abs(cy - mid) < REGION_MARGIN:
        return None
    return int(cx > mid), int(cy > mid)


def referring_expressions(scene: Scene, target: int) -> list[tuple[str, str, Desc]]:
    """Every (kind, expression, description) that refers to `target` and to no other object."""
    o = scene.objects[target]
    out: list[tuple[str, str, Desc]] = []
    for d in _descs_of(o):
        ids = d.select(scene)
        if ids == [target]:
            out.append(("attribute", "the " + d.phrase(), d))
            continue
        for word, (axis, sign) in SUPERLATIVES.items():
            if _extreme(scene, ids, axis, sign) == target:
                out.append(("superlative", f"the {word} {d.phrase()}", d))
        if len(ids) == 2:
            for word, (axis, sign) in SIDES.items():
                if _extreme(scene, ids, axis, sign) == target:
                    out.append(("side", f"the {d.phrase()} on the {word}", d))
        quads = [_quadrant(scene, i) for i in ids]
        if None not in quads and quads.count(quads[ids.index(target)]) == 1:
            name = [k for k, v in REGIONS.items() if v == quads[ids.index(target)]][0]
            out.append(("region", f"the {d.phrase()} in the {name}", d))
    return out


_EXPR = re.compile(
    r"^the (?:(?P<sup>leftmost|rightmost|topmost|bottommost) )?(?P<desc>[a-z ]+?)"
    r"(?: on the (?P<side>left|right|top|bottom)| in the (?P<region>(?:top|bottom) (?:left|right)))?$")


def parse_desc(words: str) -> Desc | None:
    toks = words.split()
    if not toks:
        return None
    noun = toks[-1]
    if noun not in SHAPES and noun != "shape":
        return None
    size = color = None
    for t in toks[:-1]:
        if t in SIZES and size is None and color is None:
            size = t
        elif t in COLORS and color is None:
            color = t
        else:
            return None
    return Desc(size, color, None if noun == "shape" else noun)


def resolve(scene: Scene, expression: str) -> list[int]:
    """Objects that an expression of this world's grammar refers to (independent of the generator)."""
    m = _EXPR.match(expression.strip().lower())
    if not m:
        return []
    d = parse_desc(m["desc"])
    if d is None:
        return []
    ids = d.select(scene)
    if m["sup"]:
        best = _extreme(scene, ids, *SUPERLATIVES[m["sup"]])
        return [] if best is None else [best]
    if m["side"]:
        if len(ids) != 2:
            return []
        best = _extreme(scene, ids, *SIDES[m["side"]])
        return [] if best is None else [best]
    if m["region"]:
        want = REGIONS[m["region"]]
        return [i for i in ids if _quadrant(scene, i) == want]
    return ids
