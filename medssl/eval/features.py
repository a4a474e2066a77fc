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
from ..models.base import embed

__all__ = ["embed_image", "load_encoder"]


def load_encoder(network: torch.nn.Module, checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load encoder weights (a bare state dict, e.g. a bundle's ``models/model.pt``) into ``network``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist; pretrain first (medssl pretrain / monai.bundle run)")
    from ..engine.checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a medssl checkpoint (it holds a {type(state).__name__}, not weights)")
    if "network" in state and isinstance(state["network"], dict):  # a full training checkpoint
        state = {k.split("backbone.", 1)[1]: v for k, v in state["network"].items() if k.startswith("backbone.")}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not fit this encoder (was it trained with other size/patch settings?): {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this encoder: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was it trained with other size/patch settings?)")
    return network


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
