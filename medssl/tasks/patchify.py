"""Images <-> sequences of flattened patches, for any number of spatial dimensions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["patchify", "unpatchify"]


def patchify(img: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, prod(patch) * C)``, tokens in raster order, C fastest.

    The token order matches the backbone's conv patch embedding (``flatten(2)`` of its grid).
    """
    b, c, *spatial = img.shape
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    x = img.reshape(b, c, *[v for g, p in zip(grid, patch_size) for v in (g, p)])  # (B, C, g0, p0, g1, p1, ...)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]  # (B, g..., p..., C)
    return x.permute(perm).reshape(b, -1, torch.Size(patch_size).numel() * c)


def unpatchify(tokens: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, prod(patch) * C)`` -> ``(B, C, *spatial)``."""
    b = tokens.shape[0]
    nd = len(grid)
    x = tokens.reshape(b, *grid, *patch_size, channels)  # (B, g..., p..., C)
    perm = [0, 1 + 2 * nd] + [v for i in range(nd) for v in (1 + i, 1 + nd + i)]  # (B, C, g0, p0, g1, p1, ...)
    return x.permute(perm).reshape(b, channels, *[g * p for g, p in zip(grid, patch_size)])
