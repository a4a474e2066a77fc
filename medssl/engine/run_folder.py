"""One run per run folder: a lock with the owner's pid, stale locks detected, orphaned temp files removed.

Two runs writing into one folder used to mix checkpoints and ``run.json``, and a kill left the
temporary files of :func:`medssl.atomic.atomic_write` behind. :func:`lock_run_folder` takes
``<folder>/.medssl.lock`` (``pid@host``) with ``O_EXCL``; a lock whose process is gone (same
host) is stale and taken over with a warning. The lock is re-entrant within one process: the
``medssl pretrain`` command takes it before it writes ``run.json``, and the trainer's handler takes
it again when the bundle runs, so ``python -m monai.bundle run`` is protected too. Once the
folder is held, leftover temporary files (``.checkpoint_*.pt.XXXXXXXX`` and the like) are removed.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import socket
from pathlib import Path

__all__ = ["lock_run_folder", "release_run_folder", "remove_orphans", "LOCK_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".medssl.lock"
_held: dict[Path, int] = {}  # folder -> how many times this process took it
# atomic_write's temporary files: "." + target name + "." + mkstemp's 8 random characters
_ORPHAN = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}$")


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def lock_run_folder(folder: str | os.PathLike) -> Path:
    """Hold ``folder`` for this process (created if needed); ``ValueError`` if another live run holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        return folder
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"run folder {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = path.read_text().strip() if path.exists() else ""
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                logger.warning("run folder %s: removing the stale lock of process %s, which is gone", folder, pid)
                print(f"medssl: {folder} was locked by process {pid}, which is gone; taking it over")
                path.unlink(missing_ok=True)
                continue
            raise ValueError(f"run folder {folder} is in use by another run ({owner or 'unknown owner'}); "
                             f"wait for it, or remove {path} if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(_owner() + "\n")
        _held[folder] = 1
        atexit.register(_release_all)
        remove_orphans(folder)
        return folder
    raise ValueError(f"could not take the lock {path}")


def release_run_folder(folder: str | os.PathLike) -> None:
    """Give ``folder`` back (the lock file goes once every taker of this process has released it)."""
    folder = Path(folder).resolve()
    if folder not in _held:
        return
    _held[folder] -= 1
    if _held[folder] == 0:
        del _held[folder]
        path = folder / LOCK_NAME
        if path.exists() and path.read_text().strip() == _owner():
            path.unlink(missing_ok=True)


def _release_all() -> None:
    for folder in list(_held):
        _held[folder] = 1
        release_run_folder(folder)


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files an interrupted atomic write left in ``folder`` and its sub-folders."""
    removed = []
    for path in Path(folder).rglob(".*"):
        if path.is_file() and path.name != LOCK_NAME and _ORPHAN.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.warning("removed %d temporary files left by an interrupted run in %s", len(removed), folder)
    return removed
