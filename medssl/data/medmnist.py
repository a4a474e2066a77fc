"""MedMNIST ``.npz`` archives (Yang et al., Scientific Data 2023) as datalist entries.

An archive holds ``{split}_images`` (N, H, W[, 3]) or (N, D, H, W) uint8 and ``{split}_labels``
(N, 1) for the splits ``train``, ``val`` and, in the official files, ``test``. Entries carry the
image as a channel-first float32 array in [0, 1] with ``preset="none"`` so the pipeline leaves
the intensities alone.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["load_medmnist", "medmnist_splits"]


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
    rgb = images.ndim == 4 and images.shape[-1] == 3
    dims = images.ndim - 1 - int(rgb)
    if spatial_dims is not None and dims != spatial_dims:
        raise ValueError(f"{path}: images {images.shape} are {dims}D, expected {spatial_dims}D")
    if dims not in (2, 3):
        raise ValueError(f"{path}: cannot interpret images of shape {images.shape}")
    arrays = np.moveaxis(images, -1, 1) if rgb else images[:, None]  # (N, C, *spatial)
    if dims == 2:  # rows-first (H, W) -> (W, H), the axis order MONAI's readers give 2D images
        arrays = arrays.swapaxes(-1, -2)
    name = os.path.splitext(os.path.basename(path))[0]
    entries = []
    for i in range(len(arrays)):
        entry = {
            "image": arrays[i].astype(np.float32) / 255.0,
            "modality": "OT",
            "preset": "none",
            "patient": f"{name}:{split}:{i}",  # MedMNIST has no patient ids; each image is its own
            "spatial_dims": dims,
            "shape": list(arrays.shape[2:]),
        }
        if labels is not None:
            entry["label"] = int(np.asarray(labels[i]).ravel()[0])
        entries.append(entry)
    return entries
