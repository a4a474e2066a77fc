"""The ViT as MONAI's tools expect a network: a channel-first feature map.

``ViT.forward`` returns tokens ``(B, P + N, D)``, which tasks and pooling need. MONAI's bundle
tools read dimension 1 as channels (``verify_net_in_out``), and sliding-window inference and
dense heads want ``(B, C, *spatial)``. :class:`ViTFeatureMap` is the same module (same
parameters, same state-dict keys, so a bundle's ``models/model.pt`` loads into it strictly)
whose ``forward`` returns the patch tokens as a map ``(B, D, *grid)``: ViTDet's plain-backbone
output. ``tokens`` is the ViT's own forward, for code that pools.
"""

from __future__ import annotations

import torch

from .vit import ViT

__all__ = ["ViTFeatureMap"]


class ViTFeatureMap(ViT):
    """:class:`ViT` whose forward is ``(B, C, *spatial) -> (B, D, *grid)`` (CLS token dropped)."""

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None, context=None) -> torch.Tensor:
        """The ViT's tokens ``(B, P + N, D)``: what :func:`medssl.models.base.encode` calls."""
        return super().forward(x, keep, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid_size(x.shape[2:])
        patches = super().forward(x)[:, self.num_prefix_tokens:]  # (B, N, D), raster order
        return patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)
