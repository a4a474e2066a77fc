"""Atomic checkpoints and resuming from the latest one.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a
truncated file where its last good checkpoint was. :class:`AtomicCheckpointSaver` writes through
:func:`medssl.atomic.atomic_write` (temporary file, fsync, ``os.replace``).
Loading is ``weights_only=True`` (a checkpoint cannot run code) and keeps a larger ``max_epochs``
given on the command line, as MONAI's ``CheckpointLoader`` does.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint

from ..atomic import atomic_write
from ..distributed import is_main_process
from .run_folder import lock_run_folder, release_run_folder

__all__ = ["atomic_save", "load_checkpoint", "latest_checkpoint", "AtomicCheckpointSaver", "ResumeFromLatest", "unwrap",
           "load_encoder", "InitialEncoder"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint_(\d+)\.pt$")


def unwrap(module):
    """The module inside ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint_<iteration>.pt`` in ``folder`` with the highest iteration, or None."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint_*.pt") if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


def _state(obj):
    return unwrap(obj).state_dict() if hasattr(obj, "state_dict") else obj


class AtomicCheckpointSaver:
    """Save ``save_dict`` (plus the engine's counters) every ``every`` iterations and at the end.

    Files are ``checkpoint_<iteration>.pt`` (the ``keep`` most recent are kept). With ``encoder``,
    its weights alone are also written to ``encoder_file`` (a bundle's ``models/model.pt``) each
    time, so even a killed run leaves a usable encoder. Only rank 0 writes under DDP.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping, every: int = 100, keep: int = 2,
                 encoder: torch.nn.Module | None = None, encoder_file: str | os.PathLike | None = None) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"every and keep must be >= 1, got every={every} keep={keep}")
        self.save_dir, self.save_dict, self.every, self.keep = Path(save_dir), dict(save_dict), every, keep
        self.encoder = encoder
        self.encoder_file = Path(encoder_file) if encoder_file else self.save_dir / "model.pt"
        self._last = -1

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        iteration = engine.state.iteration
        if iteration == self._last or not is_main_process():
            return
        self._last = iteration
        state = {k: _state(v) for k, v in self.save_dict.items()}
        state["trainer"] = engine.state_dict()  # iteration, epoch_length, max_epochs: where to resume
        path = atomic_save(state, self.save_dir / f"checkpoint_{iteration:08d}.pt")
        if self.encoder is not None:
            atomic_save(unwrap(self.encoder).state_dict(), self.encoder_file)
        old = sorted(self.save_dir.glob("checkpoint_*.pt"), key=lambda p: int(_NAME.search(p.name).group(1)))
        for p in old[: -self.keep]:
            p.unlink(missing_ok=True)
        logger.info("saved %s", path)


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load(path, weights_only=True)``, with one clear error for a file that is not a checkpoint."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # truncated file, another format, or a pickle that needs code to load (refused)
        raise ValueError(f"{path} is not a readable medssl checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no detail'})") from None


class ResumeFromLatest:
    """At start, take the run folder and load the latest ``checkpoint_*.pt`` of ``save_dir`` (if ``enabled``).

    - With no checkpoint there yet, training starts from scratch and says so.
    - Not resuming into a folder that already holds checkpoints is refused: the old run's higher
      iteration numbers would win the pruning and a later resume would continue the old run.
    - Extending a finished run (``--resume`` with a larger ``max_epochs``) rebuilds the learning-rate
      schedule for the new total: the checkpoint restores the step count, the config the shape
      (warm-up and cosine over ``max_epochs * epoch_length``), so training continues at the learning
      rate a run planned for the new length would have at this step, not at the old run's final 0.
    - The run folder (``save_dir``'s parent unless ``run_dir``) is locked for the run's duration.
    """

    def __init__(self, save_dir: str | os.PathLike, load_dict: Mapping, enabled: bool = True,
                 run_dir: str | os.PathLike | None = None) -> None:
        self.save_dir, self.load_dict, self.enabled = Path(save_dir), dict(load_dict), enabled
        self.run_dir = Path(run_dir) if run_dir else self.save_dir.parent

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self._release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._release_and_raise)

    def _release(self, engine) -> None:
        if is_main_process():
            release_run_folder(self.run_dir)

    def _release_and_raise(self, engine, error: BaseException) -> None:
        self._release(engine)
        raise error  # ignite hands an exception to its EXCEPTION_RAISED handlers instead of raising it

    def __call__(self, engine) -> None:
        if is_main_process():
            lock_run_folder(self.run_dir)
        path = latest_checkpoint(self.save_dir)
        if not self.enabled:
            if path is not None:
                raise ValueError(f"{self.save_dir} already holds checkpoints of a run ({path.name}); resume it (medssl "
                                 "--resume, bundle setting resume: true), start over with medssl --overwrite, "
                                 "or choose another output folder")
            return
        if path is None:
            logger.warning("resume: no checkpoint in %s yet, starting from scratch", self.save_dir)
            return
        schedules = {k: [dict(f.__dict__) for f in v.lr_lambdas] for k, v in self.load_dict.items()
                     if isinstance(v, torch.optim.lr_scheduler.LambdaLR)}
        checkpoint = load_checkpoint(path, map_location=engine.state.device)
        trainer = checkpoint.get("trainer", {})
        done_epochs = int(trainer.get("epoch", trainer.get("iteration", 0) // max(1, trainer.get("epoch_length") or 1)))
        max_epochs = engine.state.max_epochs
        if max_epochs and done_epochs > max_epochs:
            raise ValueError(f"{path} has already trained {done_epochs} epochs, more than max_epochs {max_epochs}; "
                             f"to train on, give a max_epochs larger than {done_epochs}")
        if max_epochs and done_epochs == max_epochs and is_main_process():  # a requeued job resuming a finished run
            print(f"medssl: {path.name} has already trained all {max_epochs} epochs: nothing to train "
                  "(a larger max_epochs extends the run)")
        load_dict = {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.load_dict.items()}
        load_dict["trainer"] = engine
        Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint)
        engine.state.max_epochs = max_epochs  # the command line's, which may extend the run
        for key, lambdas in schedules.items():  # the config's schedule, at the restored step
            scheduler = self.load_dict[key]
            for f, settings, group, base in zip(scheduler.lr_lambdas, lambdas, scheduler.optimizer.param_groups,
                                                scheduler.base_lrs):
                f.__dict__.update(settings)
                group["lr"] = base * f(scheduler.last_epoch)
        logger.warning("resumed from %s at iteration %d (epoch %d of %d)", path, engine.state.iteration, engine.state.epoch,
                       engine.state.max_epochs)


def load_encoder(network: torch.nn.Module, checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load encoder weights (a bare state dict, e.g. a bundle's ``models/model.pt``) into ``network``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist; pretrain first (medssl pretrain / monai.bundle run)")
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a medssl checkpoint (it holds a {type(state).__name__}, not weights)")
    if "network" in state and isinstance(state["network"], dict):  # a full training checkpoint
        state = {k.split("backbone.", 1)[1]: v for k, v in state["network"].items() if k.startswith("backbone.")}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not fit this encoder (was it trained with other size/patch settings?): {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this encoder: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was it trained with other size/patch settings?)")
    return network


class InitialEncoder:
    """Start a fresh run from another run's encoder (``init_encoder``: its ``models/model.pt``).

    When training starts at iteration 0 the weights are loaded into the shared backbone and every
    EMA teacher a task keeps (:meth:`medssl.tasks.Task.teachers`) is set equal to what it follows;
    a resumed run keeps its own weights. ``checkpoint`` empty: nothing is loaded.
    """

    def __init__(self, checkpoint: str | os.PathLike | None, network: torch.nn.Module) -> None:
        self.checkpoint, self.network = (str(checkpoint) if checkpoint else ""), network

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._load)

    def _load(self, engine) -> None:
        if not self.checkpoint or engine.state.iteration > 0:
            return
        from ..tasks.ema import ema_update

        multitask = unwrap(self.network)
        load_encoder(multitask.backbone, self.checkpoint)
        for task in getattr(multitask, "tasks", {}).values():
            for teacher, student in task.teachers():
                ema_update(teacher, student, 0.0)  # momentum 0: a copy
        logger.info("encoder initialised from %s", self.checkpoint)
