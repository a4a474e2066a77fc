"""Atomic checkpoints and resuming from the latest one.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a
truncated file where its last good checkpoint was. :class:`AtomicCheckpointSaver` writes through
:func:`medssl.atomic.atomic_write` (temporary file, fsync, ``os.replace``).
Loading goes through MONAI's ``CheckpointLoader`` (``weights_only=True``; keeps a larger
``max_epochs`` given on the command line).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader

from ..atomic import atomic_write

__all__ = ["atomic_save", "latest_checkpoint", "AtomicCheckpointSaver", "ResumeFromLatest", "unwrap"]

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
        if iteration == self._last or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
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


class ResumeFromLatest:
    """At start, load the latest ``checkpoint_*.pt`` of ``save_dir`` into ``load_dict`` and the engine (if ``enabled``).

    With no checkpoint there yet, training starts from scratch and says so.
    """

    def __init__(self, save_dir: str | os.PathLike, load_dict: Mapping, enabled: bool = True) -> None:
        self.save_dir, self.load_dict, self.enabled = Path(save_dir), dict(load_dict), enabled

    def attach(self, engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        path = latest_checkpoint(self.save_dir)
        if path is None:
            logger.warning("resume: no checkpoint in %s yet, starting from scratch", self.save_dir)
            return
        load_dict = {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.load_dict.items()}
        load_dict["trainer"] = engine
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=engine.state.device)(engine)
        logger.warning("resumed from %s at iteration %d (epoch %d)", path, engine.state.iteration, engine.state.epoch)
