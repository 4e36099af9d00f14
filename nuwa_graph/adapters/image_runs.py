"""Where a prompt's images are: the batch's images per prompt (`flatten_images`) and each
image's run of placeholder tokens in a sample (`image_runs`); docs/multi-image.md."""

from __future__ import annotations

import torch

from ..errors import RunError


def flatten_images(images: list) -> tuple[list, list[int] | None]:
    """A batch's images as one list in prompt order, and how many each prompt has (None: one
    image per prompt, the batch as given)."""
    if not any(isinstance(im, (list, tuple)) for im in images):
        return list(images), None
    counts = [len(im) if isinstance(im, (list, tuple)) else 1 for im in images]
    flat = [x for im in images for x in (im if isinstance(im, (list, tuple)) else [im])]
    return flat, counts


def image_runs(is_image: torch.Tensor, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[(start, end), ...] of each image's placeholder run in a sample's ids (`is_image`: which
    ids are image placeholders): each maximal run, cut by `counts` (tokens per image) where
    images touch (a tokenizer that puts nothing between two images' placeholders)."""
    is_img = is_image.long()
    if not bool(is_img.any()):
        raise RunError("the prompt has no image placeholder token; the processor did not insert the image")
    edges = torch.diff(torch.cat([is_img.new_zeros(1), is_img, is_img.new_zeros(1)]))
    runs = list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))
    if counts is None or len(counts) == len(runs):
        return runs
    cut, left = [], list(counts)
    for s, e in runs:
        while s < e and left and s + left[0] <= e:
            cut.append((s, s + left[0]))
            s += left.pop(0)
        if s != e:
            break
    if left or len(cut) != len(counts):
        raise RunError(f"the prompt's image placeholders ({sum(e - s for s, e in runs)} tokens in {len(runs)} "
                       f"runs) do not match its {len(counts)} images of {counts} tokens")
    return cut
