"""MedMNIST ``.npz`` archives (Yang et al., Scientific Data 2023) as datalist entries.

An archive holds ``{split}_images`` (N, H, W[, 3]) or (N, D, H, W) uint8 and ``{split}_labels``
(N, 1) for the splits ``train``, ``val`` and, in the official files, ``test``. Entries carry the
image as a channel-first float32 array in [0, 1] with ``preset="none"`` so the pipeline leaves
the intensities alone. Scaling to [0, 1] (:func:`unit_range`): ``uint8`` is divided by 255; images of any other type
already within [0, 1] are kept; the rest (float or 16-bit data) are scaled by the split's own
range, min to max over all its images, so images keep their brightness relative to each other.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["load_medmnist", "medmnist_splits", "unit_range"]


def unit_range(images: np.ndarray, path: str = "") -> np.ndarray:
    """``images`` as float32 in [0, 1] by the rule in the module docstring."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise ValueError(f"{path}: images of dtype {images.dtype} are not numbers")
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"{path}: images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo >= 0.0 and hi <= 1.0:
        return images
    return (images - lo) / max(hi - lo, 1e-12)


def medmnist_splits(path: str | os.PathLike) -> list[str]:
    """Splits present in the archive, in the order train, val, test."""
    with np.load(path) as z:
        return [s for s in ("train", "val", "test") if f"{s}_images" in z.files]


def load_medmnist(path: str | os.PathLike, split: str = "train", spatial_dims: int | None = None) -> list[dict]:
    """Read one split of a MedMNIST archive as entries ``{"image", "label", "patient", ...}``.

    Args:
        path: the ``.npz`` file.
        split: ``train``, ``val`` or ``test``.
        spatial_dims: 2 or 3 to check the archive against; ``None`` infers it (4D arrays without
            a trailing RGB axis are 3D).

    Raises:
        FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MedMNIST archive {path} does not exist")
    try:
        z = np.load(path)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    with z:
        key = f"{split}_images"
        if key not in z.files:
            raise ValueError(f"{path}: no split {split!r} (has {[f for f in z.files if f.endswith('_images')]})")
        images = z[key]
        labels = z[f"{split}_labels"] if f"{split}_labels" in z.files else None
    if labels is not None:
        labels = _check_labels(labels, len(images), path, split)
    rgb = images.ndim == 4 and images.shape[-1] == 3
    dims = images.ndim - 1 - int(rgb)
    if spatial_dims is not None and dims != spatial_dims:
        raise ValueError(f"{path}: images {images.shape} are {dims}D, expected {spatial_dims}D")
    if dims not in (2, 3):
        raise ValueError(f"{path}: cannot interpret images of shape {images.shape}")
    arrays = unit_range(np.moveaxis(images, -1, 1) if rgb else images[:, None], path)  # (N, C, *spatial) in [0, 1]
    if dims == 2:  # rows-first (H, W) -> (W, H), the axis order MONAI's readers give 2D images
        arrays = arrays.swapaxes(-1, -2)
    name = os.path.splitext(os.path.basename(path))[0]
    entries = []
    for i in range(len(arrays)):
        entry = {
            "image": arrays[i],
            "modality": "OT",
            "preset": "none",
            "patient": f"{name}:{split}:{i}",  # MedMNIST has no patient ids; each image is its own
            "spatial_dims": dims,
            "shape": list(arrays.shape[2:]),
        }
        if labels is not None:
            entry["label"] = int(labels[i])
        entries.append(entry)
    return entries


def _check_labels(labels: np.ndarray, n_images: int, path: str, split: str) -> np.ndarray:
    """One non-negative integer class per image, or ``ValueError`` naming the archive and the problem."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise ValueError(f"{path}: {split}_labels has shape {labels.shape}: one class per image expected "
                         "(multi-label archives are not supported)")
    labels = labels.reshape(len(labels), -1)[:, 0] if labels.ndim else labels
    if len(labels) != n_images:
        raise ValueError(f"{path}: {split}_labels has {len(labels)} labels for {n_images} images")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all():
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"{path}: {split}_labels are {labels.dtype} ({labels[:3].tolist()} ...); class labels must be "
                             "integers 0, 1, ...")
    if (labels < 0).any():
        raise ValueError(f"{path}: {split}_labels has negative classes ({int(labels.min())}); class labels must be 0, 1, ...")
    return labels.astype(np.int64)
