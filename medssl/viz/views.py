"""Turning channel-first tensors into 2D pictures in the orientation radiologists expect."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["display_2d", "orthogonal_views"]


def _grey_or_rgb(img: np.ndarray) -> np.ndarray:
    """(C, *spatial) -> (*spatial) grey, or (*spatial, 3) RGB when there are three channels."""
    if img.shape[0] == 3:
        return np.moveaxis(img, 0, -1)
    return img[0]


def display_2d(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2D image as MONAI loads it, (C, W, H), to a picture (H, W[, 3]) with row 0 at the top."""
    a = _grey_or_rgb(np.asarray(img, dtype=np.float32))
    return np.swapaxes(a, 0, 1)


def orthogonal_views(vol: torch.Tensor | np.ndarray, centre: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre`` of a RAS-oriented (C, X, Y, Z) volume.

    Radiological convention: patient's right on the viewer's left; anterior (axial) and superior
    (coronal, sagittal) at the top; anterior on the left in the sagittal view.
    """
    a = _grey_or_rgb(np.asarray(vol, dtype=np.float32))  # (X, Y, Z[, 3])
    cx, cy, cz = centre or tuple(n // 2 for n in a.shape[:3])
    views = {"axial": a[:, :, cz], "coronal": a[:, cy, :], "sagittal": a[cx, :, :]}
    # (u, v) -> rows = v from high to low, columns = u from high to low
    return {k: np.flip(np.swapaxes(v, 0, 1), axis=(0, 1)) for k, v in views.items()}
