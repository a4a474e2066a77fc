"""Sinkhorn-Knopp equal-partition assignments (Cuturi 2013), as SwAV (Caron et al., 2020) and
DINOv2's teacher centring (Oquab et al., 2023) use them: prototype scores of a batch become soft
assignments in which every prototype gets an equal share of the batch, so a batch whose images
score almost alike is still spread over the prototypes instead of sitting at one (or at the
uniform answer). Distributed-aware: the sums run over every rank's batch.
"""

from __future__ import annotations

import math

import torch

from ..distributed import is_distributed, world_size

__all__ = ["sinkhorn"]


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft equal-partition assignments ``(B, K)`` from prototype scores ``(B, K)`` (all ranks' batches together).

    ``Q = exp(scores / epsilon)`` is alternately normalised so that every prototype receives
    ``N / K`` of the ``N`` images of the global batch and every image a total of 1 (rows sum to 1
    exactly after the last step; columns to ``N / K`` up to the iterations' convergence). Computed
    in the log domain, so a small ``epsilon`` neither overflows ``exp`` nor empties a prototype
    whose every score underflows (the reference's form does both once ``scores / epsilon``
    spans about 100).
    """
    log_q = scores.float().T / epsilon  # (K, B)
    k, n = log_q.shape[0], log_q.shape[1] * world_size()
    for _ in range(iterations):
        log_q = log_q - _all_logsumexp(log_q) - math.log(k)  # each prototype: total 1 / K (over every rank's images)
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - math.log(n)  # each image: total 1 / N
    return (log_q.exp() * n).T


def _all_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of each row of ``x`` ``(K, B)`` over the images of every rank ``(K, 1)``."""
    if not is_distributed():
        return x.logsumexp(dim=1, keepdim=True)
    top = x.amax(dim=1, keepdim=True)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    total = (x - top).exp().sum(dim=1, keepdim=True)
    torch.distributed.all_reduce(total)
    return top + total.log()
