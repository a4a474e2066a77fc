"""Validation metrics of the tasks on images they never train on, every few epochs.

A task that can score itself has ``validate(batch) -> {metric: tensor}`` (the query-box task:
mean IoU of its matched boxes and the share above 0.5). :class:`TaskValidation` holds held-out
items (:func:`medssl.data.dataset.hold_out`), makes each such task's views for them once from a
fixed seed (the same puzzles every time, so epochs compare), and after every ``every``-th epoch
writes ``<task>/val_<metric>`` into ``engine.state.metrics`` (what MONAI's TensorBoard and
MLflow handlers log per epoch) and a summary line. Rank 0 only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from ignite.engine import Events

from ..data.fields import collate_fields
from ..distributed import is_main_process
from .checkpoint import unwrap
from .determinism import _transform_of, derive_seed

__all__ = ["TaskValidation"]

logger = logging.getLogger("medssl.train")


class TaskValidation:
    """Score the tasks that have a ``validate`` method on ``dataset`` (held-out items) with their ``views``.

    Args:
        dataset: held-out items through the training preprocessing (empty: nothing is done).
        views: the per-task view pipelines, in the order of the trainer's tasks (as the loader gets them).
        every: epochs between validations (and one at the end of training).
        batch_size: items per validation batch.
    """

    def __init__(self, dataset, views: Sequence | None = None, every: int = 1, batch_size: int = 16, seed: int = 0) -> None:
        self.dataset, self.views, self.every, self.batch_size, self.seed = dataset, list(views or []), every, batch_size, seed
        self._batches: dict[str, list[dict]] = {}
        self.history: list[dict] = []

    def attach(self, engine) -> None:
        if self.dataset is None or len(self.dataset) == 0:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    def _items(self, index: int, view) -> list[dict]:
        items = []
        for i in range(len(self.dataset)):
            transform = _transform_of(self.dataset)
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=derive_seed(self.seed, i))
            item = self.dataset[i]
            for sample in item if isinstance(item, list) else [item]:
                if view is not None:
                    view.set_random_state(seed=derive_seed(self.seed, i, index))
                    sample = view(sample)
                items.append(sample)
        return items

    def _batches_for(self, name: str, index: int) -> list[dict]:
        if name not in self._batches:
            view = self.views[index] if index < len(self.views) else None
            items = self._items(index, view)
            self._batches[name] = [collate_fields(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        return self._batches[name]

    @torch.no_grad()
    def __call__(self, engine) -> None:
        if not is_main_process():
            return
        network = unwrap(engine.network)
        tasks = getattr(network, "tasks", {"task": network})
        device = engine.state.device
        was_training = network.training
        network.eval()
        scores: dict[str, float] = {}
        try:
            for index, (name, task) in enumerate(tasks.items()):
                if not hasattr(task, "validate"):
                    continue
                sums: dict[str, float] = {}
                count = 0
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    for batch in self._batches_for(name, index):
                        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                        n = len(batch["image"])
                        for k, v in task.validate(batch).items():
                            sums[k] = sums.get(k, 0.0) + float(v) * n
                        count += n
                scores.update({f"{name}/val_{k}": v / max(1, count) for k, v in sums.items()})
        finally:
            network.train(was_training)
        if scores:
            engine.state.metrics.update(scores)
            self.history.append({"epoch": engine.state.epoch, **scores})
            logger.info("epoch %d validation on %d held-out images: %s", engine.state.epoch, len(self.dataset),
                        "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
