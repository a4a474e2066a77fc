"""BYOL (Grill et al., 2020, arXiv:2006.07733): the distillation family of the second source document.

An online network (backbone, projector, predictor) predicts, for one view of an image, the
target network's projection of the other view; the target (backbone and projector) is an
exponential moving average of the online one (:mod:`medssl.tasks.ema`), and gets no gradient.
There are no negatives: the predictor and the slowly moving target keep the embeddings from
collapsing. The loss is the paper's ``2 - 2 cos(p, z')``, symmetrised over the two views.

Views come from the data pipeline (``batch["views"]``, ``(B, 2, C, *S)``,
:func:`medssl.data.views.two_views`), as for SimCLR and Barlow Twins. Projector and predictor are
the paper's MLPs (Linear, BatchNorm, ReLU, Linear; 4096 -> 256 there, 1024 -> 256 here by default
for small sets). Under DDP the loss has no cross-sample term; only the BatchNorm statistics are
per rank (SyncBatchNorm on GPUs with the bundles' DDP overlay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import batch_context
from .base import Task, register_task
from .ema import frozen_copy
from .heads import ProjectionMLP
from .token_drop import token_drop_share
from .two_views import pair_views

__all__ = ["BYOLTask", "byol_loss"]


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch: 0 when each prediction points along its target, 4 when opposite."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1)).mean()


@register_task("byol")
class BYOLTask(Task):
    """BYOL on ``backbone``.

    Args:
        hidden_dim, out_dim: widths of the projector and the predictor (both 2-layer MLPs with BatchNorm).
        momentum: target EMA momentum at the start, cosine to 1 over training (the paper's 0.996).
        pooling: backbone output fed to the projector (default ``"cls"`` with a CLS token, else ``"mean"``).
        token_drop: share of each view's patch tokens the online network does not encode in training (FLIP;
            the target sees every token, as MSN's does).
    """

    required_keys = ("views",)

    def __init__(self, backbone: nn.Module, hidden_dim: int = 1024, out_dim: int = 256, momentum: float = 0.996,
                 pooling: str | None = None, views_key: str = "views", token_drop: float = 0.0) -> None:
        super().__init__(backbone)
        self.token_drop = token_drop_share(token_drop)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.projector = ProjectionMLP(backbone.embed_dim, hidden_dim, out_dim, layers=2, batch_norm=True)
        self.predictor = ProjectionMLP(out_dim, hidden_dim, out_dim, layers=2, batch_norm=True)
        self.target = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.momentum, self.views_key = momentum, views_key
        self.required_keys = (views_key,)

    def train(self, mode: bool = True):
        super().train(mode)
        self.target.eval()  # no drop-path in the target
        self.target_projector.train(mode)  # its BatchNorm uses batch statistics, as the online projector's
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch[self.views_key]
        z1, z2 = pair_views(lambda x: self.embed(batch, x, self.pooling, drop=self.token_drop), self.projector, views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = pair_views(lambda x: self.embed(batch, x, self.pooling, encoder=self.target), self.target_projector, views)
        loss = (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2
        with torch.no_grad():
            agreement = F.cosine_similarity(p1, t2).mean()
        return {"loss": loss, "prediction_cosine": agreement}

    def teachers(self):
        return [(self.target, self.backbone), (self.target_projector, self.projector)]


    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image and the backbone's last-block attention over it."""
        from ..viz.attention import attention_panels

        return attention_panels(self.backbone, batch["image"], batch_context(batch))
