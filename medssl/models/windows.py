"""Non-overlapping attention windows over a token grid (ViTDet's window attention, no shift).

:class:`WindowLayout` turns the raster order of a token grid into *window-major* order: the
tokens of window 0 first, then window 1, ... The backbone permutes its tokens into this order once
and keeps them there through every block, so a windowed block is a reshape to
``(B * n_windows, tokens_per_window, D)`` and a global block needs nothing at all (attention does
not care about order). When a grid axis is not a multiple of the window, the last window is
padded; padded slots carry raster index ``-1`` and are masked out of attention, exactly like the
padded slots of a masked-autoencoder batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["WindowLayout", "window_indices"]


def window_indices(grid: list[int], window: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(order, window_of, slot_of, n_windows)`` of :class:`WindowLayout` for ``grid`` and ``window`` (per axis).

    Written with tensor arithmetic on the window-major slot index (window index major, position in
    the window minor, both in C order), so TorchScript compiles it and a scripted encoder builds
    the layout of whatever grid its input has.
    """
    nd = len(grid)
    if len(window) != nd:
        raise ValueError("window and grid differ in dimensionality")
    win: list[int] = []
    counts: list[int] = []
    n_windows, per_window, n_tokens = 1, 1, 1
    for g, w in zip(grid, window):
        w = min(w, g)
        win.append(w)
        counts.append((g + w - 1) // w)
        n_windows, per_window, n_tokens = n_windows * counts[-1], per_window * w, n_tokens * g
    slot = torch.arange(n_windows * per_window)
    window_index, in_window = slot // per_window, slot % per_window
    raster = torch.zeros_like(slot)
    valid = torch.ones_like(slot, dtype=torch.bool)
    rest_window, rest_in, stride = window_index, in_window, 1
    for axis in range(nd - 1, -1, -1):  # last axis fastest
        coord = (rest_window % counts[axis]) * win[axis] + rest_in % win[axis]
        rest_window, rest_in = rest_window // counts[axis], rest_in // win[axis]
        valid = valid & (coord < grid[axis])
        raster = raster + coord * stride
        stride *= grid[axis]
    order = torch.where(valid, raster, torch.full_like(raster, -1))
    window_of = torch.empty(n_tokens, dtype=torch.long)
    window_of[raster[valid]] = window_index[valid]
    slot_of = torch.empty(n_tokens, dtype=torch.long)  # inverse of ``order``
    slot_of[raster[valid]] = slot[valid]
    return order, window_of, slot_of, n_windows


class WindowLayout:
    """Window geometry of one token ``grid`` with windows of ``window`` tokens per axis.

    Attributes:
        grid, window: per-axis sizes (window clipped to the grid).
        n_windows, tokens_per_window: counts (padding included in the latter).
        order: ``(n_windows * tokens_per_window,)`` raster index of each window-major slot, -1 for padding.
        window_of: ``(prod(grid),)`` window index of each raster token.
        slot_of: ``(prod(grid),)`` window-major slot of each raster token.
    """

    def __init__(self, grid: Sequence[int], window: Sequence[int]) -> None:
        if len(grid) != len(window):
            raise ValueError(f"window {tuple(window)} and grid {tuple(grid)} differ in dimensionality")
        self.grid = tuple(int(g) for g in grid)
        self.window = tuple(min(int(w), g) for w, g in zip(window, self.grid))
        self.tokens_per_window = math.prod(self.window)
        self.order, self.window_of, self.slot_of, self.n_windows = window_indices(list(self.grid), list(self.window))

    def to(self, device: torch.device | str) -> WindowLayout:
        """Move the index tensors to ``device`` (in place; returns self)."""
        self.order, self.window_of, self.slot_of = (t.to(device) for t in (self.order, self.window_of, self.slot_of))
        return self

    @property
    def padded(self) -> bool:
        return self.n_windows * self.tokens_per_window != math.prod(self.grid)

    def __repr__(self) -> str:
        return f"WindowLayout(grid={self.grid}, window={self.window}, n_windows={self.n_windows})"
