"""Which strides of a layer's gradients make its update (DBA's ``SplitStrides`` and ``SelectionStrategy``).

The batch is cut into strides of ``stride_size`` consecutive samples (the last may be shorter);
each stride's gradient ``s_a`` (the sum of its samples', from
:func:`~.per_sample.stride_gradients`) and its mean ``m_a = s_a / n_a`` are the units of selection.
The strides are ranked by how well their mean agrees with the batch's (cosine, highest first), and
the strategy picks how many of the ranked strides to keep (a prefix of ``k >= 2``), judging the
chosen strides' means ``m_1 .. m_k`` (their average ``m``, the noise of that average
``v = sum ||m_a - m||^2 / (k (k - 1))``, an unbiased estimate of ``tr Cov(m)``) by

- ``gradient_norm``: the estimated squared norm of their expected gradient, maximised:
  ``||m||^2 - v``. ``||m||^2`` alone grows as ``k`` shrinks (noise cancels less); subtracting the
  noise it carries leaves an unbiased estimate of the signal the chosen strides share;
- ``variance_norm``: the update's noise relative to its size, minimised: ``v / ||m||^2``;
  consistent strides lower it, conflicting ones raise it;
- ``all``: every stride: the plain mean gradient, exactly.

Everything is computed from the ``S x S`` Gram matrix of the stride means (summed over a layer's
parameters), so selection costs one pass over the stride gradients. The source (Simionescu,
"Dynamic Batch Adaptation", arXiv 2208.00815) names the two strategies and the stride split but
gives no formulas and no code: these definitions are ours. The kept gradient is the mean over the
kept strides' samples, ``sum s_a / sum n_a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .names import STRATEGIES

__all__ = ["STRATEGIES", "select_strides"]


def select_strides(stride_grads: torch.Tensor | Sequence[torch.Tensor], counts: torch.Tensor, strategy: str = "variance_norm"
                   ) -> torch.Tensor:
    """The indices (sorted) of the strides ``strategy`` keeps.

    ``stride_grads``: one layer's per-stride gradient sums, a tensor ``(S, ...)`` or a list of them
    (the layer's parameters); ``counts``: the samples in each stride ``(S,)``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    parts = [stride_grads] if isinstance(stride_grads, torch.Tensor) else list(stride_grads)
    n_strides = len(parts[0])
    if strategy == "all" or n_strides <= 2:
        return torch.arange(n_strides, device=parts[0].device)
    counts = counts.to(parts[0].device, torch.float64)
    gram = sum(p.flatten(1).float() @ p.flatten(1).float().T for p in parts).double()
    gram = gram / counts[:, None] / counts[None, :]  # <m_a, m_b>
    total = (gram * counts[None, :]).sum(1) / counts.sum()  # <m_a, batch mean>
    agreement = total / gram.diagonal().clamp_min(1e-300).sqrt()
    order = torch.argsort(-agreement, stable=True)
    ranked = gram[order][:, order]
    k = torch.arange(1, n_strides + 1, dtype=torch.float64, device=gram.device)
    prefix_sum = ranked.cumsum(0).cumsum(1).diagonal()  # ||sum of the first k means||^2
    mean_sq = prefix_sum / k ** 2
    spread = ranked.diagonal().cumsum(0) - k * mean_sq  # sum ||m_a - m||^2
    noise = (spread / (k * (k - 1)).clamp_min(1)).clamp_min(0)
    score = mean_sq - noise if strategy == "gradient_norm" else -noise / mean_sq.clamp_min(1e-300)
    score = torch.where(k >= 2, score, torch.full_like(score, -torch.inf))
    best = int(torch.argmax(score)) + 1  # the first best prefix
    return torch.sort(order[:best]).values
