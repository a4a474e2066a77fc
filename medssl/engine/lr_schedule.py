"""Linear warm-up then cosine decay, per iteration (the MAE/DINO recipe)."""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "warmup_cosine"]


class WarmupCosine:
    """LR multiplier at step ``i``: ``i / warmup`` during warm-up, then cosine from 1 to ``min_ratio``.

    A plain callable object (not a lambda), so ``LambdaLR.state_dict`` stores its numbers and a
    checkpoint loads with ``weights_only=True``.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        self.total_steps, self.warmup_steps, self.min_ratio = max(1, int(total_steps)), max(0, int(warmup_steps)), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                  warmup_fraction: float = 0.05, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine`; step it once per iteration.

    The warm-up lasts ``warmup_steps``, or ``warmup_fraction`` of ``total_steps`` when not given.
    """
    if warmup_steps is None:
        warmup_steps = round(total_steps * warmup_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio))
