"""Label fractions: a stratified share of the training labels that keeps every class."""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_subset"]


def stratified_subset(labels: np.ndarray, fraction: float, seed: int = 0, min_per_class: int = 1) -> np.ndarray:
    """Sorted indices of about ``fraction`` of ``labels``, drawn per class, each class kept.

    Each class contributes ``round(fraction * count)`` items but at least ``min_per_class`` (or all
    it has), so 1 % of a small, imbalanced set still contains every class.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = min(len(members), max(min_per_class, int(round(fraction * len(members)))))
        chosen.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(chosen))
