"""Training on several data sets at once: each batch from one source, the task of each step from its source.

A Medformer run pretrains on, say, PneumoniaMNIST (2D) and AdrenalMNIST3D (3D) together. 2D and 3D
images cannot share a batch, and a task built for 2D patches cannot take a 3D batch, so the
*source* of each step decides both:

- :class:`SourcePlan`: from ``(seed, epoch)`` alone, the source of every step of the epoch (the
  same on every rank, so DDP ranks run the same task) and each rank's batches. Rules:
  ``proportional`` (each source's full batches once per epoch, shuffled: every item at most once),
  ``uniform`` (every source equally often) and ``temperature`` (source ``s`` with probability
  ``n_s ** (1 / T)``, normalised; T = 1 is proportional in expectation, large T tends to uniform).
  Under the last two a source drawn more often than it has batches starts a fresh shuffle of its
  items, one drawn less often leaves some out. The number of steps per epoch is the same under
  every rule (the proportional count), so schedules and resume count on it.
- :class:`SourceBatchSampler`: the loader's batches, as :class:`~.determinism.BinnedBatchSampler`
  keys ``(epoch, position, index)``; ``set_position`` resumes mid-epoch exactly.
- :class:`SourceSchedule`: a task schedule for :class:`~.multitask.MultiTask` whose task at each
  iteration is one of that step's source's tasks (cycling through them when a source has several).

Indices are into the concatenation of the sources (``torch.utils.data.ConcatDataset`` order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError
from .determinism import derive_seed

__all__ = ["SourcePlan", "SourceBatchSampler", "SourceSchedule", "multi_source_loader", "source_tasks", "RULES", "SOURCE_TASKS"]

RULES = ("proportional", "uniform", "temperature")


class SourcePlan:
    """Which source each step of an epoch draws from, and which items each rank's batch holds (see the module docstring)."""

    def __init__(self, sizes: Sequence[int], batch_sizes: int | Sequence[int], rule: str = "proportional", temperature: float = 2.0,
                 seed: int = 0, num_replicas: int = 1) -> None:
        if rule not in RULES:
            raise UserError(f"unknown source rule {rule!r}; choose one of {', '.join(RULES)}")
        sizes = [int(n) for n in sizes]
        if not sizes or min(sizes) < 1:
            raise UserError(f"every source needs at least one item, got sizes {sizes}")
        batch_sizes = [int(batch_sizes)] * len(sizes) if isinstance(batch_sizes, int) else [int(b) for b in batch_sizes]
        if len(batch_sizes) != len(sizes) or min(batch_sizes) < 1:
            raise UserError(f"one batch size >= 1 per source, got {batch_sizes} for {len(sizes)} sources")
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.sizes, self.batch_sizes, self.rule, self.temperature = sizes, batch_sizes, rule, temperature
        self.seed, self.num_replicas = seed, num_replicas
        self.offsets = np.cumsum([0] + sizes[:-1]).tolist()
        # a shuffle of a source's n items gives floor(n / (B * world)) steps of B items per rank (at least one step, of
        # n // world items, when B * world is more than it has); a source with fewer items than ranks gives none
        self.take = [min(b, n // num_replicas) for n, b in zip(sizes, batch_sizes)]
        self.per_round = [max(1, n // (b * num_replicas)) for n, b in zip(sizes, batch_sizes)]
        self.steps_of = [k if n >= num_replicas else 0 for n, k in zip(sizes, self.per_round)]
        if not sum(self.steps_of):
            raise UserError(f"sources of {sizes} items cannot fill one batch on each of {num_replicas} ranks")
        self.steps_per_epoch = sum(self.steps_of)

    def weights(self) -> np.ndarray:
        """Each source's share of the steps (the rule's probabilities; proportional: its batches' share)."""
        counts = np.array(self.steps_of, dtype=float)
        if self.rule == "proportional":
            return counts / counts.sum()
        if self.rule == "uniform":
            w = (counts > 0).astype(float)
        else:
            w = np.where(counts > 0, np.array(self.sizes, dtype=float) ** (1 / self.temperature), 0.0)
        return w / w.sum()

    def sources(self, epoch: int) -> list[int]:
        """The source of each step of ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))
        if self.rule == "proportional":
            steps = torch.tensor([s for s, k in enumerate(self.steps_of) for _ in range(k)])
            return steps[torch.randperm(len(steps), generator=g)].tolist()
        return torch.multinomial(torch.as_tensor(self.weights()), self.steps_per_epoch, replacement=True, generator=g).tolist()

    def _order(self, source: int, epoch: int, rounds: int) -> list[int]:
        """``rounds`` shuffles of ``source``'s items one after another (global indices)."""
        n, offset = self.sizes[source], self.offsets[source]
        out = []
        for r in range(rounds):
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 2, source, r))
            out += (torch.randperm(n, generator=g) + offset).tolist()
        return out

    def batches(self, epoch: int, rank: int = 0) -> list[tuple[int, list[int]]]:
        """``[(source, indices)]`` of ``rank``'s batches in step order."""
        steps = self.sources(epoch)
        need = np.bincount(steps, minlength=len(self.sizes))
        orders = {}
        for s, k in enumerate(need):
            if k:
                orders[s] = self._order(s, epoch, -(-int(k) // self.per_round[s]))
        seen = [0] * len(self.sizes)
        out = []
        for s in steps:
            r, within = divmod(seen[s], self.per_round[s])
            seen[s] += 1
            take = self.take[s]
            start = r * self.sizes[s] + (within * self.num_replicas + rank) * take
            out.append((s, orders[s][start:start + take]))
        return out


class SourceBatchSampler(torch.utils.data.Sampler):
    """The batches of a :class:`SourcePlan` for one rank, as ``(epoch, position, index)`` keys."""

    def __init__(self, plan: SourcePlan, rank: int = 0) -> None:
        self.plan, self.rank = plan, rank
        self.batch_size = max(plan.batch_sizes)  # positions count in steps of the largest batch
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_position(self, epoch: int, start: int = 0) -> None:
        """At ``epoch``, skipping ``start // batch_size`` steps."""
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):  # a generator: the epoch is read at the first batch, after the trainer has positioned it
        epoch, skip = self.epoch, self.start // self.batch_size
        self.epoch, self.start = epoch + 1, 0
        for step, (_, batch) in enumerate(self.plan.batches(epoch, self.rank)):
            if step >= skip:
                yield [(epoch, step * self.batch_size + j, i) for j, i in enumerate(batch)]


class SourceSchedule:
    """The task of each iteration: one of the tasks of that step's source (``task_sources[t]`` is task ``t``'s source).

    Iteration ``i`` (1-based, as the trainer counts) is step ``(i - 1) % steps_per_epoch`` of epoch
    ``(i - 1) // steps_per_epoch``; a source with several tasks gives them its steps in turn, counting
    from the run's start (a source with one step per epoch still runs each of its tasks).
    """

    ALL = -1

    def __init__(self, plan: SourcePlan, task_sources: Sequence[int]) -> None:
        self.plan, self.task_sources = plan, [int(s) for s in task_sources]
        missing = sorted(set(range(len(plan.sizes))) - set(self.task_sources))
        if missing:
            raise UserError(f"source(s) {missing} have no task: every source needs at least one")
        self.tasks_of = {s: [t for t, ts in enumerate(self.task_sources) if ts == s] for s in range(len(plan.sizes))}
        self.n_tasks = len(self.task_sources)
        self.mode = "source"
        self._epoch, self._plan = None, None
        self._before = [np.zeros(len(plan.sizes), dtype=np.int64)]

    def _counts_before(self, epoch: int) -> np.ndarray:
        """How many steps each source had in the epochs before ``epoch`` (so a source's tasks take turns across epochs)."""
        while len(self._before) <= epoch:
            e = len(self._before) - 1
            self._before.append(self._before[-1] + np.bincount(self.plan.sources(e), minlength=len(self.plan.sizes)))
        return self._before[epoch]

    def _epoch_tasks(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            seen = self._counts_before(epoch).copy()
            tasks = []
            for s in self.plan.sources(epoch):
                options = self.tasks_of[s]
                tasks.append(options[int(seen[s]) % len(options)])
                seen[s] += 1
            self._epoch, self._plan = epoch, tasks
        return self._plan

    def __call__(self, iteration: int) -> int:
        epoch, step = divmod(int(iteration) - 1, self.plan.steps_per_epoch)
        return self._epoch_tasks(epoch)[step]

    def tasks_at(self, iteration: int) -> list[int]:
        return [self(iteration)]


def multi_source_loader(datasets: Sequence, batch_sizes: int | Sequence[int], task_sources: Sequence[int], rule: str = "proportional",
                        temperature: float = 2.0, seed: int = 0, num_workers: int = 0, views=None, distributed: bool | None = None,
                        **kwargs):
    """``(loader, schedule)`` over ``datasets`` (one per source): each batch from one source, the task of each step from it.

    ``task_sources[t]`` is the source task ``t`` trains on; give ``schedule`` to
    :class:`~.multitask.MultiTask` (``MultiTask(tasks, schedule=schedule)``) so the task and the
    batch agree. ``views``: one view pipeline (or None) per task, as for
    :func:`~.determinism.pretrain_loader`.
    """
    from monai.data import DataLoader

    from ..data.fields import collate_fields
    from ..distributed import is_distributed, world_size
    from ..distributed import rank as this_rank
    from .determinism import SeededDataset

    if distributed is None:
        distributed = is_distributed()
    world, rank = (world_size(), this_rank()) if distributed else (1, 0)
    plan = SourcePlan([len(d) for d in datasets], batch_sizes, rule, temperature, seed, world)
    schedule = SourceSchedule(plan, task_sources)
    sampler = SourceBatchSampler(plan, rank)
    seeded = SeededDataset(torch.utils.data.ConcatDataset(list(datasets)), seed, views=views, schedule=schedule,
                           batch_size=sampler.batch_size, steps_per_epoch=len(sampler))
    kwargs.setdefault("collate_fn", collate_fields)
    loader = DataLoader(seeded, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0, **kwargs)
    return loader, schedule


#: Tasks a multi-source run can build per source, and the views each needs (made per source's dims and size).
SOURCE_TASKS = ("mae", "simclr", "barlow", "byol", "classify")


def source_tasks(model, sources: Sequence, task_names: Sequence[str], task_options: dict | None = None
                 ) -> tuple[dict, list[int], list]:
    """``(tasks, task_sources, views)``: each of ``task_names`` on each source, on the model's view of its dimensionality.

    Tasks are named ``<task>_<source name>`` (their losses are logged per source under those
    names); ``task_options[name]`` are passed to every ``name`` task. ``classify`` gives each source a head of
    its own (the multi-task supervised variant; a source's ``num_classes``, default 2). Feed ``task_sources`` and
    ``views`` to :func:`multi_source_loader`, ``tasks`` and its schedule to :class:`~.multitask.MultiTask`.
    """
    from ..data.sources import source_name
    from ..data.views import two_views
    from ..tasks.base import build_task

    unknown = sorted(set(task_names) - set(SOURCE_TASKS))
    if unknown:
        raise UserError(f"task(s) {unknown} are not built per source yet; choose from {', '.join(SOURCE_TASKS)}")
    tasks, task_sources, views = {}, [], []
    for i, source in enumerate(sources):
        dims, size = int(source["spatial_dims"]), int(source["image_size"])
        backbone = model.view(dims) if hasattr(model, "view") else model
        if getattr(backbone, "spatial_dims", dims) != dims:
            raise UserError(f"source {source_name(source, i)} is {dims}D and the encoder {backbone.spatial_dims}D; "
                            "a Medformer takes both")
        for name in task_names:
            options = dict((task_options or {}).get(name, {}))
            if name == "classify":
                options.setdefault("num_classes", int(source.get("num_classes", 2)))
            tasks[f"{name}_{source_name(source, i)}"] = build_task(name, backbone, **options)
            task_sources.append(i)
            views.append(None if name in ("mae", "classify") else two_views(spatial_dims=dims, size=size, modality=source.get("modality", "auto")))
    return tasks, task_sources, views
