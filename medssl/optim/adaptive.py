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
        self.epoch_largest = 0  # the largest batch this epoch had (smaller than batch_size when the data is)
        self.history: list[dict] = []  # per finished epoch: the batch size it ran at, its statistic, the next size

    @torch.no_grad()
    def step(self, closure=None):
        return self.optimizer.step(closure)

    def compute_gradients(self, task: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decide(self) -> tuple[int, float]:
        """``(next batch size, the epoch's statistic)`` from ``epoch_values`` (and :attr:`current`)."""
        raise NotImplementedError

    def saw_batch(self, size: int) -> None:
        """A step ran on ``size`` samples."""
        self.epoch_largest = max(self.epoch_largest, int(size))

    @property
    def current(self) -> int:
        """The batch size the epoch actually had: ``batch_size``, or all the data when there is less."""
        return min(self.batch_size, self.epoch_largest) if self.epoch_largest else self.batch_size

    def next_batch_size(self) -> int:
        """End of an epoch: the batch size of the next one (the engine hands it to the loader).

        A batch larger than the data is the data: the size neither grows past it nor shrinks
        because of a comparison with samples that were never there.
        """
        if self.epoch_values:
            size, statistic = self._decide()
            if self.epoch_largest and self.epoch_largest < self.batch_size:
                size = min(size, max(self.min_batch_size, self.epoch_largest))
            self.history.append({"batch_size": self.batch_size, "statistic": statistic, "next": size})
            self.batch_size = size
        self.epoch_values, self.epoch_largest = [], 0
        return self.batch_size

    def state_dict(self) -> dict:
        return {"inner": self.optimizer.state_dict(),
                "adaptive": {"batch_size": self.batch_size, "epoch_values": list(self.epoch_values), "epoch_largest": self.epoch_largest,
                             "history": [dict(h) for h in self.history], **self._extra_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        own = state_dict["adaptive"]
        self.batch_size, self.epoch_values, self.history = int(own["batch_size"]), list(own["epoch_values"]), list(own["history"])
        self.epoch_largest = int(own.get("epoch_largest", 0))
        self._load_extra_state(own)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass
