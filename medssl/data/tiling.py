"""Images larger than the model's input, cut into model-sized blocks.

A 3D volume bigger than the training patch is cut into a grid of ``tile``-sized blocks (zero
padded at the far edges); each block carries its foreground share, so an embedding can weight
blocks of pure air down (:func:`medssl.eval.features.embed_image`) and a picture can show the
block with the most anatomy (:func:`most_foreground_block`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep

__all__ = ["tiles", "most_foreground_block"]


def tiles(img: torch.Tensor, tile: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, *spatial)`` -> blocks ``(T, C, *tile)`` and their foreground share ``(T,)`` (pixels > 0)."""
    nd = img.ndim - 1
    tile = ensure_tuple_rep(tile, nd)
    pad = [(-s) % t for s, t in zip(img.shape[1:], tile)]
    img = F.pad(img, [v for p in reversed(pad) for v in (0, p)])
    c = img.shape[0]
    blocks = img
    for axis, t in enumerate(tile):
        blocks = blocks.unfold(axis + 1, t, t)  # (C, n0, ..., t0, ...)
    blocks = blocks.permute(*range(1, nd + 1), 0, *range(nd + 1, 2 * nd + 1)).reshape(-1, c, *tile)  # (T, C, *tile)
    share = (blocks > 0).flatten(1).float().mean(1)
    return blocks, share


def most_foreground_block(img: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size``-edged block of a ``(C, *spatial)`` image with the most foreground (the whole
    image, padded to ``size``, when it is no larger): attention over a full CT volume would not
    fit in memory."""
    if all(s <= size for s in img.shape[1:]):
        pad = [v for s in reversed(img.shape[1:]) for v in (0, size - s)]
        return F.pad(img, pad)
    blocks, share = tiles(img, size)
    return blocks[int(share.argmax())]
