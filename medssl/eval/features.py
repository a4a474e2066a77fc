"""Frozen encoder -> one embedding per image, for any image size (3D volumes are tiled).

A 3D volume larger than the training patch is cut into ``tile``-sized blocks
(:func:`medssl.data.tiling.tiles`); each block is embedded and the image's embedding is the
average of its blocks weighted by their foreground share, so blocks of pure air do not dilute it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.tiling import tiles
from ..engine.checkpoint import load_encoder  # noqa: F401  (the loader lives with the checkpoints)
from ..models.base import embed

__all__ = ["embed_image", "load_encoder"]


@torch.no_grad()
def embed_image(encoder: torch.nn.Module, img: torch.Tensor, pooling: str = "mean", tile: int | Sequence[int] | None = None,
                chunk: int = 16) -> torch.Tensor:
    """Embedding of one image ``(C, *spatial)`` (on the encoder's device): ``(F,)``.

    ``encoder`` is any :class:`~medssl.models.base.Encoder` (the bundles' MONAI-facing
    :class:`~medssl.models.ViTFeatureMap` included).
    """
    if tile is None:
        return embed(encoder, img[None], pooling)[0]
    blocks, share = tiles(img, tile)
    out = torch.cat([embed(encoder, blocks[i:i + chunk], pooling) for i in range(0, len(blocks), chunk)])  # (T, F)
    weight = share if share.sum() > 0 else torch.ones_like(share)
    return (out.float() * weight[:, None]).sum(0) / weight.sum()
