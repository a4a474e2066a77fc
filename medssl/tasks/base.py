"""The contract every pretraining task follows, and the registry that names them.

A task is an ``nn.Module`` that holds a reference to the shared backbone plus its own heads, and
maps a batch to ``{"loss": scalar, ...anything worth logging}``. The trainer never looks at a
task's name: adding a task is one file, one :func:`register_task` line and a contract test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Task", "TASKS", "register_task", "build_task"]

TASKS: dict[str, type[Task]] = {}


class Task(nn.Module):
    """Base class: ``forward(batch) -> {"loss": Tensor, ...}``; ``visualize(batch)`` for pictures."""

    name = "task"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named image tensors shaped like ``batch["image"]`` to draw side by side (none by default)."""
        return {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a task buildable by ``name``."""

    def add(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {TASKS[name].__name__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def build_task(name: str, backbone: nn.Module, **kwargs) -> Task:
    """Instantiate the task registered as ``name`` on ``backbone``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](backbone, **kwargs)
