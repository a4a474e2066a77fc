"""What SimCLR and Barlow Twins share: two views of each image -> backbone -> projector -> a
loss between the two projections.

Views come from the data pipeline (``batch["views"]``, ``(B, 2, C, *S)``,
:func:`medssl.data.views.two_views`). Subclasses give the projector and :meth:`TwoViewTask.loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import batch_context
from .base import Task
from .token_drop import token_drop_share

__all__ = ["TwoViewTask", "pair_views"]


def pair_views(embed, projector: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, C, *S)`` views -> projected embeddings of view 1 and view 2, ``(B, D)`` each (float32).

    ``embed`` maps ``(2 * B, C, *S)`` view-major inputs to pooled vectors (a task's :meth:`~medssl.tasks.Task.embed`).
    """
    if views.ndim < 4 or views.shape[1] != 2:
        raise ValueError(f"expected views shaped (B, 2, C, *spatial), got {tuple(views.shape)}")
    z = projector(embed(views.transpose(0, 1).flatten(0, 1))).float()
    return z.chunk(2)


class TwoViewTask(Task):
    """Base of the two-view objectives; logs ``positive_similarity`` (cosine of the pairs).

    ``token_drop``: share of each view's patch tokens the encoder does not see in training
    (:mod:`medssl.tasks.token_drop`; 0.5 in FLIP).
    """

    required_keys = ("views",)

    def __init__(self, backbone: nn.Module, projector: nn.Module, pooling: str | None = None, views_key: str = "views",
                 token_drop: float = 0.0) -> None:
        super().__init__(backbone)
        self.projector, self.views_key, self.token_drop = projector, views_key, token_drop_share(token_drop)
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.required_keys = (views_key,)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1, z2 = pair_views(lambda x: self.embed(batch, x, self.pooling, drop=self.token_drop), self.projector,
                            batch[self.views_key])
        loss = self.loss(z1, z2)
        with torch.no_grad():
            positive = F.cosine_similarity(z1, z2).mean()
        return {"loss": loss, "positive_similarity": positive}

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image and the backbone's last-block attention over it."""
        from ..viz.attention import attention_panels

        return attention_panels(self.backbone, batch["image"], batch_context(batch))
