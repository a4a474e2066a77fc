"""Reproducible data order and augmentation that survive ``--resume`` and any number of workers.

Three rules make a run a pure function of its seed:

1. :class:`EpochSampler` draws each epoch's order from ``(seed, epoch)`` and yields
   ``(epoch, position, index)``; after a resume it starts mid-epoch at the right item.
2. :class:`SeededDataset` re-seeds the MONAI transform chain from ``(seed, epoch, index)`` before
   every item, so an item's random patches and augmentations do not depend on which worker made
   it, nor on what came before (MONAI's own scheme seeds each worker once, so a resumed run would
   draw different patches). With per-task ``views`` it also knows, from the item's position,
   which iteration the item belongs to, asks the task schedule which task runs then, and applies
   only that task's view pipeline (DINO's multi-crop is not computed for an MAE minibatch).
3. The trainer seeds torch from ``(seed, iteration, rank)`` before every step, so masks and
   dropout replay too.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import DataLoader

from ..data.fields import collate_fields
from ..distributed import is_distributed, world_size
from ..distributed import rank as this_rank

__all__ = ["derive_seed", "EpochSampler", "BinnedBatchSampler", "AdaptiveBatchSampler", "SeededDataset", "pretrain_loader"]


def derive_seed(*keys: int) -> int:
    """A well-mixed 31-bit seed from integers (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices, one permutation per epoch from ``(seed, epoch)``, sharded over DDP ranks.

    Yields ``(epoch, position, index)``, ``position`` counting this rank's items within the epoch.
    The sampler counts epochs itself (each ``iter`` is the next epoch);
    :meth:`set_position` puts it at ``epoch`` skipping ``start`` items, which is how a resumed run
    continues in the middle of an epoch.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch))).tolist()
        else:
            order = list(range(self.size))
        order += order[: len(self) * self.num_replicas - self.size]  # equal share per rank
        mine = order[self.rank:: self.num_replicas]
        return iter([(epoch, start + k, i) for k, i in enumerate(mine[start:])])


class AdaptiveBatchSampler(torch.utils.data.Sampler):
    """Batches of ``sampler``'s indices whose size may change between epochs (DBA and EDBA set it).

    ``batch_size`` is read when an epoch starts; the engine sets it after each epoch from the
    optimizer's :meth:`next_batch_size`. A last batch of one item is dropped when the epoch has more
    than two (``drop_single``: one item breaks batch norm and gives no per-sample contrast).
    """

    def __init__(self, sampler, batch_size: int, drop_single: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.drop_single = sampler, int(batch_size), drop_single

    def __len__(self) -> int:
        n = len(self.sampler)
        return -(-n // self.batch_size) - int(self.drop_single and n > 2 and n % self.batch_size == 1)

    def __iter__(self):
        size, n = self.batch_size, len(self.sampler)
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == size:
                yield batch
                batch = []
        if batch and not (self.drop_single and n > 2 and len(batch) == 1):
            yield batch


class BinnedBatchSampler(torch.utils.data.Sampler):
    """Batches drawn within bins (:mod:`medssl.data.binning`), every item exactly once per epoch over all ranks.

    Each epoch, from ``(seed, epoch)``: every bin's items are shuffled and cut into
    ``ceil(n / batch_size)`` batches of near-equal size (between about half and ``batch_size``
    items, never more); while the number of batches is not a multiple of the world size the
    largest batch is halved; the batches are shuffled and dealt to the ranks in turn. The number of
    batches per epoch depends only on the bins' sizes, so it is the same every epoch (what the LR
    schedule and resume count on). Yields lists of :class:`EpochSampler`-style keys
    ``(epoch, position, index)`` with ``position = step * batch_size + j``, so
    :class:`SeededDataset` maps items to iterations as with fixed batches.

    Under DDP the ranks' batches of one step may differ in size by a few items; DDP averages the
    ranks' mean gradients, so such a step weights items slightly unequally.
    """

    def __init__(self, keys, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not keys:
            raise ValueError("cannot sample from an empty dataset")
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(tuple(key) if isinstance(key, list) else key, []).append(i)
        self.groups = [groups[k] for k in sorted(groups, key=repr)]
        self.batch_size, self.seed = int(batch_size), seed
        self.num_replicas, self.rank = num_replicas, rank
        self.sizes = self._batch_sizes()
        self.epoch, self.start = 0, 0

    def _batch_sizes(self) -> list[list[int]]:
        """Per bin, the sizes of its batches (deterministic from the bins' sizes alone)."""
        sizes = [[len(c) for c in np.array_split(np.arange(len(g)), -(-len(g) // self.batch_size))] for g in self.groups]
        while sum(map(len, sizes)) % self.num_replicas:
            b, j = max(((b, j) for b, s in enumerate(sizes) for j in range(len(s))), key=lambda bj: sizes[bj[0]][bj[1]])
            n = sizes[b][j]
            if n < 2:
                from ..errors import UserError

                raise UserError(f"{sum(map(len, self.groups))} images cannot be dealt to {self.num_replicas} ranks in whole "
                                "batches without repeating some; use more images or a larger batch")
            sizes[b][j:j + 1] = [n - n // 2, n // 2]
        return sizes

    def __len__(self) -> int:
        return sum(map(len, self.sizes)) // self.num_replicas

    def set_position(self, epoch: int, start: int = 0) -> None:
        """At ``epoch``, skipping ``start // batch_size`` of this rank's batches."""
        self.epoch, self.start = int(epoch), int(start)

    def batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` in dealing order (rank ``r`` gets ``[r::world]``)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        out = []
        for group, sizes in zip(self.groups, self.sizes):
            order = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            ends = np.cumsum([0] + sizes)
            out += [order[a:b] for a, b in zip(ends[:-1], ends[1:])]
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]

    def __iter__(self):  # a generator: the epoch is read at the first batch, after the trainer has positioned it
        epoch, skip = self.epoch, self.start // self.batch_size
        self.epoch, self.start = epoch + 1, 0
        for step, batch in enumerate(self.batches(epoch)[self.rank:: self.num_replicas]):
            if step >= skip:
                yield [(epoch, step * self.batch_size + j, i) for j, i in enumerate(batch)]


def _transform_of(dataset):
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


class SeededDataset(torch.utils.data.Dataset):
    """Wrap a dataset so that item ``(epoch, position, i)`` is drawn with transforms seeded by ``(seed, epoch, i)``.

    Args:
        views: optional per-task view pipelines (one callable or None per task of ``schedule``),
            applied to the item after the dataset's own transforms.
        schedule: the task schedule (``MultiTask.schedule``) that picks the task of each iteration.
        batch_size, steps_per_epoch: how positions map to iterations
            (``epoch * steps_per_epoch + position // batch_size + 1``, as the trainer counts).
    """

    def __init__(self, dataset, seed: int = 0, views=None, schedule=None, batch_size: int = 1, steps_per_epoch: int = 1) -> None:
        self.dataset, self.seed = dataset, seed
        self.transform = _transform_of(dataset)
        self.views = None if views is None else list(views)
        self.schedule = schedule
        if self.views is not None:
            n_tasks = getattr(schedule, "n_tasks", 1)
            if len(self.views) != n_tasks:
                raise ValueError(f"{len(self.views)} view pipelines for {n_tasks} scheduled tasks; give one per task (null for none)")
        self.batch_size, self.steps_per_epoch = max(1, batch_size), max(1, steps_per_epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def iteration_of(self, epoch: int, position: int) -> int:
        return epoch * self.steps_per_epoch + position // self.batch_size + 1

    def __getitem__(self, key):
        epoch, position, index = key if isinstance(key, tuple) else (0, 0, key)  # EpochSampler's keys, or a plain index
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=derive_seed(self.seed, epoch, index))
        item = self.dataset[index]
        if self.views is None:
            return item
        iteration = self.iteration_of(epoch, position)
        task = self.schedule(iteration) if self.schedule is not None else 0
        running = self.schedule.tasks_at(iteration) if hasattr(self.schedule, "tasks_at") else [task]
        views = [(t, self.views[t]) for t in running if self.views[t] is not None]
        for t, view in views:
            if hasattr(view, "set_random_state"):
                view.set_random_state(seed=derive_seed(self.seed, epoch, index, 1 if len(views) == 1 else 1 + t))
        samples = item if isinstance(item, list) else [item]  # 3D pipelines give several patches per volume
        samples = [dict(self._apply(views, x), view_task=torch.tensor(task)) for x in samples]
        return samples if isinstance(item, list) else samples[0]  # view_task: MultiTask checks it runs that task

    @staticmethod
    def _apply(views, item: dict) -> dict:
        """``item`` through each running task's views; two tasks writing one key (two ``views``) is refused."""
        if len(views) == 1:
            return views[0][1](item)
        out, written = dict(item), {}
        for t, view in views:
            made = view(item)
            for k in made:
                if k not in item or made[k] is not item[k]:
                    if k in written:
                        raise ValueError(f"tasks {written[k]} and {t} of a summed schedule both make batch key {k!r}; "
                                         "sum tasks whose views differ (e.g. barlow + classify + brainfuse, not barlow + dino)")
                    written[k] = t
                    out[k] = made[k]
        return out


def pretrain_loader(dataset, batch_size: int = 8, num_workers: int = 0, seed: int = 0, drop_last: bool = True,
                    distributed: bool | None = None, views=None, schedule=None, bins=None, **kwargs) -> DataLoader:
    """A MONAI ``DataLoader`` with an :class:`EpochSampler` over a :class:`SeededDataset`.

    ``distributed=None`` shards over ranks when ``torch.distributed`` is initialised. ``views`` and
    ``schedule``: per-task view pipelines and the schedule choosing among them (see :class:`SeededDataset`).
    ``bins``: one bin key per item (``BinPlan.keys``): batches are then drawn within bins by a
    :class:`BinnedBatchSampler` (``None``: fixed-size batches of any items).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    if distributed is None:
        distributed = is_distributed()
    world, rank = (world_size(), this_rank()) if distributed else (1, 0)
    kwargs.setdefault("collate_fn", collate_fields)
    if bins is not None:
        if len(bins) != len(dataset):
            raise ValueError(f"{len(bins)} bin keys for {len(dataset)} items")
        batches = BinnedBatchSampler(list(bins), batch_size, seed=seed, num_replicas=world, rank=rank)
        seeded = SeededDataset(dataset, seed, views=views, schedule=schedule, batch_size=batch_size, steps_per_epoch=len(batches))
        return DataLoader(seeded, batch_sampler=batches, num_workers=num_workers, persistent_workers=num_workers > 0, **kwargs)
    if len(dataset) // world < batch_size and drop_last:
        batch_size = max(1, len(dataset) // world)  # a tiny dataset still gives one full batch per epoch
    sampler = EpochSampler(len(dataset), seed=seed, num_replicas=world, rank=rank)
    steps = len(sampler) // batch_size if drop_last else -(-len(sampler) // batch_size)
    seeded = SeededDataset(dataset, seed, views=views, schedule=schedule, batch_size=batch_size, steps_per_epoch=steps)
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0, **kwargs)
