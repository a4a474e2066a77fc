"""Keep embeddings spread over the batch: VICReg's variance and covariance terms (Bardes et al., 2022).

An objective without negatives (I-JEPA, BYOL) can lower its loss by letting the encoder's
embeddings lose dimensions; on its own that is prevented only by the asymmetry of predictor and
EMA target, which at short budgets does not hold (I-JEPA's effective rank fell from 6.2 to 1.8
in 6 epochs on PneumoniaMNIST). C-JEPA (Mo & Tong, NeurIPS 2024) adds VICReg's two terms to
I-JEPA for this reason:

- **variance**: a hinge that keeps each dimension's standard deviation over the batch at least
  ``gamma``: ``mean_d relu(gamma - sqrt(var_d + eps))``;
- **covariance**: the squared off-diagonal entries of the batch covariance, summed and divided by
  ``D``, so no two dimensions carry the same information.

Under DDP the embeddings of every rank are gathered (with gradients) first, so both statistics
are the global batch's.
"""

from __future__ import annotations

import torch

from ..distributed import gather

__all__ = ["variance_covariance"]


def variance_covariance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's ``(variance, covariance)`` terms of embeddings ``z`` ``(B, D)`` (module docstring)."""
    if z.dim() != 2:
        raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(z.shape)}")
    z, _ = gather(z.float())
    if z.shape[0] < 2:
        raise ValueError("the variance and covariance of a batch need at least 2 embeddings")
    z = z - z.mean(0)
    variance = torch.relu(gamma - torch.sqrt(z.var(0) + eps)).mean()
    n, d = z.shape
    cov = z.T @ z / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return variance, off.pow(2).sum() / d
