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

__all__ = ["WindowLayout"]


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
        counts = [math.ceil(g / w) for g, w in zip(self.grid, self.window)]  # windows per axis
        self.n_windows = math.prod(counts)
        self.tokens_per_window = math.prod(self.window)
        nd = len(self.grid)
        padded = [c * w for c, w in zip(counts, self.window)]
        raster = torch.full(padded, -1, dtype=torch.long)
        raster[tuple(slice(0, g) for g in self.grid)] = torch.arange(math.prod(self.grid)).view(self.grid)
        # (c0, w0, c1, w1, ...) -> (c0, c1, ..., w0, w1, ...): window index major, position in window minor
        split = raster.view([v for c, w in zip(counts, self.window) for v in (c, w)])
        perm = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
        self.order = split.permute(perm).reshape(-1)
        slot_window = torch.arange(self.n_windows).repeat_interleave(self.tokens_per_window)
        valid = self.order >= 0
        self.window_of = torch.empty(math.prod(self.grid), dtype=torch.long)
        self.window_of[self.order[valid]] = slot_window[valid]
        self.slot_of = torch.empty(math.prod(self.grid), dtype=torch.long)  # inverse of ``order``
        self.slot_of[self.order[valid]] = torch.arange(len(self.order))[valid]

    def to(self, device: torch.device | str) -> WindowLayout:
        """Move the index tensors to ``device`` (in place; returns self)."""
        self.order, self.window_of, self.slot_of = (t.to(device) for t in (self.order, self.window_of, self.slot_of))
        return self

    @property
    def padded(self) -> bool:
        return self.n_windows * self.tokens_per_window != math.prod(self.grid)

    def __repr__(self) -> str:
        return f"WindowLayout(grid={self.grid}, window={self.window}, n_windows={self.n_windows})"
