"""Several data sets for one run (the Medformer's multi-source pretraining): one dataset per source.

A source is a mapping: ``data`` (anything :func:`~.dataset.load_source` reads), ``spatial_dims``,
``image_size``, and optionally ``name``, ``organ`` and ``modality`` (given to every entry that does
not say its own, or says only ``OT``, DICOM's "other", as MedMNIST files and plain images do; so a
conditioned encoder can choose its latents), ``samples_per_volume`` (3D) and
``ct_window``, ``batch_size`` and ``num_classes`` (for a supervised head per source). Each source gets its own pipeline (its dimensionality and size) and its own cache
folder. The engine's :func:`~medssl.engine.sources.multi_source_loader` then draws each batch from
one of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import UserError
from .dataset import build_dataset, load_source
from .pipeline import build_transforms

__all__ = ["source_name", "source_datasets"]

UNSAID = (None, "", "OT")  # no value, or DICOM's "other" (what a MedMNIST .npz or a plain image says)
KNOWN = {"data", "spatial_dims", "image_size", "name", "organ", "modality", "samples_per_volume", "ct_window", "batch_size",
         "num_classes"}


def source_name(source: Mapping, index: int) -> str:
    """The source's ``name``, else its data file's stem, else ``source<index>``."""
    if source.get("name"):
        return str(source["name"])
    data = source.get("data")
    return Path(str(data)).stem.split("_")[0] if isinstance(data, (str, os.PathLike)) else f"source{index}"


def source_datasets(sources: Sequence[Mapping], in_channels: int = 1, ct_window="abdomen", cache: str | None = "memory",
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list:
    """One dataset per source (see the module docstring), in order."""
    if not sources:
        raise UserError("no sources: give at least one {data, spatial_dims, image_size}")
    out = []
    for i, source in enumerate(sources):
        unknown = set(source) - KNOWN
        missing = {"data", "spatial_dims", "image_size"} - set(source)
        if unknown or missing:
            raise UserError(f"source {i} ({source_name(source, i)}): " + (f"unknown keys {sorted(unknown)} " if unknown else "")
                            + (f"missing {sorted(missing)}" if missing else "") + f"; a source has {sorted(KNOWN)}")
        dims, size = int(source["spatial_dims"]), int(source["image_size"])
        entries = load_source(source["data"], spatial_dims=dims, min_size=size)
        for entry in entries:
            for key in ("organ", "modality"):
                if source.get(key) and entry.get(key) in UNSAID:
                    entry[key] = source[key]
        transform = build_transforms(spatial_dims=dims, size=size, channels=in_channels, ct_windows=source.get("ct_window", ct_window),
                                     num_samples=int(source.get("samples_per_volume", 1)))
        folder = None if cache_dir is None else Path(cache_dir) / source_name(source, i)
        out.append(build_dataset(entries, transform, cache=cache, cache_dir=folder, progress=progress))
    return out
