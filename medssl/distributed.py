"""Where this process stands in a ``torch.distributed`` run (rank 0 and a world of 1 without one)."""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "rank", "world_size", "is_main_process"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, pictures, logs and progress."""
    return rank() == 0
