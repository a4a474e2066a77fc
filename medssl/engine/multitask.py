"""Several tasks over one shared backbone, one task per minibatch on a schedule, or all summed.

The seed toolkit samples its tasks cyclically at each minibatch. The schedule is a pure function of
the iteration number, so a resumed run continues with the right task without saving anything.
``schedule="sum"`` runs every task on every minibatch and sums their weighted losses (supervised +
Barlow Twins + BrainFuse on each step, as the second source document trains them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..tasks.base import Task, check_batch
from .determinism import derive_seed

__all__ = ["TaskSchedule", "MultiTask", "ScheduleMismatch", "shared_backbone"]


def shared_backbone(backbone: nn.Module) -> nn.Module:
    """The model a task's backbone is, or is a view of (a :class:`~medssl.models.MedformerView`'s Medformer):
    what tasks share, what is saved as the encoder."""
    from ..models.medformer import MedformerView

    return backbone.model if isinstance(backbone, MedformerView) else backbone


class ScheduleMismatch(UserError, RuntimeError):
    """A batch was made with the views of another task than the one the trainer runs."""


class TaskSchedule:
    """Which task runs at iteration ``i`` (1-based, as ignite counts).

    ``cyclic``: tasks in turn; ``random``: drawn with probabilities ``weights`` from ``(seed, i)``;
    ``sum``: every task at every iteration (``__call__`` returns :data:`ALL`).
    """

    ALL = -1

    def __init__(self, n_tasks: int, mode: str = "cyclic", weights: Sequence[float] | None = None, seed: int = 0) -> None:
        if mode not in ("cyclic", "random", "sum"):
            raise ValueError(f"schedule mode must be 'cyclic', 'random' or 'sum', got {mode!r}")
        weights = list(weights) if weights is not None else [1.0] * n_tasks
        if len(weights) != n_tasks or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need {n_tasks} non-negative schedule weights, got {weights}")
        self.n_tasks, self.mode, self.seed = n_tasks, mode, seed
        self.cumulative = torch.tensor(weights, dtype=torch.float64).cumsum(0) / sum(weights)

    def tasks_at(self, iteration: int) -> list[int]:
        """The indices of the tasks that run at ``iteration``."""
        index = self(iteration)
        return list(range(self.n_tasks)) if index == self.ALL else [index]

    def __call__(self, iteration: int) -> int:
        if self.mode == "sum":
            return self.ALL
        if self.mode == "cyclic":
            return (iteration - 1) % self.n_tasks
        u = torch.rand((), generator=torch.Generator().manual_seed(derive_seed(self.seed, iteration)), dtype=torch.float64)
        return int(torch.searchsorted(self.cumulative, u, right=True).clamp(max=self.n_tasks - 1))


class MultiTask(nn.Module):
    """Tasks sharing one backbone; ``forward(batch, iteration)`` runs the scheduled task.

    Returns the task's dict with its loss scaled by the task's ``loss_weights`` entry, every value
    also under ``"<task>/<key>"`` for per-task logging, and ``"task"``: the task's index. With the
    ``sum`` schedule every task runs, ``"loss"`` is the sum of their weighted losses and ``"task"`` is -1.
    """

    def __init__(self, tasks: Task | Sequence[Task] | Mapping[str, Task], schedule="cyclic",
                 schedule_weights: Sequence[float] | None = None, loss_weights: Mapping[str, float] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(tasks, Task):
            tasks = [tasks]
        if not isinstance(tasks, Mapping):
            names = [t.name for t in tasks]
            if len(set(names)) != len(names):
                raise ValueError(f"tasks share a name ({names}); pass a dict of distinct names to tasks")
            tasks = {t.name: t for t in tasks}
        if not tasks:
            raise ValueError("MultiTask needs at least one task")
        roots = {id(shared_backbone(t.backbone)) for t in tasks.values()}
        if len(roots) != 1:
            raise ValueError("all tasks must share one backbone object")
        self.tasks = nn.ModuleDict(tasks)
        self.backbone = shared_backbone(next(iter(tasks.values())).backbone)
        self.names = list(tasks)
        if isinstance(schedule, str):
            schedule = TaskSchedule(len(tasks), schedule, schedule_weights, seed)
        elif getattr(schedule, "n_tasks", None) != len(tasks):
            raise ValueError(f"the schedule is for {getattr(schedule, 'n_tasks', '?')} tasks, there are {len(tasks)}")
        self.schedule = schedule
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in self.names}

    def forward(self, batch: dict, iteration: int = 1) -> dict[str, torch.Tensor]:
        index = self.schedule(iteration)
        made_for = batch.get("view_task")
        if made_for is not None and bool((made_for != index).any()):
            made = int(made_for.flatten()[0])
            raise ScheduleMismatch(f"iteration {iteration} runs {self._label(index)} but its batch holds views made for "
                               f"{self._label(made)}: the loader's schedule or epoch length differs "
                               "from the trainer's (build the loader with views=..., schedule=multitask.schedule)")
        if index != TaskSchedule.ALL:
            out = self._run(self.names[index], batch)
            out["task"] = torch.tensor(index)
            return out
        parts, total = {}, None
        for name in self.names:
            part = self._run(name, batch)
            total = part["loss"] if total is None else total + part["loss"]
            parts.update({k: v for k, v in part.items() if "/" in k})
        return {"loss": total, **parts, "task": torch.tensor(TaskSchedule.ALL)}

    def _label(self, index: int) -> str:
        return "every task (sum)" if index == TaskSchedule.ALL else f"task {self.names[index]!r}"

    def _run(self, name: str, batch: dict) -> dict[str, torch.Tensor]:
        check_batch(self.tasks[name], batch)
        out = dict(self.tasks[name](batch))
        out["loss"] = out["loss"] * self.loss_weights[name]
        out.update({f"{name}/{k}": v for k, v in list(out.items())})
        return out

    def step_start(self, progress: float) -> None:
        """Tell every task how far training is (``iteration / total``) before the step."""
        for task in self.tasks.values():
            task.step_start(progress)

    def step_end(self, progress: float) -> None:
        """After every optimizer step, whichever task ran it (EMA teachers follow the shared backbone)."""
        for task in self.tasks.values():
            task.step_end(progress)
