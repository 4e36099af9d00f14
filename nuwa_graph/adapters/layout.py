"""The token layout of a pruned forward pass, as data and pure tensor functions.

A run's tokens go through three shapes: the processor's batch (`Encoded`), one sample's
prompt split into text runs and the visual blocks of its images (`SampleLayout`), the
visual tokens before the LLM (`Block`), and the layout each range of decoder layers sees
(`Segment`, with each image's run). Applying a Keep at `llm.K` makes a new Segment
(runs.py `keep_in_segment`) and gathers the hidden states into it (`gather_hidden`); the
attention masks of a segment come from `prefill_mask` / `decode_mask`. Nothing here
touches a model: families and the hook session call these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch

from ..context import Keep


@dataclass
class Encoded:
    """Processor output for a batch (left padded) plus family extras for the vision tower."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    vision_inputs: dict[str, Any]  # e.g. pixel_values
    prompts: list[str]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageRun:
    """One visual block of a prompt: its placeholder tokens, where they sit, their positions."""

    n: int  # placeholder tokens (the image's full block)
    start: int  # index of its first token in the sample's own sequence
    pos: torch.Tensor  # (P, n) original positions
    offset: int = 0  # its first stream id in the prompt's id space (earlier images' tokens)


@dataclass
class SampleLayout:
    """One sample's unpruned prompt (no padding): text runs and visual blocks alternating,
    `texts[0] | images[0] | texts[1] | ... | images[m-1] | texts[m]` (a text run may be empty).

    Positions are (P, n): P = 1 for 1-D RoPE, 3 for M-RoPE. Visual ids are one id space over
    every image (image i's stream ids start at `images[i].offset`; prompt_geometry.py);
    `id_blocks` (set from the prompt's geometry when it has several images) gives the image of
    every id, CLS and cut-away cells included.
    """

    texts: list[torch.Tensor]
    pos_texts: list[torch.Tensor]
    images: list[ImageRun]
    n_extra: int = 0  # generated tokens appended by extend() (they are not prompt tokens)
    id_blocks: torch.Tensor | None = None

    @classmethod
    def of(cls, ids: torch.Tensor, pos: torch.Tensor, runs: list[tuple[int, int]]) -> SampleLayout:
        """Split a sample's ids (n,) and positions (P, n) at the image runs [(start, end), ...]."""
        texts, pos_texts, images = [], [], []
        at = offset = 0
        for s, e in runs:
            texts.append(ids[at:s].cpu())
            pos_texts.append(pos[:, at:s])
            images.append(ImageRun(e - s, s, pos[:, s:e], offset))
            offset += e - s
            at = e
        texts.append(ids[at:].cpu())
        pos_texts.append(pos[:, at:])
        return cls(texts, pos_texts, images)

    @property
    def pre_ids(self) -> torch.Tensor:
        return self.texts[0]

    @property
    def post_ids(self) -> torch.Tensor:
        """Token ids after the last image."""
        return self.texts[-1]

    @property
    def pos_pre(self) -> torch.Tensor:
        return self.pos_texts[0]

    @property
    def pos_post(self) -> torch.Tensor:
        return self.pos_texts[-1]

    @property
    def n_image(self) -> int:
        """Image placeholder tokens of every image."""
        return sum(im.n for im in self.images)

    @property
    def image_start(self) -> int:
        return self.images[0].start

    @property
    def pos_image(self) -> torch.Tensor:
        """(P, n_image) original positions of every image's tokens, in id order."""
        if len(self.images) == 1:
            return self.images[0].pos
        return torch.cat([im.pos for im in self.images], dim=1)

    def image(self, i: int) -> SampleLayout:
        """Image i alone, with the text around it: what a family's position rule reads."""
        if len(self.images) == 1:
            return self
        return SampleLayout(self.texts[i:i + 2], self.pos_texts[i:i + 2], [self.images[i]])

    def text_start(self, i: int) -> torch.Tensor:
        """The original position of text run i's first token (P, 1); for an empty run, where it
        would start (one past the largest position of the image before it)."""
        if self.pos_texts[i].shape[1]:
            return self.pos_texts[i][:, :1]
        return self.images[i - 1].pos.max().reshape(1, 1).expand(self.pos_texts[i].shape[0], 1) + 1

    def blocks_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The image of each (host) id."""
        if self.id_blocks is None:
            return torch.zeros_like(ids, dtype=torch.long)
        return self.id_blocks[ids.long().clamp(0, self.id_blocks.numel() - 1)]

    def local_ids(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Image i's own ids of prompt ids (stream ids counted from its first token)."""
        return ids - self.images[i].offset if len(self.images) > 1 else ids

    def extend(self, extra: torch.Tensor) -> None:
        """Append generated tokens after the prompt (cache-free recompute)."""
        extra = extra.reshape(-1).to(self.post_ids)
        if extra.numel() == 0:
            return
        last = self.pos_post[:, -1:] if self.pos_post.shape[1] else self.images[-1].pos[:, -1:]
        self.pos_texts[-1] = torch.cat([self.pos_post, last + 1 + torch.arange(extra.numel())], dim=1)
        self.texts[-1] = torch.cat([self.post_ids, extra])
        self.n_extra += int(extra.numel())

    @property
    def prompt_post_ids(self) -> torch.Tensor:
        """Token ids after the last image that belong to the prompt (not the appended ones)."""
        return self.post_ids[: self.post_ids.numel() - self.n_extra]


Projected: TypeAlias = "torch.Tensor | list[torch.Tensor]"


@dataclass
class VisionOut:
    """What the family's vision pass hands to the base.

    `tokens[b]`: (n, d_vision) vision-space tokens of sample b in raster order (ids arange(n));
    `cls[b]`: the CLS row in vision space or None; `projected`: (B, n, d_llm) all tokens
    through the projector, computed in one batch exactly as the stock model does; or a
    function that computes them, so that a pipeline which replaces every token before the
    LLM reads them (a vision-space merger) never pays for projecting the full set.
    """

    tokens: list[torch.Tensor]
    projected: Projected | Callable[[], Projected]
    cls: list[torch.Tensor | None]

    def projected_rows(self, b: int) -> torch.Tensor:
        """Sample b's projected tokens (n, d_llm); the projector runs at most once per pass."""
        if callable(self.projected):
            self.projected = self.projected()
        return self.projected[b]


@dataclass
class Block:
    """The image block of one sample before the LLM: ids, LLM-space rows, positions."""

    ids: torch.Tensor
    rows: torch.Tensor  # (k, d_llm)
    positions: torch.Tensor | None = None  # (P, k) absolute, None = contiguous
    text_follows: str = "compact"
    dev_ids: torch.Tensor | None = None  # `ids` on the rows' device (None: not made there yet)


@dataclass
class Segment:
    """The token layout seen by decoder layers [start, next segment's start).

    A segment made by a Keep at llm.K also says how to build its hidden states from the
    previous segment's: `gather[b, j]` is the row of the old states slot j copies (-1: none),
    `replacements[b]` the slots whose rows come from merged tokens instead. `tables` holds
    the per-device (mask, (cos, sin), position_ids) of prefill and `step_tables` those of the
    current decoding step, each built once, not per layer.
    """

    start: int
    valid: torch.Tensor  # (B, L) bool, prompt part (left padding False)
    pos: torch.Tensor  # (P, B, L)
    img_idx: list[torch.Tensor]  # per sample: sequence indices of image tokens (stream order)
    img_ids: list[torch.Tensor]  # per sample: their original ids
    post_start: list[int]  # per sample: sequence index of the first token after the image
    n_text: list[int]  # per sample: valid non-image tokens
    n_extra: list[int] = field(default_factory=list)  # per sample: appended generated tokens at the end
    key_valid: torch.Tensor | None = None  # (B, kv) grows during decoding
    last_pos: torch.Tensor | None = None  # (P, B) last position used
    gather: torch.Tensor | None = None  # (B, L) source row per slot (segments made at llm.K)
    replacements: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per sample: slot -> row
    tables: dict[torch.device, tuple[Any, ...]] = field(default_factory=dict, repr=False)
    step_tables: tuple[Any, ...] | None = field(default=None, repr=False)  # (key, mask, (cos, sin), pos_ids)
    copies: dict[torch.device, SegmentOn] = field(default_factory=dict, repr=False)
    # per sample, per image: (slot of its first token, its tokens present); the text between
    # images sits between these runs (one image: [(img_idx[0], len(img_idx))])
    runs: list[list[tuple[int, int]]] = field(default_factory=list)

    def runs_of(self, b: int) -> list[tuple[int, int]]:
        if self.runs:
            return self.runs[b]
        k = int(self.img_idx[b].numel())
        return [(self.post_start[b] - k, k)]

    @property
    def padded(self) -> bool:
        """Whether some row has left padding (read on the host: no sync)."""
        return not bool(self.valid.all())

    def on(self, device: torch.device) -> SegmentOn:
        """The segment's index tensors on `device`, moved in ONE host-to-device copy the first
        time a device asks (a blocking copy is a host sync on a GPU), then reused."""
        hit = self.copies.get(device)
        if hit is None:
            parts = [self.valid.reshape(-1), self.pos.reshape(-1), *self.img_idx, *self.img_ids]
            slots = [torch.tensor(list(rows), dtype=torch.long) for rows in self.replacements]
            parts += slots
            if self.gather is not None:
                parts.append(self.gather.reshape(-1))
            flat = torch.cat([p.long().reshape(-1) for p in parts]).to(device)
            it = iter(flat.split([p.numel() for p in parts]))
            B = self.valid.shape[0]
            valid = next(it).view(self.valid.shape) != 0
            pos = next(it).view(self.pos.shape)
            img_idx = [next(it) for _ in range(B)]
            img_ids = [next(it) for _ in range(B)]
            slot_rows = [next(it) for _ in slots]
            gather = next(it).view(self.gather.shape) if self.gather is not None else None
            hit = self.copies[device] = SegmentOn(valid, pos, img_idx, img_ids, gather, slot_rows)
        return hit


@dataclass
class SegmentOn:
    """A Segment's index tensors on one device (`Segment.on`)."""

    valid: torch.Tensor
    pos: torch.Tensor
    img_idx: list[torch.Tensor]
    img_ids: list[torch.Tensor]
    gather: torch.Tensor | None
    slots: list[torch.Tensor]  # per sample: the slots of `replacements`, in its order


def columns(ids: torch.Tensor, present: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    """Index into `ids` of each token of `present` (same device; no Python lists), or None
    when a token of `present` is not in `ids` (`check=False`: not checked, no host sync; the
    caller knows they are all there)."""
    if ids.numel() == 0:
        return None if present.numel() else present.long()
    order = torch.argsort(ids)
    at = torch.searchsorted(ids[order], present).clamp(max=ids.numel() - 1)
    cols = order[at]
    return cols if not check or bool((ids[cols] == present).all()) else None


def host_keeps(acts: list[list[Keep]]) -> list[list[Keep]]:
    """The Keep actions of one site with their ids and position plans on the CPU: the
    adapter's layout bookkeeping is host-side and small; this is the one copy per site (one
    per dtype: ids and offsets of every action of every sample travel together; merged token
    values stay on the device)."""
    tensors = []
    for ab in acts:
        for a in ab:
            tensors.append(a.ids)
            if a.positions is not None:
                tensors += [a.positions.ids, a.positions.offsets]
    if not tensors:
        return acts
    host: dict[int, torch.Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group]).cpu()
        for t, h in zip(group, flat.split([t.numel() for t in group])):
            host[id(t)] = h.view(t.shape)

    def moved(a: Keep) -> Keep:
        pos = a.positions
        if pos is not None:
            pos = replace(pos, ids=host[id(pos.ids)], offsets=host[id(pos.offsets)])
        return replace(a, ids=host[id(a.ids)], positions=pos)

    return [[moved(a) for a in ab] for ab in acts]


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: causal over valid keys; a padded row sees itself (no NaN)."""
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    m = causal[None] & valid[:, None, :]
    m = m | torch.eye(L, dtype=torch.bool, device=valid.device)[None]
    return m[:, None]


def decode_mask(key_valid: torch.Tensor, q: int) -> torch.Tensor:
    """(B, 1, q, kv) bool for the last q queries over the cache's keys."""
    B, kv = key_valid.shape
    qi = torch.arange(q, device=key_valid.device)[:, None] + (kv - q)
    kj = torch.arange(kv, device=key_valid.device)[None]
    m = (kj <= qi)[None] & key_valid[:, None, :]
    return m[:, None]
