"""I-JEPA's block masks, made in the data pipeline (as the reference's mask collator does), 2D and 3D.

Per image, on its token grid (image shape // patch): ``n_targets`` target blocks (each a random
box of ``target_scale`` of the tokens with axis ratios in ``target_aspect``), and one context
block (``context_scale``, ratio 1) with every target token removed from it, so the context
never shows what it must predict. If too little context is left (``min_context`` of the grid)
the context block is drawn again, then the targets (the reference's loop). The item gains
``jepa_context`` ``(N,)`` and ``jepa_targets`` ``(n_targets, N)``, bool masks over the raster token
order; batched, ``(B, N)`` and ``(B, M, N)``. The task turns the context mask into encoder slots
grouped by attention window (:func:`medssl.tasks.masking.mask_to_keep`), as MAE's masks are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Randomizable
from monai.utils import ensure_tuple_rep

__all__ = ["RandBlockMasksd", "jepa_blocks", "block_edges"]


def block_edges(grid: Sequence[int], scale: float, aspects: Sequence[float]) -> tuple[int, ...]:
    """Edges of a block of about ``scale * prod(grid)`` tokens whose first ``d - 1`` edges are ``aspects``
    times the last (2D: height / width = aspect, as I-JEPA's), each at least 1 and smaller than the grid
    (or the grid's edge where that is 1)."""
    d = len(grid)
    n = scale * math.prod(grid)
    ratios = list(aspects) + [1.0]
    base = (n / math.prod(ratios)) ** (1.0 / d)
    return tuple(max(1, min(int(round(base * r)), g - 1 if g > 1 else 1)) for r, g in zip(ratios, grid))


class RandBlockMasksd(Randomizable):
    """Item -> item plus ``jepa_context`` and ``jepa_targets`` (module docstring)."""

    def __init__(self, patch_size: int | Sequence[int], n_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
                 target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
                 min_context: float = 0.1, key: str = "image", context_key: str = "jepa_context",
                 targets_key: str = "jepa_targets", tries: int = 20) -> None:
        if n_targets < 1:
            raise ValueError(f"I-JEPA needs at least 1 target block, got {n_targets}")
        self.patch_size, self.n_targets = patch_size, n_targets
        self.target_scale, self.target_aspect, self.context_scale = target_scale, target_aspect, context_scale
        self.min_context, self.key, self.context_key, self.targets_key, self.tries = min_context, key, context_key, targets_key, tries

    def randomize(self, data=None) -> None:
        pass

    def _block(self, grid: tuple[int, ...], scale: tuple[float, float], aspect: tuple[float, float] | None) -> np.ndarray:
        s = self.R.uniform(*scale)
        aspects = [1.0] * (len(grid) - 1) if aspect is None else \
            [math.exp(self.R.uniform(math.log(aspect[0]), math.log(aspect[1]))) for _ in range(len(grid) - 1)]
        edges = block_edges(grid, s, aspects)
        start = [self.R.randint(0, g - e + 1) for g, e in zip(grid, edges)]
        block = np.zeros(grid, dtype=bool)
        block[tuple(slice(a, a + e) for a, e in zip(start, edges))] = True
        return block

    def masks(self, grid: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(context (N,), targets (M, N))`` bool masks for a token ``grid``."""
        grid = tuple(int(g) for g in grid)
        n = math.prod(grid)
        need = max(1, int(self.min_context * n))
        for _ in range(self.tries):
            targets = np.stack([self._block(grid, self.target_scale, self.target_aspect) for _ in range(self.n_targets)])
            for _ in range(self.tries):
                context = self._block(grid, self.context_scale, None) & ~targets.any(0)
                if context.sum() >= need:
                    return context.reshape(n), targets.reshape(self.n_targets, n)
        raise ValueError(f"could not leave {need} context tokens outside {self.n_targets} target blocks of {self.target_scale} "
                         f"on a {'x'.join(map(str, grid))} token grid; use fewer or smaller target blocks")

    def __call__(self, data: dict) -> dict:
        img = data[self.key]
        spatial = tuple(img.shape[1:])
        patch = ensure_tuple_rep(self.patch_size, len(spatial))
        context, targets = self.masks(tuple(s // p for s, p in zip(spatial, patch)))
        out = dict(data)
        out[self.context_key] = torch.from_numpy(context)
        out[self.targets_key] = torch.from_numpy(targets)
        return out


def jepa_blocks(patch_size: int | Sequence[int], n_targets: int = 4, target_scale: Sequence[float] = (0.15, 0.2),
                target_aspect: Sequence[float] = (0.75, 1.5), context_scale: Sequence[float] = (0.85, 1.0),
                min_context: float = 0.1) -> RandBlockMasksd:
    """The I-JEPA task's view: block masks on the image's token grid (the reference's defaults)."""
    return RandBlockMasksd(patch_size, n_targets, tuple(target_scale), tuple(target_aspect), tuple(context_scale), min_context)
