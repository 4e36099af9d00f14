"""The Qwen-VL line's vision geometry: window order <-> raster order of the merged tokens, the
index conventions of the vision signals (blocks, hidden states), and the 3-D (M-RoPE) position
ids of a kept set of visual tokens under a PositionPlan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RunError
from ..positions import rpme_offsets
from ..signals import SignalRequest
from ..types import PositionPlan


@dataclass
class VisionGeometry:
    """Window order <-> raster order of the merged tokens of a batch of images."""

    grid_thw: torch.Tensor  # (images, 3) patch grid
    merge: int
    window_index: torch.Tensor  # window position -> raster merged-token index (global)
    counts: list[int]  # merged tokens per image

    @classmethod
    def of(cls, visual, grid_thw: torch.Tensor, window_index: torch.Tensor,
           device: torch.device | str | None = None) -> VisionGeometry:
        """The geometry of a batch, computed from `grid_thw` where it lies (give the processor's
        host copy: no device sync); `window_index` is the family's order of merge units
        (`QwenAdapter.window_index`: windows on Qwen2.5-VL, arange without windows), moved once
        to `device` (default: grid_thw's)."""
        merge = visual.spatial_merge_size
        counts = (grid_thw.prod(-1) // (merge * merge)).tolist()
        return cls(grid_thw, merge, window_index.to(grid_thw.device if device is None else device),
                   [int(c) for c in counts])

    def merged_grid(self, image: int) -> tuple[int, int]:
        t, h, w = (int(x) for x in self.grid_thw[image])
        return h // self.merge, w // self.merge

    def to_raster(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Rows in window order (one per merged token) -> raster order."""
        out = torch.empty_like(per_unit)
        out[self.window_index.to(per_unit.device)] = per_unit
        return out

    def per_unit_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(S, ...) patch rows (window-permuted, merge units contiguous) -> (S / m^2, ...) means."""
        u = self.merge * self.merge
        return per_patch.reshape(per_patch.shape[0] // u, u, *per_patch.shape[1:]).mean(dim=1)

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(rows, self.counts, dim=0))


# --- vision signal indices: blocks and hidden states ------------------------------------------
def hidden_index(layer: int, depth: int) -> int:
    """hidden_states index (HF convention: 0 = patch embeddings, i = output of block i - 1)."""
    idx = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= idx <= depth:
        raise RunError(f"vision hidden_states index {layer} is out of range for a {depth}-block vision tower "
                       f"(valid: 0..{depth} or -{depth + 1}..-1)")
    return idx


def block_index(layer: int, depth: int) -> int:
    idx = layer if layer >= 0 else depth + layer
    if not 0 <= idx < depth:
        raise RunError(f"vision block {layer} is out of range for a {depth}-block vision tower")
    return idx


def hidden_indices(req: SignalRequest, depth: int) -> list[int]:
    """hidden_states indices a vision hidden request averages."""
    if req.kind == "vision.hidden":
        return [hidden_index(int(req.arg("layer", -1)), depth)]
    start, stop = int(req.arg("start")), int(req.arg("stop"))
    if req.kind == "vision.merged_hidden_mean":  # block outputs start..stop-1
        lo, hi = block_index(start, depth) + 1, block_index(stop - 1, depth) + 2
    else:
        lo = hidden_index(start, depth)
        hi = hidden_index(stop - 1, depth) + 1
    if hi <= lo:
        raise RunError(f"signal {req.key}: empty range")
    return list(range(lo, hi))


# --- 3D positions (M-RoPE) --------------------------------------------------------------------
def _stretch_axis(values: torch.Tensor, span: int) -> torch.Tensor:
    """RPME on one axis: the distinct values, ascending, go through `rpme_offsets` (new[0] = 0,
    new[j] = ceil(u[j] * span / u[-1])); every token gets the new value of its own value."""
    uniq = torch.unique(values)  # sorted ascending
    mapped = rpme_offsets(uniq, span)
    return mapped[torch.searchsorted(uniq, values)]


def visual_positions_3d(image_pos: torch.Tensor, grid: tuple[int, int], ids: torch.Tensor,
                        plan: PositionPlan | None) -> tuple[torch.Tensor, bool]:
    """3D position ids (3, k) of the kept visual tokens `ids` (in sequence order), and whether
    the text after the image keeps its unpruned ids (True) or follows compactly (False).

    `image_pos` (3, n) holds the unpruned 3D ids of the image block in raster order (from
    get_rope_index: (s, s + row, s + col) for a still image). Policies:
    - pesp: each token keeps the 3D id of the grid cell `offsets[j]` (its own id);
    - perc (and any other 1-D plan): s + offsets[j] on all three axes (contiguous, like text);
    - rpme: per axis, the kept tokens' (t, row, col) are stretched over that axis' full range
      with the same formula as `nuwa_graph.positions.rpme_offsets` applied to the distinct
      values of the axis; t stays s for a still image;
    - no plan: an unchanged block (ids == 0..n-1 in order) keeps the model's own ids; any other
      block is numbered contiguously (PERC), which is what dropping tokens means elsewhere.
    """
    n = image_pos.shape[1]
    rows, cols = grid
    s = image_pos[:, 0].min()
    index = ids.clamp(min=0).to(image_pos.device)
    if plan is None:
        if ids.numel() == n and torch.equal(ids.cpu(), torch.arange(n)):
            return image_pos.clone(), True
        return (s + torch.arange(ids.numel(), device=image_pos.device)).expand(3, -1).clone(), False
    offsets = plan.offsets.to(image_pos.device).long()
    original = plan.text_follows == "original"
    if plan.policy == "pesp":
        if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= n):
            raise RunError(f"PESP offsets must lie in the image block [0, {n}); got {int(offsets.min())}..{int(offsets.max())}")
        return image_pos[:, offsets].clone(), original
    if plan.policy == "rpme":
        if index.numel() == 0:
            return image_pos[:, :0].clone(), original
        r, c = index // cols, index % cols
        t_axis = image_pos[0, index] - s
        out = torch.stack([_stretch_axis(t_axis, int(image_pos[0].max() - s)),
                           _stretch_axis(r, rows - 1), _stretch_axis(c, cols - 1)]) + s
        return out, original
    return (s + offsets).expand(3, -1).clone(), original
