"""The contract every pretraining task follows, and the registry that names them.

A task is an ``nn.Module`` that holds a reference to the shared backbone plus its own heads, and
maps a batch to ``{"loss": scalar, ...anything worth logging}``. The trainer never looks at a
task's name: adding a task is one file, one :func:`register_task` line and a contract test
(``docs/adding-a-task.md`` walks through the jigsaw task).

The backbone is an :class:`~medssl.models.base.Encoder` (a task that masks tokens needs a
:class:`~medssl.models.base.GridEncoder`). Tasks call it only through :meth:`Task.encode` /
:meth:`Task.embed`, which hand it the batch's conditioning (modality, spatial dims, source ids).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from ..models.base import Encoder, batch_context, embed, encode
from .token_drop import dropped_embedding

__all__ = ["Task", "TASKS", "register_task", "build_task", "check_batch", "MissingBatchKeys"]

TASKS: dict[str, type[Task]] = {}


class Task(nn.Module):
    """Base class: ``forward(batch) -> {"loss": Tensor, ...}``; ``visualize(batch)`` for pictures.

    ``required_keys`` names the batch entries the task reads (its views come from the data
    pipeline, :mod:`medssl.data.views`); a batch without them is refused with a clear error.
    """

    required_keys: tuple[str, ...] = ("image",)

    name = "task"

    #: ``per_sample_loss(batch) -> (B,)``: each sample's own loss, for tasks whose loss is a mean over
    #: independent samples (the supervised task). DBA differentiates it per sample; None (the
    #: default, every self-supervised task: their losses couple a batch's samples) refuses DBA.
    per_sample_loss = None

    def __init__(self, backbone: Encoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.progress = 0.0

    def encode(self, batch: dict | None, x: torch.Tensor, keep: torch.Tensor | None = None,
               encoder: nn.Module | None = None) -> torch.Tensor:
        """Tokens ``(B', P + N, D)`` of ``x`` (images or views of ``batch``), conditioned on the batch.

        ``encoder`` defaults to the shared backbone (DINO passes its teacher). ``x`` may hold
        several views per image stacked view-major, ``(V * B, C, *S)``; the context follows.
        """
        return encode(encoder if encoder is not None else self.backbone, x, keep, batch_context(batch))

    def embed(self, batch: dict | None, x: torch.Tensor, pooling: str, encoder: nn.Module | None = None,
              drop: float = 0.0) -> torch.Tensor:
        """One pooled vector per row of ``x`` (see :meth:`encode`).

        ``drop`` > 0: in training, the encoder sees only ``1 - drop`` of each view's patch tokens
        (:mod:`medssl.tasks.token_drop`, FLIP); in evaluation it sees them all.
        """
        encoder = encoder if encoder is not None else self.backbone
        if drop > 0 and self.training:
            return dropped_embedding(encoder, x, drop, pooling, batch_context(batch))
        return embed(encoder, x, pooling, batch_context(batch))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_start(self, progress: float) -> None:
        """Called before every training step with ``progress`` = iteration / total iterations in (0, 1].

        Tasks with schedules (DINO's teacher temperature) read it; it is a pure function of the
        iteration, so a resumed run sees the same values.
        """
        self.progress = float(progress)

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        """Called after every optimizer step, whichever task ran it: each of :meth:`teachers` moves
        towards its student, ``t <- m * t + (1 - m) * s`` with ``m = ema_momentum(progress, self.momentum)``
        (EMA teachers follow the shared backbone through every task's updates)."""
        pairs = self.teachers()
        if pairs:
            from .ema import ema_momentum, ema_update

            momentum = ema_momentum(progress, self.momentum)
            for teacher, student in pairs:
                ema_update(teacher, student, momentum)

    def teachers(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(teacher, student)`` pairs of the EMA copies this task keeps (none by default). They follow
        their students in :meth:`step_end`; a run that starts from another encoder resets them to it."""
        return []

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named image tensors shaped like ``batch["image"]`` to draw side by side (none by default)."""
        return {}


class MissingBatchKeys(UserError, KeyError):
    """A batch lacks keys its task reads (typically: the task's view pipeline was not given)."""


def check_batch(task: Task, batch: dict) -> None:
    """Raise :class:`MissingBatchKeys` (a ``KeyError``) naming what is missing when ``batch`` lacks ``task.required_keys``."""
    missing = [k for k in task.required_keys if k not in batch]
    if missing:
        raise MissingBatchKeys(f"task {task.name!r} needs batch keys {list(task.required_keys)}, missing {missing} "
                       f"(batch has {sorted(batch)}); give the task its view pipeline (medssl.data.views)")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a task buildable by ``name``."""

    def add(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {TASKS[name].__name__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def build_task(name: str, backbone: Encoder, **kwargs) -> Task:
    """Instantiate the task registered as ``name`` on ``backbone``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](backbone, **kwargs)
