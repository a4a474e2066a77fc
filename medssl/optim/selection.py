"""Which strides of a layer's gradients make its update (DBA's ``SplitStrides`` and ``SelectionStrategy``).

The batch is cut into strides of ``stride_size`` consecutive samples (the last may be shorter);
each stride's gradient ``s_a`` (the sum of its samples', from
:func:`~.per_sample.stride_gradients`) and its mean ``m_a = s_a / n_a`` are the units of selection.
``sigma^2``, the spread of one stride's mean, is estimated once from all ``S`` strides
(``sum ||m_a - mean||^2 / (S - 1)``). A set ``K`` of ``k`` strides, with average ``m``, is judged by

- ``gradient_norm``: the estimated squared norm of the gradient its strides share, maximised:
  ``||m||^2 - sigma^2 / k`` (``||m||^2`` carries noise ``sigma^2 / k``; what is left estimates the
  signal). Consistent strides raise it (less noise, same signal), conflicting ones lower it;
- ``variance_norm``: the noise of the update relative to its size, minimised: ``(sigma^2 / k) / ||m||^2``;
- ``all``: every stride: the plain mean gradient, exactly.

The noise is the batch's, not the chosen set's own spread: a set chosen for agreeing would
otherwise look less noisy than it is, and pairs of strides that agree by chance would win. The
search is greedy and forward: the best single stride, then repeatedly the stride whose addition
scores best, which gives one candidate set per size; the best of them is kept (of equally good ones
the largest). Everything comes from the ``S x S`` Gram matrix of the stride means (summed over a
layer's parameters), so selection costs one pass over the stride gradients plus ``O(S^2)`` work.
The source (Simionescu, "Dynamic Batch Adaptation", arXiv 2208.00815) names the two strategies and
the stride split but gives no formulas and no code: these definitions are ours. The kept gradient
is the mean over the kept strides' samples, ``sum s_a / sum n_a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
    gram = (gram / counts[:, None] / counts[None, :]).cpu().numpy()  # <m_a, m_b>
    keep = _greedy(gram, strategy)
    return torch.as_tensor(sorted(keep), device=parts[0].device)


def _score(total: np.ndarray, k: int, noise: float, strategy: str) -> np.ndarray:
    """The strategy's score (higher is better) of sets of ``k`` strides with ``total = sum_ab <m_a, m_b>``."""
    mean_sq = total / k ** 2
    if strategy == "gradient_norm":
        return mean_sq - noise / k
    return -(noise / k) / np.maximum(mean_sq, 1e-300)


def _greedy(gram: np.ndarray, strategy: str) -> list[int]:
    n = len(gram)
    d = np.diag(gram)
    noise = max(float(d.sum() - gram.sum() / n) / (n - 1), 0.0)  # sigma^2: the spread of one stride's mean
    scores = _score(d, 1, noise, strategy)
    first = int(np.argmax(scores))
    chosen, best_set, best_score = [first], [first], float(scores[first])
    inside = np.zeros(n, bool)
    inside[first] = True
    rows, total = gram[first].copy(), float(d[first])  # rows[c]: sum over the chosen of <m_a, m_c>
    while len(chosen) < n:
        scores = _score(total + 2 * rows + d, len(chosen) + 1, noise, strategy)
        scores[inside] = -np.inf
        c = int(np.argmax(scores))
        chosen.append(c)
        inside[c] = True
        total, rows = total + 2 * rows[c] + d[c], rows + gram[c]
        if scores[c] >= best_score:
            best_set, best_score = list(chosen), float(scores[c])
    return best_set
