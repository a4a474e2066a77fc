"""Exponential-moving-average teachers, shared by the tasks that have one (DINO, BYOL, SwAV's none, query boxes).

A teacher is a frozen copy of student modules (:func:`frozen_copy`) moved towards them after every
optimizer step, ``teacher <- m * teacher + (1 - m) * student`` (:func:`ema_update`), with ``m``
rising from ``base`` to 1 on a cosine over training (:func:`ema_momentum`, as DINO and BYOL do).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ema_momentum", "ema_update", "frozen_copy"]


def ema_momentum(progress: float, base: float) -> float:
    """Cosine schedule of the teacher momentum: ``base`` at the start, 1 at the end."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher, student, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter (modules or parameter lists)."""
    teachers = teacher.parameters() if hasattr(teacher, "parameters") else teacher
    students = student.parameters() if hasattr(student, "parameters") else student
    for t, s in zip(teachers, students):
        t.lerp_(s.detach(), 1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off: the start of a teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
