"""The part DBA and EDBA share: an optimizer wrapped around SGD / Adam / AdamW that also owns the batch size.

The wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups`` are the wrapped optimizer's
(the same dicts: LR schedulers, layer-wise LR decay and MONAI's checkpoint handlers see one
optimizer), as timm's Lookahead does. A subclass fills the gradients itself in
``compute_gradients(task, batch)`` (the engine calls it instead of ``loss.backward()``) and
decides the next epoch's batch size in ``_decide()``; ``step`` is the wrapped optimizer's.
``state_dict`` holds the wrapped optimizer's state and the batch-size state, so a resumed run
continues with the same batch size and the same epoch statistics.
"""

from __future__ import annotations

import torch

__all__ = ["AdaptiveOptimizer"]


class AdaptiveOptimizer(torch.optim.Optimizer):
    """Base of :class:`~medssl.optim.DBA` and :class:`~medssl.optim.EDBA` (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, batch_size: int, min_batch_size: int, max_batch_size: int, delta: int) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wraps a torch optimizer (SGD, Adam, AdamW), got {type(optimizer).__name__}")
        if not 1 <= min_batch_size <= batch_size <= max_batch_size:
            raise ValueError(f"need 1 <= min_batch_size <= batch_size <= max_batch_size, got {min_batch_size}, {batch_size}, "
                             f"{max_batch_size}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.batch_size, self.min_batch_size, self.max_batch_size, self.delta = int(batch_size), min_batch_size, max_batch_size, delta
        self.epoch_values: list[float] = []  # what this epoch's steps measured (selected sizes, metric values)
        self.history: list[dict] = []  # per finished epoch: the batch size it ran at, its statistic, the next size

    @torch.no_grad()
    def step(self, closure=None):
        return self.optimizer.step(closure)

    def compute_gradients(self, task: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decide(self) -> tuple[int, float]:
        """``(next batch size, the epoch's statistic)`` from ``epoch_values``."""
        raise NotImplementedError

    def next_batch_size(self) -> int:
        """End of an epoch: the batch size of the next one (the engine hands it to the loader)."""
        if self.epoch_values:
            size, statistic = self._decide()
            self.history.append({"batch_size": self.batch_size, "statistic": statistic, "next": size})
            self.batch_size = size
        self.epoch_values = []
        return self.batch_size

    def state_dict(self) -> dict:
        return {"inner": self.optimizer.state_dict(),
                "adaptive": {"batch_size": self.batch_size, "epoch_values": list(self.epoch_values),
                             "history": [dict(h) for h in self.history], **self._extra_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        own = state_dict["adaptive"]
        self.batch_size, self.epoch_values, self.history = int(own["batch_size"]), list(own["epoch_values"]), list(own["history"])
        self._load_extra_state(own)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass
