"""Where this process stands in a ``torch.distributed`` run (rank 0 and a world of 1 without one)."""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "gather", "mean_over_ranks", "sync_batch_norm"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, pictures, logs and progress."""
    return rank() == 0


def gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``z`` concatenated along dimension 0, and this rank's offset in it.

    Gradients flow back to each rank's own share: the backward of the gather sums the ranks'
    gradients, and DDP's averaging of parameter gradients then gives the global batch's gradient
    (what SimCLR's and Barlow Twins' global-batch losses need). With one process ``z`` is
    returned as it is.
    """
    if world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z)), rank() * z.shape[0]


@torch.no_grad()
def mean_over_ranks(z: torch.Tensor) -> torch.Tensor:
    """``z`` averaged over all ranks (in place; no gradient), e.g. DINO's centre."""
    if is_distributed():
        torch.distributed.all_reduce(z)
        z /= world_size()
    return z


def sync_batch_norm(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``module`` with its BatchNorm layers synchronised over ranks (``torch.nn.SyncBatchNorm``).

    Done when ``enabled``, more than one process runs and the module's parameters are on a device
    SyncBatchNorm supports (CUDA / XPU); on CPU (gloo) PyTorch has no SyncBatchNorm, so the
    statistics stay each rank's own, which is said once in the log. Call it before wrapping the
    module in ``DistributedDataParallel``.
    """
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if not (enabled and has_bn and world_size() > 1):
        return module
    device = next(module.parameters()).device
    if device.type not in ("cuda", "xpu"):
        import logging

        if rank() == 0:
            logging.getLogger(__name__).info("BatchNorm statistics stay per rank: SyncBatchNorm needs a GPU (device %s)", device)
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
