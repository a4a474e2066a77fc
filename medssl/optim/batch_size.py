"""DBA's batch-size rule (the source's equation 1), applied after each epoch.

``next = current + delta`` when ``q > 0.8 * current``, ``current - delta`` when ``q < 0.2 * current``,
else ``current``, kept within ``[low, high]``; ``q`` is the median (50th percentile) of the batch
sizes the selection chose during the epoch. Selection that keeps nearly every sample asks for more
samples; selection that keeps few asks for fewer. ``current`` is the batch the epoch had: with less
data than the batch size, all of the data (see :attr:`medssl.optim.adaptive.AdaptiveOptimizer.current`).
"""

from __future__ import annotations

__all__ = ["batch_size_rule"]


def batch_size_rule(current: int, q: float, delta: int, low: int, high: int, grow: float = 0.8, shrink: float = 0.2) -> int:
    """The next epoch's batch size from this epoch's median selected batch size ``q``."""
    if q > grow * current:
        current += delta
    elif q < shrink * current:
        current -= delta
    return int(min(high, max(low, current)))
