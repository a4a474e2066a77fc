"""Barlow Twins (Zbontar et al., 2021, arXiv:2103.03230): make the cross-correlation of two views'
embeddings the identity, with MONAI's ``BarlowTwinsLoss``.

Views come from the data pipeline (``batch["views"]``, ``(B, 2, C, *S)``). The projector is the
paper's: 3 linear layers, BatchNorm and ReLU between them. Under DDP the embeddings of every rank
are gathered (with gradients) before the loss, so the per-feature standardisation and the
cross-correlation matrix are the global batch's, as the paper's code gets by all-reducing the
matrix. The bundles' DDP overlay makes the projector's BatchNorm a ``SyncBatchNorm`` on GPUs
(:func:`medssl.distributed.sync_batch_norm`); on CPU (gloo) PyTorch has none, so there the
statistics stay each rank's own: use a per-rank batch of at least a few dozen.
"""

from __future__ import annotations

import torch
from monai.losses import BarlowTwinsLoss
from torch import nn

from .base import register_task
from .heads import ProjectionMLP
from ..distributed import gather
from .two_views import TwoViewTask

__all__ = ["BarlowTwinsTask"]


@register_task("barlow")
class BarlowTwinsTask(TwoViewTask):
    """Barlow Twins on ``backbone``.

    Args:
        hidden_dim, out_dim: projector widths (8192 in the paper; 1024-2048 suit a tiny ViT).
        lambd: weight of the off-diagonal (redundancy) terms, 5e-3 as in the paper.
        pooling: backbone output fed to the projector (default ``"cls"`` with a CLS token, else ``"mean"``).
        token_drop: share of each view's patch tokens not encoded in training (FLIP; see :class:`TwoViewTask`).
    """

    def __init__(self, backbone: nn.Module, hidden_dim: int = 1024, out_dim: int = 1024, lambd: float = 5e-3,
                 pooling: str | None = None, views_key: str = "views", token_drop: float = 0.0) -> None:
        super().__init__(backbone, ProjectionMLP(backbone.embed_dim, hidden_dim, out_dim, layers=3, batch_norm=True),
                         pooling, views_key, token_drop)
        self.loss_fn = BarlowTwinsLoss(lambd=lambd)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape[0] < 2:
            raise ValueError("Barlow Twins needs at least 2 images per batch (it standardises features over the batch)")
        return self.loss_fn(gather(z1)[0], gather(z2)[0])
