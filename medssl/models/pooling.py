"""Token sequence -> one vector per image: the three aggregations of the radiograph MAE study."""

from __future__ import annotations

import torch

__all__ = ["POOLINGS", "pool_tokens"]

POOLINGS = ("cls", "mean", "flatten")


def pool_tokens(tokens: torch.Tensor, mode: str, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, P + N, D)`` tokens (P prefix tokens such as CLS) -> ``(B, D)`` or ``(B, N * D)``.

    ``cls``: the CLS token; ``mean``: average of the patch tokens; ``flatten``: all patch tokens
    concatenated (position-aware, but its size depends on the input size).
    """
    if mode == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pooling 'cls' needs a backbone built with cls_token=True")
        return tokens[:, 0]
    if mode == "mean":
        return tokens[:, num_prefix_tokens:].mean(1)
    if mode == "flatten":
        return tokens[:, num_prefix_tokens:].flatten(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
