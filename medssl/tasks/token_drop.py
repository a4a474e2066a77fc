"""Token dropping for view encodings (FLIP: Li et al., 2023, arXiv:2212.00794): encode a random
share of each view's patch tokens only, so a two-view objective's step costs less and it gets
more steps in the same compute.

FLIP drops 50 % of the image tokens of a contrastive model and trains 2-3x faster at equal or
better accuracy for the same wall time; MSN (Assran et al., 2022) drops tokens of the anchor
view of a prototype method. The tokens are drawn as MAE's are (:func:`~medssl.tasks.masking.sample_mask`:
the same number per attention window, so windowed backbones take them), during training only;
the pooled vector is the CLS token or the mean of the kept tokens.
"""

from __future__ import annotations

import math

import torch

from ..models.base import encode
from ..models.pooling import pool_tokens
from .masking import sample_mask

__all__ = ["dropped_embedding", "pool_kept", "token_drop_share"]


def token_drop_share(value: float) -> float:
    """``value`` as a task's ``token_drop`` setting, refused outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"token_drop must be in [0, 1), got {value}")
    return float(value)


def pool_kept(tokens: torch.Tensor, keep: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, P + L, D)`` tokens of the ``keep`` slots ``(B, L)`` (-1: padding) -> ``(B, D)``: CLS or the kept tokens' mean."""
    if pooling == "cls":
        return pool_tokens(tokens, "cls", num_prefix_tokens)
    if pooling == "mean":
        weight = (keep >= 0).to(tokens.dtype).unsqueeze(-1)
        return (tokens[:, num_prefix_tokens:] * weight).sum(1) / weight.sum(1).clamp(min=1)
    raise ValueError(f"token dropping pools with 'cls' or 'mean', not {pooling!r} (a flattened vector needs every token)")


def dropped_embedding(encoder, x: torch.Tensor, drop: float, pooling: str, context=None) -> torch.Tensor:
    """One vector per row of ``x`` from ``encoder`` seeing ``1 - drop`` of each attention window's patch tokens."""
    grid = encoder.grid_size(x.shape[2:])
    everything = torch.ones(x.shape[0], math.prod(grid), dtype=torch.bool, device=x.device)
    keep = sample_mask(everything, drop, encoder.layout(grid, x.device)).keep
    return pool_kept(encode(encoder, x, keep, context), keep, pooling, encoder.num_prefix_tokens)
