"""The families' geometries: how LLaVA-NeXT / OneVision (AnyRes: base grid, tiles on a canvas
cut by unpad, newline slots), InternVL (tiles + thumbnail) and a flat sequence lay their image
tokens out as parts of a `Geometry` (geometry.py says what parts, crops and ids are)."""

from __future__ import annotations

import torch

from .geometry import Crop, Geometry, Part


def unpad_window(size_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the canvas cells LLaVA-NeXT keeps for an image of `size_hw`
    pixels resized and padded onto a canvas of `canvas_hw` cells (`unpad_image`: the padding
    the image processor added is cut off, evenly on both sides)."""
    h0, w0 = size_hw
    ch, cw = canvas_hw
    if w0 / h0 > cw / ch:
        new_h = int(round(h0 * (cw / w0), 7))
        pad = (ch - new_h) // 2
        return pad, 0, ch - 2 * pad, cw
    new_w = int(round(w0 * (ch / h0), 7))
    pad = (cw - new_w) // 2
    return 0, pad, ch, cw - 2 * pad


def anyres_geometry(base: tuple[int, int], tiles_hw: tuple[int, int], size_hw: tuple[int, int] | None,
                    image_start: int = 0, newline: bool = True, resized: tuple[int, int] | None = None) -> Geometry:
    """LLaVA-NeXT / OneVision AnyRes: the base crop's grid first, then the tiles (tiles_hw =
    tile rows x tile cols, crops 1.. row-major) stitched onto one canvas, cut to the unpad
    window of an image of `size_hw` pixels (None: no unpad), one newline slot after every
    canvas row. With no tiles (tiles_hw (0, 0)) the base grid is followed by one newline.
    `resized` (OneVision's anyres_max_N on a large canvas): the cut canvas was interpolated to
    that shape in LLM space, so its tokens are mixtures of patches: a grid with no crop (vision
    signals of the tiles have no stream ids there)."""
    h, w = base
    parts = [Part("grid", 0, (h, w), crops=(Crop(0, (h, w)),))]
    if tiles_hw[0] * tiles_hw[1] == 0:
        if newline:
            parts.append(Part("newline", h * w, (1, 1)))
        return Geometry(image_start=image_start, parts=parts)
    th, tw = tiles_hw
    canvas = (th * h, tw * w)
    top, left, rows, cols = unpad_window(size_hw, canvas) if size_hw is not None else (0, 0, *canvas)
    stride = cols + 1 if newline else cols
    crops = tuple(Crop(1 + i * tw + j, (h, w), (i * h, j * w)) for i in range(th) for j in range(tw))
    if resized is not None and tuple(resized) != (rows, cols):
        rows, cols = resized
        stride = cols + 1 if newline else cols
        crops, top, left = (), 0, 0
    parts.append(Part("tiles", h * w, (rows, cols), stride, crops, (top, left)))
    if newline:
        parts.append(Part("newline", h * w + cols, (rows, 1), stride))
    geom = Geometry(image_start=image_start, parts=parts)
    geom._views = [("base", parts[0].stream_ids().reshape(h, w)), ("tiles", parts[1].stream_ids().reshape(rows, cols))]
    return geom


def tiled_geometry(tile: tuple[int, int], n_tiles: int, thumbnail: bool, image_start: int = 0,
                   layout: tuple[int, int] | None = None) -> Geometry:
    """InternVL: `n_tiles` tiles of `tile` tokens, each its own part in raster order, then the
    thumbnail (a downscaled whole image) last; one tile and no thumbnail is one grid. `layout`
    (tile rows, tile cols) says how the tiles cover the image (for pictures)."""
    h, w = tile
    if n_tiles == 1 and not thumbnail:
        return Geometry((h, w), image_start)
    parts = [Part("tile", i * h * w, (h, w), crops=(Crop(i, (h, w)),)) for i in range(n_tiles)]
    if thumbnail:
        parts.append(Part("thumbnail", n_tiles * h * w, (h, w), crops=(Crop(n_tiles, (h, w)),)))
    geom = Geometry(image_start=image_start, parts=parts)
    if layout is not None and layout[0] * layout[1] == n_tiles:  # the tiles cover the image row-major
        tiles = torch.arange(n_tiles * h * w, device="cpu").reshape(layout[0], layout[1], h, w).permute(0, 2, 1, 3)
        geom._views = [("tiles", tiles.reshape(layout[0] * h, layout[1] * w))]
        if thumbnail:
            geom._views.append(("thumbnail", parts[-1].stream_ids().reshape(h, w)))
    return geom


def flat_geometry(n: int, image_start: int = 0) -> Geometry:
    """n tokens of unknown layout: LLM-side methods run, spatial and vision nodes refuse."""
    return Geometry(image_start=image_start, parts=(Part("sequence", 0, (1, n)),))
