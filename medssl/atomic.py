"""Atomic file writes: readers see the old file or the new one, never half of one.

Everything medssl writes that another process or a later run reads (datalists, checkpoints,
embeddings, run records, reports, pictures) goes through :func:`atomic_write`: a temporary file
in the same folder, flushed and fsynced, then ``os.replace``d over the target (atomic on POSIX
and Windows). A failure while writing removes the temporary file and leaves the old one intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """``with atomic_write(path, "w") as f: ...`` writes ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
