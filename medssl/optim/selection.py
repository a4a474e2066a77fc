"""Which of a layer's per-sample gradients make its update (DBA's ``SplitStrides`` and ``SelectionStrategy``).

A layer's ``B`` per-sample gradients (rows of ``(B, P)``) are cut into strides of ``stride_size``
consecutive samples (the last may be shorter). The strides are ranked by how well their mean
agrees with the batch's (cosine, highest first), and the strategy picks how many of the ranked
strides to keep (a prefix of ``k``), judging the chosen samples' gradients ``g_1 .. g_n`` by

- ``gradient_norm``: the estimated squared norm of their expected gradient, maximised:
  ``||mean||^2 - tr(cov) / n``. ``||mean||^2`` alone grows as ``n`` shrinks (noise does not
  cancel); subtracting the noise it carries, ``tr(cov) / n``, leaves an unbiased estimate of the
  signal the chosen samples share;
- ``variance_norm``: the update's noise relative to its size, minimised: ``(tr(cov) / n) / ||mean||^2``
  (the spread of the mean over its squared norm): consistent samples lower it, conflicting ones raise it;
- ``all``: every stride (the plain mean gradient, exactly).

The source (Simionescu, "Dynamic Batch Adaptation", arXiv 2208.00815) names the two strategies and
the stride split but gives no formulas and no code; these definitions are ours. ``cov`` is the
unbiased sample covariance, so a candidate needs two samples; a stride of one sample alone is
kept only when the batch has no more.
"""

from __future__ import annotations

import torch

from .names import STRATEGIES

__all__ = ["STRATEGIES", "select_strides", "stride_ids"]


def stride_ids(batch: int, stride_size: int) -> torch.Tensor:
    """The stride each of ``batch`` samples belongs to (consecutive runs of ``stride_size``)."""
    if stride_size < 1:
        raise ValueError(f"stride_size must be >= 1, got {stride_size}")
    return torch.arange(batch) // stride_size


def select_strides(grads: torch.Tensor, stride_size: int, strategy: str = "variance_norm") -> torch.Tensor:
    """The sample indices (sorted) of the strides ``strategy`` keeps, from per-sample gradients ``(B, P)``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    batch = len(grads)
    ids = stride_ids(batch, stride_size).to(grads.device)
    n_strides = int(ids[-1]) + 1
    if strategy == "all" or n_strides == 1:
        return torch.arange(batch, device=grads.device)
    g = grads.flatten(1).double()
    sums = torch.zeros(n_strides, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, ids, g)
    squares = torch.zeros(n_strides, dtype=g.dtype, device=g.device).index_add_(0, ids, (g * g).sum(1))
    counts = torch.bincount(ids, minlength=n_strides).to(g.dtype)
    mean = sums.sum(0) / batch
    agreement = torch.nn.functional.cosine_similarity(sums / counts[:, None], mean[None], dim=1)
    order = torch.argsort(-agreement, stable=True)
    cum_sum, cum_sq, n = sums[order].cumsum(0), squares[order].cumsum(0), counts[order].cumsum(0)
    mean_sq = (cum_sum * cum_sum).sum(1) / n ** 2
    trace = (cum_sq - n * mean_sq) / (n - 1).clamp_min(1)  # unbiased tr(cov) of the first k strides' samples
    noise = trace.clamp_min(0) / n
    if strategy == "gradient_norm":
        score = mean_sq - noise
    else:
        score = -noise / mean_sq.clamp_min(torch.finfo(g.dtype).tiny)
    score = torch.where(n >= 2, score, torch.full_like(score, -torch.inf))
    k = int(torch.argmax(score)) + 1  # the first best prefix
    keep = torch.isin(ids, order[:k])
    return torch.nonzero(keep).flatten()
