"""The token layout of a pruned forward pass, as data and pure tensor functions.

A run's tokens go through three shapes: the processor's batch (`Encoded`), one sample's
prompt split around its image block (`SampleLayout`), the image block before the LLM
(`Block`), and the layout each range of decoder layers sees (`Segment`). Applying a Keep at
`llm.K` makes a new Segment (`keep_in_segment`) and gathers the hidden states into it
(`gather_hidden`); the attention masks of a segment come from `prefill_mask` / `decode_mask`.
Nothing here touches a model: families and the hook session call these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch

from ..context import Keep
from ..errors import RunError
from ..types import PositionPlan


@dataclass
class Encoded:
    """Processor output for a batch (left padded) plus family extras for the vision tower."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    vision_inputs: dict[str, Any]  # e.g. pixel_values
    prompts: list[str]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleLayout:
    """One sample's unpruned prompt, split around its image block (no padding).

    Positions are (P, n): P = 1 for 1-D RoPE, 3 for M-RoPE.
    """

    pre_ids: torch.Tensor  # token ids before the image block
    post_ids: torch.Tensor  # token ids after it
    n_image: int  # image placeholder tokens in the prompt (the full grid)
    image_start: int  # index of the first image token in the sample's own sequence
    pos_pre: torch.Tensor  # (P, n_pre)
    pos_image: torch.Tensor  # (P, n_image) original positions of the full image block
    pos_post: torch.Tensor  # (P, n_post)
    n_extra: int = 0  # generated tokens appended by extend() (they are not prompt tokens)

    def extend(self, extra: torch.Tensor) -> None:
        """Append generated tokens after the prompt (cache-free recompute)."""
        extra = extra.reshape(-1).to(self.post_ids)
        if extra.numel() == 0:
            return
        last = self.pos_post[:, -1:] if self.pos_post.shape[1] else self.pos_image[:, -1:]
        self.pos_post = torch.cat([self.pos_post, last + 1 + torch.arange(extra.numel())], dim=1)
        self.post_ids = torch.cat([self.post_ids, extra])
        self.n_extra += int(extra.numel())

    @property
    def prompt_post_ids(self) -> torch.Tensor:
        """Token ids after the image that belong to the prompt (not the appended ones)."""
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


VisualPositions = Callable[[Any, torch.Tensor, PositionPlan | None], torch.Tensor]


def keep_in_segment(layer: int, seg: Segment, acts: list[list[Keep]], layouts: list,
                    visual_positions: VisualPositions) -> Segment | None:
    """The segment layers >= `layer` see after the Keep actions `acts` (per sample, host
    ids), with its `gather` and `replacements`; None when nothing changes.
    `visual_positions(layout, ids, plan)` is the family's position rule (P, k)."""
    B, L = seg.valid.shape
    views = []
    changed = False
    for b in range(B):
        layout = layouts[b]
        src = torch.arange(L)  # row of h each sequence slot comes from (-1: replacement only)
        pos = seg.pos[:, b].clone()
        ii, ids = seg.img_idx[b].clone(), seg.img_ids[b].clone()
        ps = seg.post_start[b]
        rows: dict[int, torch.Tensor] = {}  # slot -> replacement hidden row
        for act in acts[b]:
            keep_ids = act.ids.long()
            cur = {int(t): int(j) for t, j in zip(ids.tolist(), ii.tolist())}
            slots = []
            for t in keep_ids.tolist():
                if t not in cur and act.tokens is None:
                    raise RunError(f"node {act.node!r} keeps token {t} at {act.site}, which is not present there")
                slots.append(cur.get(t, -1))
            slots_t = torch.tensor(slots, dtype=torch.long)
            first = int(ii.min()) if ii.numel() else ps
            before, after = torch.arange(first), torch.arange(ps, src.numel())
            if act.positions is not None:
                vpos = visual_positions(layout, keep_ids, act.positions).to(pos)
            else:  # keep current ids; a token with no current row gets its original id
                fallback = layout.pos_image[:, keep_ids.clamp(0, layout.n_image - 1)].to(pos)
                vpos = torch.where(slots_t[None] >= 0, pos[:, slots_t.clamp(min=0)], fallback)
            post_pos = pos[:, after]
            follows = act.positions.text_follows if act.positions is not None else "original"
            if follows == "compact" and post_pos.shape[1]:
                top = vpos.max() if vpos.numel() else (pos[:, before].max() if before.numel() else -1)
                post_pos = post_pos - post_pos[:, :1] + top + 1
            order = torch.cat([before, slots_t, after])
            new_src = torch.where(order >= 0, src[order.clamp(min=0)], -1)
            new_pos = torch.cat([pos[:, before], vpos, post_pos], dim=1)
            new_rows: dict[int, torch.Tensor] = {}
            if act.tokens is not None:
                if act.tokens.space != "llm":
                    raise RunError(f"node {act.node!r}: tokens applied at {act.site} must be in llm space "
                                   f"(got {act.tokens.space!r}); merge before the LLM or project them")
                for j in range(keep_ids.numel()):
                    new_rows[before.numel() + j] = act.tokens.values[j]
            else:
                for jn, jo in enumerate(order.tolist()):
                    if jo in rows:
                        new_rows[jn] = rows[jo]
            if not (torch.equal(new_src, src) and torch.equal(new_pos, pos)) or new_rows or rows:
                changed = True
            src, pos, rows = new_src, new_pos, new_rows
            ii = torch.arange(before.numel(), before.numel() + keep_ids.numel())
            ids = keep_ids.clone()
            ps = before.numel() + keep_ids.numel()
        views.append((src, pos, ii, ids, ps, rows))
    if not changed:
        return None
    # drop the old left padding, then left-pad to the new common length
    npads = [L - int(seg.valid[b].sum()) for b in range(B)]
    newL = max(v[0].numel() - npads[b] for b, v in enumerate(views))
    P = seg.pos.shape[0]
    valid = torch.zeros(B, newL, dtype=torch.bool)
    pos_all = torch.ones(P, B, newL, dtype=seg.pos.dtype)
    gather = torch.zeros(B, newL, dtype=torch.long)
    img_idx, img_ids, post_start, repl = [], [], [], []
    for b, (src, pos, ii, ids, ps, rows) in enumerate(views):
        npad = npads[b]
        n = src.numel() - npad
        shift = newL - n
        valid[b, shift:] = True
        pos_all[:, b, shift:] = pos[:, npad:]
        gather[b, shift:] = src[npad:]
        gather[b, :shift] = npad  # padding copies the first valid row
        img_idx.append(ii - npad + shift)
        img_ids.append(ids)
        post_start.append(ps - npad + shift)
        repl.append({j - npad + shift: v for j, v in rows.items()})
        for j in (gather[b] < 0).nonzero().flatten().tolist():
            if j not in repl[b]:
                raise RunError("a kept token has neither a current row nor replacement features")
    return Segment(layer, valid, pos_all, img_idx, img_ids, post_start, list(seg.n_text), list(seg.n_extra),
                   gather=gather, replacements=repl)


def gather_hidden(h: torch.Tensor, new: Segment) -> torch.Tensor:
    """Hidden states (B, L', d) of segment `new` from the previous segment's `h`."""
    assert new.gather is not None, "gather_hidden needs a segment made by keep_in_segment"
    dev = new.on(h.device)
    assert dev.gather is not None
    out = torch.gather(h, 1, dev.gather.clamp(min=0)[:, :, None].expand(-1, -1, h.shape[-1]))
    for b, rows in enumerate(new.replacements):
        if rows:  # merged rows of sample b, in one copy
            out[b].index_copy_(0, dev.slots[b], torch.stack(list(rows.values())).to(out))
    return out
