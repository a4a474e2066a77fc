"""SimCLR (Chen et al., 2020, arXiv:2002.05709): NT-Xent between two views of each image.

The two views come from the data pipeline (``batch["views"]``, ``(B, 2, C, *S)``), pass through
the shared backbone and a projector, and each view must pick its partner out of all other views
in the batch. Under DDP the candidates are gathered from every rank (with gradients), so the
loss is the one of the global batch.

Why not MONAI's ``ContrastiveLoss``: it computes the similarity matrix by broadcasting
``cosine_similarity`` over a ``(2B, 2B, D)`` tensor (memory quadratic in the batch times the
feature width), exponentiates without a log-sum-exp, and sees only its own rank's negatives.
:func:`nt_xent` gives the same value (tested against it) from a matrix product and
``cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_task
from .heads import ProjectionMLP
from ..distributed import gather
from .two_views import TwoViewTask

__all__ = ["SimCLRTask", "nt_xent"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Normalised-temperature cross entropy of paired embeddings ``(B, D)``, ``(B, D)``.

    For each of the 2B views: ``-log(exp(s_pos / t) / sum_{k != self} exp(s_k / t))`` with cosine
    similarities ``s``, averaged over the views.
    """
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    b = z1.shape[0]
    all1, offset = gather(z1)
    all2, _ = gather(z2)
    n = all1.shape[0]
    candidates = torch.cat([all1, all2])  # (2N, D)
    logits = torch.cat([z1, z2]) @ candidates.T / temperature  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + offset
    self_cols = torch.cat([own, own + n])
    logits[torch.arange(2 * b, device=z1.device), self_cols] = float("-inf")
    targets = torch.cat([own + n, own])
    return F.cross_entropy(logits, targets)


@register_task("simclr")
class SimCLRTask(TwoViewTask):
    """SimCLR on ``backbone``: projector (2 layers, BatchNorm) and :func:`nt_xent`.

    Args:
        hidden_dim, out_dim: projector widths.
        temperature: NT-Xent temperature (the paper uses 0.1-0.5; 0.2 measured better than 0.1 at batch 64 on
            PneumoniaMNIST: docs/benchmarks.md, SimCLR's temperature).
        pooling: backbone output fed to the projector (default ``"cls"`` with a CLS token, else ``"mean"``).
        token_drop: share of each view's patch tokens not encoded in training (FLIP; see :class:`TwoViewTask`).
    """

    def __init__(self, backbone: nn.Module, hidden_dim: int = 1024, out_dim: int = 128, temperature: float = 0.2,
                 pooling: str | None = None, views_key: str = "views", token_drop: float = 0.0) -> None:
        super().__init__(backbone, ProjectionMLP(backbone.embed_dim, hidden_dim, out_dim, layers=2, batch_norm=True),
                         pooling, views_key, token_drop)
        self.temperature = temperature

    def loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)
