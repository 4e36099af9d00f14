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

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .boxes import BINS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 210, 40),
    "purple": (145, 60, 185),
    "orange": (245, 140, 30),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = ["small", "large"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "shape": "shapes"}
NUMBERS = [str(i) for i in range(7)]

IMAGE_SIZE = 168          # 12 x 12 patches of 14 px
PATCH = 14
SIZE_RANGE = {"small": (22, 29), "large": (38, 51)}   # side of the drawing box, pixels
MIN_OBJECTS, MAX_OBJECTS = 2, 6
GAP = 4                   # minimum empty pixels between two object boxes
SUPERLATIVE_MARGIN = 10   # the extreme object must beat the runner-up by this many pixels
REGION_MARGIN = 6         # a centre this close to a midline is in no quadrant
RELATION_MARGIN = 12      # 'left of' / 'above' need this much separation of centres

SUPERLATIVES = {  # word -> (axis, sign): the target minimises sign * centre[axis]
    "leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1),
}
SIDES = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}  # 'the red circle on the left'
REGIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}

GROUNDING_TEMPLATE = "where is {expression} ?"


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]        # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def as_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "size": self.size, "box": list(self.box)}


@dataclass
class Scene:
    seed: int
    index: int
    size: int
    objects: list[Obj]
    background: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    # --- pixels ----------------------------------------------------------------------------
    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 image (H, W, 3), object map int8 (H, W): 0 = background, k = object k-1)."""
        if "render" not in self._cache:
            self._cache["render"] = _render(self)
        return self._cache["render"]

    def image(self) -> Image.Image:
        return Image.fromarray(self.render()[0])

    def patch_coverage(self, patch: int = PATCH) -> np.ndarray:
        """(n_objects, rows, cols): fraction of each patch covered by each object."""
        if ("cov", patch) not in self._cache:
            _, omap = self.render()
            g = self.size // patch
            m = omap[: g * patch, : g * patch].reshape(g, patch, g, patch)
            cov = np.stack([(m == k + 1).sum(axis=(1, 3)) for k in range(len(self.objects))]).astype(np.float32)
            self._cache[("cov", patch)] = cov / (patch * patch)
        return self._cache[("cov", patch)]

    def patch_labels(self, patch: int = PATCH) -> np.ndarray:
        """(rows, cols) int64 class per patch: 0 background, else 1 + object class (see `object_class`)."""
        cov = self.patch_coverage(patch)
        best = cov.argmax(0)
        lab = np.array([object_class(o) + 1 for o in self.objects])[best]
        lab[cov.max(0) < 0.2] = 0
        return lab

    def matches(self, color=None, shape=None, size=None) -> list[int]:
        return [i for i, o in enumerate(self.objects)
                if (color is None or o.color == color) and (shape is None or o.shape == shape)
                and (size is None or o.size == size)]

    def as_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index, "size": self.size,
                "objects": [o.as_dict() for o in self.objects]}


N_OBJECT_CLASSES = len(COLOR_NAMES) * len(SHAPES) * len(SIZES)


def object_class(o: Obj) -> int:
    return (COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)) * len(SIZES) + SIZES.index(o.size)


# --- generation ------------------------------------------------------------------------------
def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def make_scene(seed: int, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Scene number `index` of the world with this seed (pure function of its arguments)."""
    rng = _rng(seed, index, 0)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    scale = size / IMAGE_SIZE
    objects: list[Obj] = []
    for _ in range(n):
        for _attempt in range(60):
            sz = SIZES[int(rng.integers(2))]
            lo, hi = SIZE_RANGE[sz]
            side = int(round(rng.integers(lo, hi) * scale))
            x0 = int(rng.integers(2, size - side - 1))
            y0 = int(rng.integers(2, size - side - 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box) for o in objects):
                color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                base = np.array(COLORS[color]) + rng.integers(-18, 19, size=3)
                objects.append(Obj(color, shape, sz, box, tuple(int(v) for v in np.clip(base, 0, 255))))
                break
    bg = {
        "base": int(rng.integers(95, 170)),
        "tint": [int(v) for v in rng.integers(-12, 13, size=3)],
        "texture": ["noise", "stripes", "checker", "blotches"][int(rng.integers(4))],
        "period": int(rng.integers(6, 22)),
        "angle": float(rng.uniform(0, np.pi)),
        "amp": int(rng.integers(6, 18)),
        "tex_seed": int(rng.integers(2**31)),
    }
    return Scene(seed, index, size, objects, bg)


def _apart(a, b) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _background(bg: dict, size: int) -> np.ndarray:
    rng = np.random.default_rng(bg["tex_seed"])
    kind, p, amp = bg["texture"], bg["period"], bg["amp"]
    ax = np.arange(size, dtype=np.float32)
    if kind == "noise":
        tex = rng.standard_normal((size, size), dtype=np.float32) * (amp / 2)
    elif kind == "stripes":
        u = ax[None, :] * np.float32(np.cos(bg["angle"])) + ax[:, None] * np.float32(np.sin(bg["angle"]))
        tex = amp * np.sin(u * np.float32(2 * np.pi / p))
    elif kind == "checker":
        cells = (ax // p).astype(np.int32)
        tex = (amp * (((cells[None, :] + cells[:, None]) % 2) * 2 - 1)).astype(np.float32)
    else:  # blotches: smooth low-frequency noise
        g = rng.normal(0, amp, (size // p + 2, size // p + 2)).astype(np.float32)
        tex = np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR))
    tex = tex + rng.standard_normal((size, size), dtype=np.float32) * 3
    base = np.float32(bg["base"]) + np.array(bg["tint"], dtype=np.float32)
    img = base[None, None, :] + tex[:, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_xy(shape: str, box) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    return None


def _render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    img = Image.fromarray(_background(scene.background, scene.size))
    omap = Image.new("L", (scene.size, scene.size), 0)
    d, dm = ImageDraw.Draw(img), ImageDraw.Draw(omap)
    for k, o in enumerate(scene.objects):
        box = (o.box[0], o.box[1], o.box[2] - 1, o.box[3] - 1)
        for draw, fill in ((d, o.rgb), (dm, k + 1)):
            if o.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif o.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon(_shape_xy(o.shape, o.box), fill=fill)
    return np.asarray(img, dtype=np.uint8).copy(), np.asarray(omap, dtype=np.int8).copy()


# --- descriptions ----------------------------------------------------------------------------
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


# --- samples -----------------------------------------------------------------------------------
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
    items = []
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


def vocabulary() -> list[str]:
    """Every word the world's questions, expressions and answers use (sorted, lower case)."""
    words = set(COLOR_NAMES) | set(SHAPES) | set(SIZES) | set(PLURAL.values()) | {"shape"} | set(NUMBERS)
    words |= set(SUPERLATIVES) | {w for k in list(SIDES) + list(REGIONS) + list(RELATIONS) for w in k.split()}
    words |= set("the on in where is what color size how many are there a yes no ?".split())
    words |= {"user", ":", "assistant"}
    return sorted(words)
