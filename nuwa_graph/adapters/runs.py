"""A prompt's runs after a prune: where each image's kept tokens sit and which positions the
text and images get.

A sample is `text 0 | image 0 | text 1 | ... | image m-1 | text m` (layout.py `SampleLayout`).
`place_runs` numbers the runs in stream order: an image's kept tokens get the family's
positions (counted from that image's original start, then moved by however far the text
before it moved), and the text after an image either follows its last kept token (`compact`)
or moves with the text before the image (`original`). Before the LLM `_assemble` uses it; a
Keep at `llm.K` makes a new Segment with `keep_in_segment` and gathers the hidden states into
it with `gather_hidden`. On a prompt of one image every rule is the one-image rule of before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..context import Keep
from ..errors import RunError
from ..types import PositionPlan
from .layout import SampleLayout, Segment

VisualPositions = Callable[[Any, torch.Tensor, PositionPlan | None], torch.Tensor]


def by_image(layout: SampleLayout, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per image of the prompt, the indices into `ids` (host ids) of its tokens, order kept."""
    if len(layout.images) == 1:
        return [torch.arange(ids.numel())]
    blocks = layout.blocks_of(ids)
    return [torch.nonzero(blocks == i).flatten() for i in range(len(layout.images))]


def image_positions(layout: SampleLayout, ids: torch.Tensor, plan: PositionPlan | None,
                    visual_positions: VisualPositions) -> list[torch.Tensor]:
    """Per image, the positions (P, k_i) of its kept tokens among `ids` by the family's rule,
    each counted from that image's ORIGINAL start (plan offsets count from their image's start;
    `place_runs` shifts them by the text moved before the image)."""
    if len(layout.images) == 1:
        return [visual_positions(layout, ids, plan)]
    out = []
    for i, sel in enumerate(by_image(layout, ids)):
        local = layout.local_ids(i, ids[sel])
        sub = None if plan is None else PositionPlan(local, plan.offsets[sel.to(plan.offsets.device)], plan.policy,
                                                     plan.text_follows)
        out.append(visual_positions(layout.image(i), local, sub))
    return out


def place_runs(layout: SampleLayout, text_now: list[torch.Tensor],
               visual: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], follows: str,
               top: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Positions of a prompt's runs, walked in stream order: text run 0, image 0, text run 1, ...

    `text_now[i]`: text run i's current positions (P, n_i); `visual(i, shift, moved)`: image i's
    positions, given `shift` (how far the text before it now sits from its original positions:
    add it to positions counted in the original frame) and `moved` (how far that text moved in
    this walk: add it to current positions). Text after an image follows its last kept token
    (`compact`) or moves with the text before the image (`original`), as the stock model numbers
    text after an image (Qwen's get_rope_index: one past the image's largest position). `top`:
    the largest position before the first image (-1: none). Returns (text runs, images)."""
    zero = torch.zeros(text_now[0].shape[0], 1, dtype=torch.long)
    shift = moved = zero
    texts, images = [text_now[0]], []
    for i in range(len(layout.images)):
        v = visual(i, shift, moved)
        images.append(v)
        if v.numel():
            top = v.max()
        t = text_now[i + 1]
        if t.shape[1]:
            new = t - t[:, :1] + top + 1 if follows == "compact" else t + moved
            moved = new[:, :1] - t[:, :1]
            shift = new[:, :1] - layout.text_start(i + 1)
            top = new.max()
            t = new
        elif follows == "compact":
            shift = top + 1 - layout.text_start(i + 1)
        texts.append(t)
    return texts, images


def keep_in_segment(layer: int, seg: Segment, acts: list[list[Keep]], layouts: list,
                    visual_positions: VisualPositions) -> Segment | None:
    """The segment layers >= `layer` see after the Keep actions `acts` (per sample, host
    ids), with its `gather` and `replacements`; None when nothing changes. Each image's kept
    tokens replace that image's run; the text between images stays, moved as `place_runs` says.
    `visual_positions(layout, ids, plan)` is the family's position rule (P, k) for one image."""
    B, L = seg.valid.shape
    views = []
    changed = False
    for b in range(B):
        layout = layouts[b]
        src = torch.arange(L)  # row of h each sequence slot comes from (-1: replacement only)
        pos = seg.pos[:, b].clone()
        ii, ids = seg.img_idx[b].clone(), seg.img_ids[b].clone()
        runs = seg.runs_of(b)
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
            if act.tokens is not None and act.tokens.space != "llm":
                raise RunError(f"node {act.node!r}: tokens applied at {act.site} must be in llm space "
                               f"(got {act.tokens.space!r}); merge before the LLM or project them")
            # text runs in the current sequence: before the first image, between images, after the last
            bounds = [0] + [x for s, k in runs for x in (s, s + k)] + [src.numel()]
            text_idx = [torch.arange(bounds[2 * i], bounds[2 * i + 1]) for i in range(len(runs) + 1)]
            sels = by_image(layout, keep_ids)
            planned = image_positions(layout, keep_ids, act.positions, visual_positions) \
                if act.positions is not None else None

            def visual(i: int, shift: torch.Tensor, moved: torch.Tensor, sels=sels, planned=planned,
                       keep_ids=keep_ids, slots_t=slots_t, pos=pos, layout=layout) -> torch.Tensor:
                if planned is not None:
                    return planned[i].to(pos) + shift if len(sels) > 1 else planned[i].to(pos)
                # keep current ids; a token with no current row gets its original id
                k_ids, k_slots = keep_ids[sels[i]], slots_t[sels[i]]
                fallback = layout.pos_image[:, k_ids.clamp(0, layout.n_image - 1)].to(pos) + shift
                return torch.where(k_slots[None] >= 0, pos[:, k_slots.clamp(min=0)] + moved, fallback)

            top = pos[:, text_idx[0]].max() if text_idx[0].numel() else -1
            follows = act.positions.text_follows if act.positions is not None else "original"
            new_text, new_vis = place_runs(layout, [pos[:, t] for t in text_idx], visual, follows, top)
            order_parts, pos_parts, new_runs, kept_at = [text_idx[0]], [new_text[0]], [], []
            at = text_idx[0].numel()
            for i, sel in enumerate(sels):
                order_parts += [slots_t[sel], text_idx[i + 1]]
                pos_parts += [new_vis[i], new_text[i + 1]]
                new_runs.append((at, sel.numel()))
                kept_at.append(at + torch.arange(sel.numel()))
                at += sel.numel() + text_idx[i + 1].numel()
            order = torch.cat(order_parts)
            new_src = torch.where(order >= 0, src[order.clamp(min=0)], -1)
            new_pos = torch.cat(pos_parts, dim=1)
            sel_all = torch.cat(sels)
            new_rows: dict[int, torch.Tensor] = {}
            if act.tokens is not None:
                for slot, j in zip(torch.cat(kept_at).tolist(), sel_all.tolist()):
                    new_rows[slot] = act.tokens.values[j]
            else:
                for jn, jo in enumerate(order.tolist()):
                    if jo in rows:
                        new_rows[jn] = rows[jo]
            if not (torch.equal(new_src, src) and torch.equal(new_pos, pos)) or new_rows or rows:
                changed = True
            src, pos, rows, runs = new_src, new_pos, new_rows, new_runs
            ii = torch.cat(kept_at)
            ids = keep_ids[sel_all].clone()
        ps = runs[-1][0] + runs[-1][1]
        views.append((src, pos, ii, ids, ps, rows, runs))
    if not changed:
        return None
    # drop the old left padding, then left-pad to the new common length
    npads = [L - int(seg.valid[b].sum()) for b in range(B)]
    newL = max(v[0].numel() - npads[b] for b, v in enumerate(views))
    P = seg.pos.shape[0]
    valid = torch.zeros(B, newL, dtype=torch.bool)
    pos_all = torch.ones(P, B, newL, dtype=seg.pos.dtype)
    gather = torch.zeros(B, newL, dtype=torch.long)
    img_idx, img_ids, post_start, repl, all_runs = [], [], [], [], []
    for b, (src, pos, ii, ids, ps, rows, runs) in enumerate(views):
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
        all_runs.append([(s - npad + shift, k) for s, k in runs])
        repl.append({j - npad + shift: v for j, v in rows.items()})
        for j in (gather[b] < 0).nonzero().flatten().tolist():
            if j not in repl[b]:
                raise RunError("a kept token has neither a current row nor replacement features")
    return Segment(layer, valid, pos_all, img_idx, img_ids, post_start, list(seg.n_text), list(seg.n_extra),
                   gather=gather, replacements=repl, runs=all_runs)


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
