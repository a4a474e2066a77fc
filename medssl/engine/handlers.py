"""Engine handlers medssl adds to MONAI's: a progress bar with the loss, and task pictures."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from ignite.engine import Events

from .checkpoint import unwrap
from ..distributed import is_main_process

__all__ = ["ProgressBar", "TaskPictures", "MainProcessOnly", "scalars"]

logger = logging.getLogger("medssl.train")


def scalars(output):
    """Output transform for MONAI's stats handlers: log every scalar the step returned."""
    return output


class ProgressBar:
    """Progress over each epoch, and one summary line per epoch, from rank 0 only.

    On a terminal, ignite's tqdm bar with the loss (``bar``); when the output is not a terminal (a
    log file, a batch job), plain lines every ``lines_per_epoch``-th of the epoch instead of
    carriage-return updates.
    """

    def __init__(self, persist: bool = False, summary: bool = True, bar: bool = True, lines_per_epoch: int = 4) -> None:
        self.persist, self.summary, self.bar, self.lines_per_epoch = persist, summary, bar, lines_per_epoch
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar as IgniteBar

        if not is_main_process():
            return
        if self.bar and sys.stderr.isatty():
            IgniteBar(persist=self.persist).attach(engine, output_transform=lambda out: {"loss": out["loss"]})
        elif self.bar:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._line)
        if self.summary:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _line(self, engine) -> None:
        length = engine.state.epoch_length or 1
        if length < 2 * self.lines_per_epoch:  # short epochs: the summary line says enough
            return
        done = (engine.state.iteration - 1) % length + 1
        every = max(1, length // max(1, self.lines_per_epoch))
        if done % every == 0 and done < length:
            loss = (engine.state.output or {}).get("loss", float("nan"))
            print(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {done}/{length} iterations, loss {loss:.4g}",
                  file=sys.stderr, flush=True)

    def _accumulate(self, engine) -> None:
        output = engine.state.output or {}
        multitask = len(getattr(unwrap(engine.network), "names", ())) > 1
        for k, v in output.items():
            # per-task losses in multi-task runs; other per-task copies repeat the plain keys
            if k != "task" and ("/" not in k or (multitask and k.endswith("/loss"))):
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
                self._counts[k] = self._counts.get(k, 0) + 1

    def _report(self, engine) -> None:
        # each value is averaged over the iterations that reported it (a task's metrics over its own steps)
        means = "  ".join(f"{k} {v / self._counts[k]:.4g}" for k, v in self._sums.items())
        logger.info("epoch %d/%d (iteration %d): %s", engine.state.epoch, engine.state.max_epochs, engine.state.iteration, means)
        self._sums, self._counts = {}, {}


def _first(value, n: int):
    """The first ``n`` samples of a batch field (tensors cloned off the training batch, lists sliced)."""
    if isinstance(value, torch.Tensor):
        return value[:n].detach().clone() if value.ndim else value.clone()
    if isinstance(value, (list, tuple)):
        return list(value[:n])
    return value


class TaskPictures:
    """Write each task's ``visualize`` panels (e.g. MAE input / masked / reconstruction) to PNGs.

    Each task draws on its own batch: the first ``n`` samples of the last batch it trained on (in a
    cyclic run an MAE batch has no views and a DINO batch was made with DINO's views, so one shared
    batch could not serve every task). Pictures are written every ``every`` epochs and at the end
    (``<task>_epoch<NNN>.png``, ``<task>_final.png``); masks for them come from a fixed seed and
    leave the training random stream untouched.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int = 1, n: int = 4, seed: int = 0) -> None:
        self.out_dir, self.every, self.n, self.seed = Path(out_dir), every, n, seed
        self.batches: dict[str, dict] = {}
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self, final=True)

    @staticmethod
    def _task_names(network) -> list[str]:
        return list(getattr(network, "names", None) or ["task"])

    def _keep_batch(self, engine) -> None:
        if not is_main_process() or not isinstance(engine.state.batch, dict):
            return
        names = self._task_names(unwrap(engine.network))
        index = int((engine.state.output or {}).get("task", 0))
        network = unwrap(engine.network)
        tasks = getattr(network, "tasks", {"task": network})
        if index == -1:  # a summed schedule: every task trained on this batch
            ran = names
        else:
            ran = [names[index] if 0 <= index < len(names) else names[0]]
        # a task may need more items than it draws (a fusion of 8 patients needs 8); one copy serves every task that ran
        n = max([self.n] + [int(getattr(tasks[name], "picture_items", 0) or 0) for name in ran if name in tasks])
        kept = {k: _first(v, n) for k, v in engine.state.batch.items()}
        self.batches.update({name: kept for name in ran})

    def __call__(self, engine, final: bool = False) -> None:
        if not self.batches or not is_main_process():
            return
        from ..viz.panels import write_panels

        network = unwrap(engine.network)
        tasks = getattr(network, "tasks", {"task": network})
        was_training = network.training
        network.eval()
        tag = "final" if final else f"epoch{engine.state.epoch:03d}"
        device = engine.state.device
        try:
            for name, task in tasks.items():
                kept = self.batches.get(name)
                if kept is None:
                    continue  # this task has not trained yet
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kept.items()}
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    images = task.visualize(batch)
                if images:
                    title = f"{name} - epoch {engine.state.epoch}, iteration {engine.state.iteration}"
                    self.written.append(write_panels(images, self.out_dir / f"{name}_{tag}.png", title=title))
        finally:
            network.train(was_training)


class MainProcessOnly:
    """Make and attach a handler on rank 0 only (TensorBoard logs: one writer per run, not one per process).

    ``handler`` is a handler, or a factory for one (a config's ``_mode_: callable``), which is
    better: TensorBoard's writer creates its file when it is made, not when it is attached.
    """

    def __init__(self, handler) -> None:
        self.handler = handler

    def attach(self, engine) -> None:
        if is_main_process():
            handler = self.handler if hasattr(self.handler, "attach") else self.handler()
            handler.attach(engine)
