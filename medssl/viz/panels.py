"""Side-by-side pictures of named image batches (MAE inputs, masked inputs, reconstructions...).

2D images become one tile each; 3D volumes become three tiles (axial, coronal, sagittal through
the centre), in radiological orientation. NaN pixels (e.g. the patches an MAE hid) are drawn in
:data:`HIDDEN_COLOUR`, so they cannot be mistaken for tissue or air.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .figure import save_figure
from .views import display_2d, orthogonal_views

__all__ = ["write_panels", "region_colours", "HIDDEN_COLOUR", "REGION_COLOURS"]

HIDDEN_COLOUR = (0.23, 0.44, 0.71)
# one colour per source of a fused scan (up to 8 patients), told apart in colour-blind-safe pairs
REGION_COLOURS = ((0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
                  (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.60, 0.60, 0.60))


def region_colours(index: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *S)`` integer region / source labels -> ``(B, 3, *S)`` RGB in [0, 1] (:data:`REGION_COLOURS`)."""
    palette = torch.tensor(REGION_COLOURS, device=index.device)
    rgb = palette[index[:, 0].long() % len(REGION_COLOURS)]  # (B, *S, 3)
    return rgb.movedim(-1, 1)


def _tiles(img: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    img = img.detach().float().cpu()
    if img.ndim == 3:  # (C, W, H)
        return [("", display_2d(img))]
    return list(orthogonal_views(img).items())


def write_panels(images: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "", max_rows: int = 4) -> Path:
    """One row per sample, one column per (name, view); values shown on [0, 1]. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    rows = min(max_rows, len(images[names[0]]))
    columns = [(name, view) for name in names for view, _ in _tiles(images[name][0])]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 1.9 * rows + 0.4), squeeze=False)
    for r in range(rows):
        tiles = [t for name in names for t in _tiles(images[name][r])]
        for c, ((name, view), (_, tile)) in enumerate(zip(columns, tiles)):
            ax = axes[r, c]
            hidden = np.isnan(tile) if tile.ndim == 2 else np.isnan(tile).any(-1)
            rgb = np.repeat(np.clip(np.nan_to_num(tile), 0, 1)[..., None], 3, -1) if tile.ndim == 2 else np.clip(np.nan_to_num(tile), 0, 1)
            rgb[hidden] = HIDDEN_COLOUR
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name}\n{view}" if view else name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))
