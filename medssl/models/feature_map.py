"""The ViT and the Medformer as MONAI's tools expect a network: a channel-first feature map.

``ViT.forward`` returns tokens ``(B, P + N, D)``, which tasks and pooling need. MONAI's bundle
tools read dimension 1 as channels (``verify_net_in_out``), and sliding-window inference and
dense heads want ``(B, C, *spatial)``. :class:`ViTFeatureMap` is the same module (same
parameters, same state-dict keys, so a bundle's ``models/model.pt`` loads into it strictly)
whose ``forward`` returns the patch tokens as a map ``(B, D, *grid)``: ViTDet's plain-backbone
output. ``tokens`` is the ViT's own forward, for code that pools. :class:`MedformerFeatureMap`
is the same for the :class:`~medssl.models.Medformer` (its output queries at every grid position).
"""

from __future__ import annotations

import torch

from .medformer import Medformer
from .vit import ViT

__all__ = ["ViTFeatureMap", "MedformerFeatureMap"]


class _FeatureMap:
    """``forward`` as a feature map ``(B, D, *grid)``; ``tokens`` is the encoder's own forward."""

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None, context=None) -> torch.Tensor:
        """The encoder's tokens ``(B, P + N, D)``: what :func:`medssl.models.base.encode` calls."""
        return super().forward(x, keep, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._grid(x.shape[2:])
        patches = self._forward_tokens(x, None)[:, self.num_prefix_tokens:]  # (B, N, D), raster order
        return patches.transpose(1, 2).reshape([x.shape[0], self.embed_dim] + grid)


class ViTFeatureMap(_FeatureMap, ViT):
    """:class:`ViT` whose forward is ``(B, C, *spatial) -> (B, D, *grid)`` (CLS token dropped)."""


class MedformerFeatureMap(_FeatureMap, Medformer):
    """:class:`~medssl.models.Medformer` whose forward is ``(B, C, *spatial) -> (B, D, *grid)``, 2D or 3D (CLS query dropped)."""
