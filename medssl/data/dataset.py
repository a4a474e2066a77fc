"""Datalists in, datasets and loaders out, with bad files logged and skipped.

``load_source`` accepts what a user points medssl at (a datalist JSON, a MedMNIST ``.npz``, a
folder to scan, or a list of entries); ``build_dataset`` wraps MONAI's ``Dataset`` /
``CacheDataset`` / a shared disk cache so that an unreadable file is reported once and the
sample is replaced by the next readable one: batches stay full and a run never dies because one
file in thousands is corrupt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset

from ..errors import UserError
from .fields import collate_fields
from .privacy import patient_hash
from .io import describe, root_cause

__all__ = ["load_datalist", "load_source", "hold_out", "build_dataset", "build_loader", "SkipUnreadable", "SafeCacheDataset"]

logger = logging.getLogger(__name__)


def _resolve(image, base: Path):
    if isinstance(image, list):
        return [_resolve(p, base) for p in image]
    return image if os.path.isabs(image) else str(base / image)


def _exists(image) -> bool:
    return all(os.path.exists(p) for p in image) if isinstance(image, list) else os.path.exists(image)


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """Read a MONAI-style datalist; relative paths are resolved against the file's folder.

    Entries whose files are missing are dropped with a warning naming them; if none is left,
    ``FileNotFoundError`` says so (typically: the data moved after the scan).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"datalist {path} is not valid JSON ({exc})") from None
    if not isinstance(content, dict) or key not in content:
        raise ValueError(f"datalist {path} has no {key!r} list (keys: {list(content) if isinstance(content, dict) else type(content).__name__})")
    if not isinstance(content[key], list):
        raise ValueError(f"datalist {path}: {key!r} must be a list of entries, got {type(content[key]).__name__}")
    entries, missing = [], []
    for i, entry in enumerate(content[key]):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), (str, list)) or not entry["image"]:
            raise ValueError(f"datalist {path}: {key}[{i}] has no 'image' path ({str(entry)[:80]})")
        entry = dict(entry)
        entry["image"] = _resolve(entry["image"], path.parent.absolute())
        (entries if _exists(entry["image"]) else missing).append(entry)
    if missing:
        shown = ", ".join(describe(e["image"]) for e in missing[:3])
        msg = f"datalist {path}: {len(missing)} of {len(missing) + len(entries)} entries point to missing files ({shown} ...)"
        if not entries:
            raise FileNotFoundError(msg + "; were the files moved? Re-run `medssl scan` on their new folder")
        logger.warning(msg + "; they are left out")
    return entries


def _load_table(path: str) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0]:
        raise ValueError(f"{path}: a CSV source needs an 'image' column")
    base = Path(path).parent

    def label(row: dict, line: int) -> dict:
        text = (row.get("label") or "").strip()
        if text == "":
            return {}
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value.is_integer() or value < 0:
            raise ValueError(f"{path}, line {line}: label {text!r} is not a class number 0, 1, ... (map class names to numbers)")
        return {"label": int(value)}

    return [{"image": str(_resolve(r["image"], base)), "modality": r.get("modality") or "OT", **label(r, i + 2),
             **({"patient": patient_hash(r["patient"].strip())} if (r.get("patient") or "").strip() else {}),
             **({"split": r["split"]} if r.get("split") else {})} for i, r in enumerate(rows)]


def hold_out(entries: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, held out)``: about ``fraction`` of the patients (all of their images) held out, chosen
    from ``seed``; at least one patient stays in training. ``fraction=0`` holds nothing out."""
    entries = list(entries)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in [0, 1), got {fraction}")
    patients = sorted({str(e.get("patient", i)) for i, e in enumerate(entries)})
    n = min(len(patients) - 1, round(fraction * len(patients)))
    if n <= 0:
        return entries, []
    order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {patients[i] for i in order[:n]}
    keys = [str(e.get("patient", i)) for i, e in enumerate(entries)]
    return [e for e, k in zip(entries, keys) if k not in held], [e for e, k in zip(entries, keys) if k in held]


_SPLIT_NAMES = {"training": "train", "validation": "val", "testing": "test"}


def _datalist_splits(path: str) -> list[dict]:
    """Every list of entries in a datalist (``training``, ``validation``, ``test``, ...), each entry with its ``split``."""
    content = json.loads(Path(path).read_text())
    keys = [k for k, v in content.items() if isinstance(v, list) and v and all(isinstance(e, dict) and "image" in e for e in v)] \
        if isinstance(content, dict) else []
    if not keys:
        return load_datalist(path)  # its error names what is wrong
    return [dict(e, split=e.get("split") or _SPLIT_NAMES.get(k, k)) for k in keys for e in load_datalist(path, k)]


def _stable_key(entry: dict, root: str | None) -> str:
    """What an entry's ``id`` hashes: its MedMNIST ``name:split:index``, else its image path relative to the source."""
    image = entry.get("image")
    if not isinstance(image, (str, os.PathLike, list)):
        return str(entry.get("patient"))
    first = os.fspath(image[0] if isinstance(image, list) else image)
    return os.path.relpath(first, root) if root and os.path.isabs(first) else first


def load_source(source, spatial_dims: int | None = None, split: str = "train", salt: str | None = None,
                min_size: int | None = None) -> list[dict]:
    """Entries from a datalist ``.json``, a MedMNIST ``.npz``, a folder (scanned now), a CSV or a list.

    A CSV needs an ``image`` column (paths relative to the CSV) and may have ``modality``,
    ``label``, ``patient`` and ``split``; pretraining uses its images only. Every entry gets a
    salted ``patient`` hash: the source's patient id where it names one (a CSV ``patient`` column,
    a datalist field, DICOM headers), else the image's path (each image its own patient, as
    MedMNIST has it), so patient-level splits and patient mixing work on any source.

    Args:
        spatial_dims: keep only entries of this dimensionality (``None`` keeps all).
        split: the MedMNIST split to read, or ``"all"``: every split of a MedMNIST archive and every
            entry list of a datalist (``training``, ``validation``, ``test``), each entry with its
            ``split`` (what embeddings for pipelines need).
        min_size: the training patch edge: 3D volumes thinner than it along an axis are reported
            (they train mostly on padding).
    """
    if isinstance(source, (list, tuple)):
        entries = [dict(e) for e in source]
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            from .scan import scan_folder

            result = scan_folder(path, salt=salt, progress=False)
            entries = result.entries
            if result.skipped:
                from collections import Counter

                from .scan import reason_kind

                kinds = Counter(reason_kind(s["reason"]) for s in result.skipped)
                logger.warning("%s: %d file(s) left out: %s (`medssl scan %s` lists each with its reason)", path,
                               len(result.skipped), ", ".join(f"{n} x {k}" for k, n in kinds.most_common()), path)
        elif path.endswith(".npz"):
            from .medmnist import load_medmnist, medmnist_splits

            splits = (medmnist_splits(path) or ["train"]) if split == "all" else [split]
            entries = [dict(e, split=s) for s in splits for e in load_medmnist(path, split=s)]
        elif path.endswith(".json"):
            entries = _datalist_splits(path) if split == "all" else load_datalist(path)
        elif path.endswith(".csv"):
            entries = _load_table(path)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        else:
            raise ValueError(f"{path}: expected a folder, a datalist .json or a MedMNIST .npz")
    entries = [e if e.get("patient") else dict(e, patient=patient_hash(
        str(e["image"]) if isinstance(e.get("image"), (str, os.PathLike)) else f"item:{i}", salt)) for i, e in enumerate(entries)]
    if not isinstance(source, (list, tuple)):  # a stable salted id per image, and where it came from, for tables
        path = os.fspath(source)
        root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        entries = [dict(e, id=e.get("id") or patient_hash("id\x00" + _stable_key(e, root), salt), source=e.get("source") or name)
                   for e in entries]
    if spatial_dims is not None:
        kept = [e for e in entries if e.get("spatial_dims", spatial_dims) == spatial_dims]
        if len(kept) < len(entries):
            logger.warning("%s: %d of %d images left out because they are not %dD", source if not isinstance(source, (list, tuple))
                           else "entries", len(entries) - len(kept), len(entries), spatial_dims)
        entries = kept
    if min_size:
        thin = [e for e in entries if e.get("spatial_dims") == 3 and e.get("shape") and min(e["shape"]) < min_size]
        if thin:
            e = thin[0]
            logger.warning("%d of %d volumes are thinner than the %d-voxel training patch along an axis (e.g. %s, shape %s): "
                           "they train mostly on padding", len(thin), len(entries), min_size, describe(e["image"]), e["shape"])
    return entries


class _Unreadable:
    """Cache placeholder for an item whose deterministic transforms failed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class SafeCacheDataset(CacheDataset):
    """``CacheDataset`` whose cache fill survives unreadable files (they are re-raised on access,
    where :class:`SkipUnreadable` handles them)."""

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as exc:
            reason = str(root_cause(exc))
            logger.warning("cannot cache %s: %s", describe(self.data[idx].get("image")), reason)
            return _Unreadable(reason)

    def _transform(self, index: int):
        cached = self._cache[index] if self._cache is not None and index < self.cache_num else None
        if isinstance(cached, _Unreadable):
            raise RuntimeError(cached.reason)
        return super()._transform(index)


class NothingLoads(UserError, RuntimeError):
    """Many items in a row fail to load: the pipeline or the data folder is wrong, not one file."""


class SkipUnreadable(torch.utils.data.Dataset):
    """Replace an item that fails to load by the next readable one (and remember the failure).

    The replacement keeps batch sizes constant. Each bad item is logged once per process with the
    file and the reason; if ``max_tries`` items in a row fail, the error is raised, because then the
    problem is the pipeline, not one file.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 16) -> None:
        self.dataset, self.max_tries = dataset, max_tries
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        for step in range(min(self.max_tries, n)):
            i = (index + step) % n
            if i in self.bad:
                continue
            try:
                return self.dataset[i]
            except Exception as exc:
                cause = root_cause(exc)
                self.bad[i] = str(cause)
                logger.warning("skipping %s: %s", describe(self.dataset.data[i].get("image")), cause)
        raise NothingLoads(f"{self.max_tries} items in a row starting at {index} could not be loaded; last: {list(self.bad.values())[-1:]}")


def build_dataset(entries: Sequence[dict], transform, cache: str | None = None, cache_dir: str | os.PathLike | None = None,
                  num_workers: int = 2, progress: bool = True) -> SkipUnreadable:
    """Wrap ``entries`` and ``transform`` in a MONAI dataset that skips unreadable files.

    Args:
        cache: ``None`` (load every time), ``"memory"`` (``CacheDataset``: the deterministic head of
            ``transform`` runs once per entry, in ``num_workers`` threads) or ``"disk"``
            (:class:`~medssl.data.cache.SharedCacheDataset` in ``cache_dir``: survives restarts, fits data
            larger than RAM, shared by ranks and runs, re-reads files that changed).
    """
    if not entries:
        raise ValueError("no entries to build a dataset from (empty datalist, or none of the requested dimensionality)")
    if cache is None or cache == "none":
        ds = Dataset(list(entries), transform)
    elif cache == "memory":
        import sys

        ds = SafeCacheDataset(list(entries), transform, num_workers=num_workers, progress=progress and sys.stderr.isatty(),
                              copy_cache=False)
    elif cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        from .cache import SharedCacheDataset

        ds = SharedCacheDataset(list(entries), transform, cache_dir=cache_dir)
    else:
        raise ValueError(f"cache must be None, 'memory' or 'disk', got {cache!r}")
    return SkipUnreadable(ds)


def build_loader(dataset, batch_size: int = 8, shuffle: bool = True, num_workers: int = 0, drop_last: bool = True, **kwargs) -> DataLoader:
    """MONAI ``DataLoader`` whose collate flattens multi-patch samples into the batch and keeps the
    entries' scalar fields (:func:`~medssl.data.fields.collate_fields`)."""
    kwargs.setdefault("collate_fn", collate_fields)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0, **kwargs)
