"""A shapes-world scene: the vocabulary of colours, shapes and sizes, the objects, and the
scene itself, drawn as a pure function of (seed, index)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

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
                rgb = cast("tuple[int, int, int]", tuple(int(v) for v in np.clip(base, 0, 255)))
                objects.append(Obj(color, shape, sz, box, rgb))
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
        tex = np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR))
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
                corners = _shape_xy(o.shape, o.box)
                assert corners is not None  # every shape but circle and square has corners
                draw.polygon(corners, fill=fill)
    return np.asarray(img, dtype=np.uint8).copy(), np.asarray(omap, dtype=np.int8).copy()
