"""A preprocessed cache on disk that every rank and every run shares (``cache: disk``, ``medssl prepare``).

MONAI's ``PersistentDataset`` stores each item's deterministic transforms (load, orientation,
resampling, intensity, padding, foreground map) as one ``.pt`` file named by a hash of the
datalist entry. :class:`SharedCacheDataset` keeps that design and closes its gaps for caches that
many processes and runs share:

- **Stale files**: the key hashes the entry, each image file's path, size and modification time
  (a file changed on disk is read again), the deterministic transforms' settings (a different
  CT window or spacing gets its own files) and medssl's version. MONAI's default key is the
  entry alone, so a changed file or transform is silently served from the old cache.
- **Two writers**: a file is written to a temporary name in the cache folder itself and renamed
  over the final name (``os.replace``, atomic on one file system, NFS included), so ranks filling
  the cache together, or a ``medssl prepare`` beside a training run, never leave a torn file.
  MONAI writes into the system's temporary folder and moves the file across, which on a shared
  cache on another file system is a copy a reader or second writer can catch half-done.
- **Broken files** (a disk full, a kill during the copy of a foreign tool) are recomputed and
  rewritten, with one warning.

Entries whose image is already an array in memory (MedMNIST) are not written: there is nothing to save.
Why this and not LMDB or a sharded streaming format: ``docs/data.md`` ("A shared cache") and
``bench/cache_throughput.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from monai.data import PersistentDataset
from monai.utils import convert_to_tensor

from ..atomic import atomic_write

__all__ = ["SharedCacheDataset", "entry_key", "transform_key"]

logger = logging.getLogger(__name__)


def _files(image) -> list[str]:
    if isinstance(image, (str, os.PathLike)):
        return [os.fspath(image)]
    if isinstance(image, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in image):
        return [os.fspath(p) for p in image]
    return []


def _plain(value, depth: int = 0):
    """``value`` as JSON-able data: numbers, text, lists, dicts, medssl / MONAI objects by their settings
    (:func:`_settings`), other objects by a repr without a memory address; else ``_SKIP``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):  # inside containers an opaque value stands as its type's name
        return [_named(v, _plain(v, depth)) for v in value]
    if isinstance(value, dict):
        return {str(k): _named(v, _plain(v, depth)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if hasattr(value, "__dict__") and type(value).__module__.startswith(("medssl", "monai")):
        return _settings(value, depth + 1)
    text = repr(value)
    return _SKIP if " at 0x" in text or len(text) > 2000 else text  # a repr with an address differs every run


_SKIP = object()


def _named(value, plain):
    return f"<{type(value).__qualname__}>" if plain is _SKIP else plain


def entry_key(entry: dict) -> str | None:
    """The hash naming ``entry``'s cache file: its plain fields and every image file's path, size and mtime.
    ``None`` for an entry whose image is an in-memory array (nothing to cache)."""
    files = _files(entry.get("image"))
    if not files:
        return None
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    fields = {k: v for k, v in ((k, _plain(v)) for k, v in entry.items() if k != "image") if v is not _SKIP}
    payload = json.dumps({"fields": fields, "files": stats}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


def _settings(t, depth: int = 0) -> list:
    """A transform's class and plain settings, and those of the transforms inside it (Compose, wrappers, readers)."""
    name = f"{type(t).__module__}.{type(t).__qualname__}"
    if depth > 4 or not hasattr(t, "__dict__"):
        return [name]
    inner = [_settings(x, depth + 1) for x in getattr(t, "transforms", ())]
    own = {k: v for k, v in ((k, _plain(v, depth)) for k, v in sorted(vars(t).items())
           if k != "transforms" and not k.startswith("_")) if v is not _SKIP}  # private state (reader caches) changes with use
    return [name, own, inner]


def transform_key(transform) -> str:
    """A hash of the transform chain's classes and settings, and medssl's version (what the cached items depend on)."""
    from .. import __version__

    payload = json.dumps([__version__, _settings(transform)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class SharedCacheDataset(PersistentDataset):
    """``PersistentDataset`` with stat-aware keys, in-folder atomic writes and recomputed broken files (module docstring)."""

    def __init__(self, data, transform, cache_dir: str | os.PathLike) -> None:
        super().__init__(data, transform, cache_dir=cache_dir)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.transform_hash = transform_key(transform)
        self.hits = self.writes = 0

    def cache_file(self, entry: dict) -> Path | None:
        key = entry_key(entry)
        return None if key is None else self.cache_dir / f"{key}-{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed):
        from copy import deepcopy

        path = self.cache_file(item_transformed)
        if path is not None and path.is_file():
            try:
                item = torch.load(path, weights_only=True)
                self.hits += 1
                return item
            except Exception as exc:  # a torn or foreign file: computed again and replaced
                logger.warning("cache file %s is unreadable (%s); recomputing it", path, type(exc).__name__)
        item = self._pre_transform(deepcopy(item_transformed))
        if path is not None:
            with atomic_write(path) as f:
                torch.save(convert_to_tensor(item, convert_numeric=False, track_meta=False), f)
            self.writes += 1
        return item

    def prepare(self, index: int) -> bool:
        """Make item ``index``'s cache file if it is missing; True if it was written now."""
        path = self.cache_file(self.data[index])
        if path is None or path.is_file():
            return False
        self._cachecheck(self.data[index])
        return True
