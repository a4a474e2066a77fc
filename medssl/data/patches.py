"""Foreground-weighted random patches (3D) and slices (2D from 3D).

Why not MONAI's ``RandCropByPosNegLabeld``? It needs the flat indices of every foreground voxel;
for a 512x512x300 CT that is ~78 M int64 indices (600 MB) per cached volume, or a full scan of
the volume at every draw. Here the deterministic step stores a coarse map of the foreground
fraction per ``cell``^d block (a few kB, cached with the volume) and the random step samples
patch centres from it: cheap, and patches are rarely mostly air.

A 2D slice is a patch of size ``(-1, -1, 1)`` (full extent in-plane, one voxel deep) whose last
axis is then squeezed, so slices and patches share one sampler.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.layers.factories import Pool
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import ensure_tuple_rep

__all__ = ["ForegroundGrid", "ForegroundGridd", "RandForegroundPatches", "RandForegroundPatchesd", "SliceAxisLastd"]


class SliceAxisLastd(MapTransform):
    """Move a volume's acquisition axis last, so "slices" are the planes the scanner acquired.

    The acquisition axis is the one with the coarsest spacing (ties: the fewest voxels, then the
    last axis, i.e. axial after RAS orientation). A sagittal MR stack of 4 slices thus gives 4
    sagittal slices, not 256 strips of 4 x 256.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            shape = img.shape[1:]
            pixdim = getattr(img, "pixdim", None)
            spacing = [float(v) for v in pixdim[: len(shape)]] if pixdim is not None else [1.0] * len(shape)
            axis = max(range(len(shape)), key=lambda a: (round(spacing[a], 3), -shape[a], a))
            if axis != len(shape) - 1:
                order = [0] + [a + 1 for a in range(len(shape)) if a != axis] + [axis + 1]
                img = torch.as_tensor(img).permute(order)
            d[key] = img
        return d


class ForegroundGrid(Transform):
    """Fraction of foreground voxels in each ``cell``^d block of an image in [0, 1].

    Args:
        threshold: a voxel is foreground when any channel exceeds it (after intensity scaling,
            air in CT and the black border of radiographs/fundus photographs are ~0).
        cell: block edge in voxels.
    """

    def __init__(self, threshold: float = 0.05, cell: Sequence[int] | int = 8) -> None:
        if min((cell,) if isinstance(cell, int) else cell) < 1:
            raise ValueError(f"cell must be >= 1, got {cell}")
        self.threshold, self.cell = threshold, cell

    def __call__(self, img: torch.Tensor) -> np.ndarray:
        dims = img.ndim - 1
        cell = tuple(min(c, n) for c, n in zip(ensure_tuple_rep(self.cell, dims), img.shape[1:]))
        fg = (torch.as_tensor(img) > self.threshold).any(dim=0).float()[None, None]  # (1, 1, *spatial)
        pool = Pool[Pool.AVG, dims](kernel_size=cell, stride=cell, ceil_mode=True)
        return pool(fg)[0, 0].numpy().astype(np.float32)  # (*ceil(spatial / cell))


class ForegroundGridd(MapTransform):
    """Dictionary wrapper of :class:`ForegroundGrid`; stores the map under ``grid_key``."""

    def __init__(self, keys: KeysCollection = "image", threshold: float = 0.05, cell: Sequence[int] | int = 8,
                 grid_key: str = "fg_grid", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.grid = ForegroundGrid(threshold, cell)
        self.grid_key = grid_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.grid_key] = self.grid(d[key])
        return d


class RandForegroundPatches(Randomizable, Transform):
    """Crop ``num_samples`` random patches whose centres fall on foreground with probability ``fg_prob``.

    Args:
        patch_size: patch size per spatial axis; -1 takes the full extent of that axis.
        num_samples: patches per image.
        fg_prob: probability that a centre is drawn from the foreground map (else uniformly).
        cell: the block size used by :class:`ForegroundGrid` (to map cells back to voxels).
    """

    def __init__(self, patch_size: Sequence[int] | int, num_samples: int = 1, fg_prob: float = 0.9,
                 cell: Sequence[int] | int = 8) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= fg_prob <= 1:
            raise ValueError(f"fg_prob must be in [0, 1], got {fg_prob}")
        self.patch_size, self.num_samples, self.fg_prob, self.cell = patch_size, num_samples, fg_prob, cell

    def _size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        size = ensure_tuple_rep(self.patch_size, len(spatial))
        size = tuple(s if p == -1 else int(p) for p, s in zip(size, spatial))
        if any(p > s for p, s in zip(size, spatial)):
            raise ValueError(f"patch size {size} is larger than the image {tuple(spatial)}; pad the image first")
        return size

    def sample_corners(self, spatial: Sequence[int], grid: np.ndarray | None = None) -> list[tuple[int, ...]]:
        """Draw the patch corners (the only random step)."""
        size = self._size(spatial)
        grid = None if grid is None else np.asarray(grid, dtype=np.float64)  # PersistentDataset hands back a tensor
        cdf = None if grid is None else np.cumsum(grid.ravel())
        cells = tuple(min(c, n) for c, n in zip(ensure_tuple_rep(self.cell, len(spatial)), spatial))
        corners = []
        for _ in range(self.num_samples):
            if cdf is not None and cdf[-1] > 0 and self.R.rand() < self.fg_prob:
                flat = min(int(np.searchsorted(cdf, self.R.rand() * cdf[-1], side="right")), cdf.size - 1)
                cell = np.unravel_index(flat, grid.shape)  # drawn with probability ~ its foreground share
                centre = [min(c * n + self.R.randint(n), s - 1) for c, n, s in zip(cell, cells, spatial)]
            else:
                centre = [self.R.randint(s) for s in spatial]
            corners.append(tuple(int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, size, spatial)))
        return corners

    def crop(self, img: torch.Tensor, corner: Sequence[int]) -> torch.Tensor:
        """Cut the patch at ``corner`` (deterministic); a copy, so a cached volume is never changed."""
        size = self._size(img.shape[1:])
        index = (slice(None),) + tuple(slice(c, c + p) for c, p in zip(corner, size))
        plain = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)  # no metadata deep copy
        return plain[index].clone()  # (C, *patch_size)

    def __call__(self, img: torch.Tensor, grid: np.ndarray | None = None) -> list[torch.Tensor]:
        return [self.crop(img, c) for c in self.sample_corners(img.shape[1:], grid)]


class RandForegroundPatchesd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandForegroundPatches`: returns ``num_samples`` dicts (MONAI's
    convention for multi-sample crops, flattened into the batch by ``list_data_collate``). The
    same corners are used for every key; the foreground map is removed from the outputs."""

    def __init__(self, keys: KeysCollection = "image", patch_size: Sequence[int] | int = 96, num_samples: int = 1,
                 fg_prob: float = 0.9, cell: Sequence[int] | int = 8, grid_key: str = "fg_grid", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.sampler = RandForegroundPatches(patch_size, num_samples, fg_prob, cell)
        self.grid_key = grid_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # sampling happens in sample_corners
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        d = dict(data)
        grid = d.pop(self.grid_key, None)
        first = next(iter(self.key_iterator(d)))
        corners = self.sampler.sample_corners(d[first].shape[1:], grid)
        out = []
        for corner in corners:
            item = dict(d)
            for key in self.key_iterator(d):
                item[key] = self.sampler.crop(d[key], corner)
            out.append(item)
        return out
