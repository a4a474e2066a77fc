"""Augmented views for contrastive and distillation tasks, built from MONAI transforms.

A *view* is a random resized crop of the training image (a 2D image or a 3D patch from the
standard pipeline) followed by medical-safe perturbations:

- geometry: random resized crop (``scale`` = share of the area / volume), flips along chosen
  axes, small rotations;
- intensity: scale and shift, gamma, Gaussian noise, Gaussian blur, and for CT a random jitter of
  the HU window. No colour jitter: grey images have no hue, and shifting the colours of fundus
  photographs changes their meaning.

The window jitter acts on the windowed image (the cached part of the pipeline windows once):
shifting the level or narrowing the window is an exact re-windowing; widening it cannot bring
back values the first window clipped, which then stay at the window's ends.

:class:`MultiViewd` turns one item into ``views`` ``(G, C, *S)`` (global crops) and
``local_views`` ``(L, C, *s)`` (smaller crops for DINO's multi-crop); batched they become
``(B, G, C, *S)`` and ``(B, L, C, *s)``. With ``modality="auto"`` (the default) each item gets
the views of its own modality (:class:`ModalityViewsd` reads the entry's ``modality`` field): a
folder that mixes CT, MR and radiographs jitters the HU window of the CTs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureType,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandRotate,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    Transform,
)
from monai.data import get_track_meta, set_track_meta
from monai.utils import ensure_tuple_rep

__all__ = ["RandWindowJitter", "view_augmentation", "MultiViewd", "ModalityViewsd", "multi_crop", "two_views",
           "RandQueryBoxesd", "query_boxes", "crop_box"]


class RandWindowJitter(Randomizable, Transform):
    """Re-window a [0, 1] windowed image: level shifted by up to ``level`` window widths, width
    scaled by a factor in ``width``; with probability ``prob``."""

    def __init__(self, level: float = 0.1, width: tuple[float, float] = (0.8, 1.2), prob: float = 0.8) -> None:
        self.level, self.width, self.prob = level, width, prob
        self._do, self._shift, self._scale = False, 0.0, 1.0

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob
        self._shift = self.R.uniform(-self.level, self.level)
        self._scale = self.R.uniform(*self.width)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        self.randomize()
        if not self._do:
            return img
        return ((img - 0.5 - self._shift) / self._scale + 0.5).clamp(0, 1)


def view_augmentation(spatial_dims: int, size: int | Sequence[int], scale: tuple[float, float] = (0.4, 1.0),
                      flip_axes: Sequence[int] | None = None, rotate_degrees: float | None = None, intensity: float = 0.1,
                      gamma: tuple[float, float] = (0.7, 1.5), noise_std: float = 0.02, blur: tuple[float, float] = (0.25, 1.0),
                      window_jitter: bool = False) -> Compose:
    """One view's transform chain ``(C, *spatial) -> (C, *size)``.

    Args:
        size: output edge (a multiple of the ViT patch).
        scale: range of the crop's share of the image area (2D) or volume (3D).
        flip_axes: spatial axes to flip at random (default: left-right in 2D, all three in 3D).
        rotate_degrees: maximum in-plane rotation (default 10 in 2D; 0 in 3D, where resampling a
            volume costs more than the crop and flips together and flips already vary the pose).
        intensity: maximum relative scale and absolute shift of intensities.
        gamma, noise_std, blur: gamma range, noise standard deviation, blur sigma range (0/None: off).
        window_jitter: add :class:`RandWindowJitter` (CT).
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    d = spatial_dims
    per_axis = (scale[0] ** (1 / d), scale[1] ** (1 / d))  # area / volume share -> edge share
    chain: list = [RandScaleCrop(roi_scale=per_axis[0], max_roi_scale=per_axis[1], random_size=True),
                   Resize(spatial_size=ensure_tuple_rep(size, d), mode="bilinear" if d == 2 else "trilinear")]
    for axis in (flip_axes if flip_axes is not None else ((0,) if d == 2 else (0, 1, 2))):
        chain.append(RandFlip(prob=0.5, spatial_axis=axis))
    rotate_degrees = (10.0 if d == 2 else 0.0) if rotate_degrees is None else rotate_degrees
    if rotate_degrees:
        r = math.radians(rotate_degrees)
        chain.append(RandRotate(range_x=r, range_y=r if d == 3 else 0.0, range_z=r if d == 3 else 0.0, prob=0.5,
                                padding_mode="zeros"))
    if window_jitter:
        chain.append(RandWindowJitter())
    if intensity:
        chain += [RandScaleIntensity(factors=intensity, prob=0.5), RandShiftIntensity(offsets=intensity, prob=0.5)]
    if gamma:
        chain.append(RandAdjustContrast(gamma=gamma, prob=0.5))
    if noise_std:
        chain.append(RandGaussianNoise(std=noise_std, prob=0.3))
    if blur:
        chain.append(RandGaussianSmooth(sigma_x=blur, sigma_y=blur, sigma_z=blur, prob=0.3))
    chain.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(chain)


class MultiViewd(Randomizable):
    """Item -> item plus ``views`` (``n_global`` draws of ``global_view``) and, with ``n_local``,
    ``local_views`` (draws of ``local_view``), all from ``item[key]``."""

    def __init__(self, global_view: Compose, n_global: int = 2, local_view: Compose | None = None, n_local: int = 0,
                 key: str = "image", views_key: str = "views", local_key: str = "local_views") -> None:
        if n_global < 1 or n_local < 0 or (n_local and local_view is None):
            raise ValueError(f"need n_global >= 1 and a local_view for n_local={n_local} > 0")
        self.global_view, self.local_view, self.n_global, self.n_local = global_view, local_view, n_global, n_local
        self.key, self.views_key, self.local_key = key, views_key, local_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiViewd:
        super().set_random_state(seed, state)
        seeds = self.R.randint(0, 2**31 - 1, size=2)
        self.global_view.set_random_state(seed=int(seeds[0]))
        if self.local_view is not None:
            self.local_view.set_random_state(seed=int(seeds[1]))
        return self

    def randomize(self, data=None) -> None:  # the chains draw their own parameters
        pass

    def __call__(self, data: dict) -> dict:
        img = torch.as_tensor(data[self.key])
        out = dict(data)
        tracking = get_track_meta()
        set_track_meta(False)  # views are plain tensors; MetaTensor bookkeeping made small images ~10x slower
        try:
            out[self.views_key] = torch.stack([self.global_view(img) for _ in range(self.n_global)])
            if self.n_local:
                out[self.local_key] = torch.stack([self.local_view(img) for _ in range(self.n_local)])
        finally:
            set_track_meta(tracking)
        return out


class ModalityViewsd(Randomizable):
    """Item -> the views of its modality: ``by_modality[item["modality"]]``, else ``by_modality["*"]``."""

    def __init__(self, by_modality: dict[str, MultiViewd], key: str = "modality") -> None:
        if "*" not in by_modality:
            raise ValueError("by_modality needs a '*' entry for the other modalities")
        self.by_modality, self.key = {k.upper(): v for k, v in by_modality.items()}, key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ModalityViewsd:
        super().set_random_state(seed, state)
        for views, s in zip(self.by_modality.values(), self.R.randint(0, 2**31 - 1, size=len(self.by_modality))):
            views.set_random_state(seed=int(s))
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: dict) -> dict:
        modality = str(data.get(self.key) or "*").upper()
        return self.by_modality.get(modality, self.by_modality["*"])(data)


def _window_jitter(modality: str) -> dict:
    return {"window_jitter": modality.upper() == "CT"}


def _per_modality(build, modality: str):
    """One :class:`MultiViewd` for ``modality``, or for ``"auto"`` a :class:`ModalityViewsd` with CT's and the others'."""
    if modality.lower() != "auto":
        return build(_window_jitter(modality))
    return ModalityViewsd({"CT": build(_window_jitter("CT")), "*": build(_window_jitter("*"))})


def multi_crop(spatial_dims: int, size: int, local_size: int, n_local: int = 4, n_global: int = 2,
               global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
               modality: str = "auto", **augment) -> MultiViewd | ModalityViewsd:
    """DINO's multi-crop: ``n_global`` crops at ``size`` and ``n_local`` at ``local_size``.

    ``modality``: ``"auto"`` reads each item's ``modality`` (CT: HU-window jitter); a name fixes it for every item.
    """
    def build(jitter):
        kw = {**jitter, **augment}
        return MultiViewd(view_augmentation(spatial_dims, size, global_scale, **kw), n_global,
                          view_augmentation(spatial_dims, local_size, local_scale, **kw) if n_local else None, n_local)
    return _per_modality(build, modality)


def two_views(spatial_dims: int, size: int, scale: tuple[float, float] = (0.4, 1.0), modality: str = "auto",
              **augment) -> MultiViewd | ModalityViewsd:
    """SimCLR / Barlow Twins: two independently augmented crops at ``size`` (``modality`` as in :func:`multi_crop`)."""
    return _per_modality(lambda jitter: MultiViewd(view_augmentation(spatial_dims, size, scale, **{**jitter, **augment}), 2), modality)



def crop_box(img: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """The region of ``img`` ``(C, *S)`` inside ``box`` (MONAI's StandardMode corners, voxel units, end exclusive)."""
    d = img.ndim - 1
    lo = [int(round(float(v))) for v in box[:d]]
    hi = [int(round(float(v))) for v in box[d:]]
    return img[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])]


class RandQueryBoxesd(Randomizable):
    """Item -> item plus ``query_views`` ``(K, C, *query_size)`` and ``query_boxes`` ``(K, 2 * dims)``.

    UP-DETR's pretext input: ``n_boxes`` random boxes per image, sampled first (edges between
    ``min_size`` and ``max_fraction`` of the image edge, centred on a foreground voxel, kept if at
    least ``min_foreground`` of the box is foreground, so boxes are not air or black border), then
    cropped deterministically at those boxes, resized to ``query_size`` and augmented
    (``augment``: intensity and noise, no flips; UP-DETR leaves flips out, they make the pretext
    too hard). Boxes are in MONAI's StandardMode (``x1, y1, [z1,] x2, y2, [z2]``), voxel units of
    the item's image, ends exclusive: ``crop_box(image, box)`` is the region a query shows.
    """

    def __init__(self, n_boxes: int = 10, min_size: int | Sequence[int] = 8, max_fraction: float = 0.5,
                 query_size: int | Sequence[int] = 16, fg_threshold: float = 0.05, min_foreground: float = 0.5,
                 augment: Compose | None = None, key: str = "image", views_key: str = "query_views",
                 boxes_key: str = "query_boxes", tries: int = 10) -> None:
        if n_boxes < 1 or not 0 < max_fraction <= 1:
            raise ValueError(f"need n_boxes >= 1 and 0 < max_fraction <= 1, got {n_boxes}, {max_fraction}")
        self.n_boxes, self.min_size, self.max_fraction, self.query_size = n_boxes, min_size, max_fraction, query_size
        self.fg_threshold, self.min_foreground, self.augment, self.tries = fg_threshold, min_foreground, augment, tries
        self.key, self.views_key, self.boxes_key = key, views_key, boxes_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandQueryBoxesd:
        super().set_random_state(seed, state)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data=None) -> None:
        pass

    def sample_boxes(self, img: torch.Tensor) -> np.ndarray:
        """``(K, 2 * dims)`` integer-valued boxes inside ``img`` ``(C, *S)``, on its foreground where there is some."""
        spatial = np.array(img.shape[1:])
        d = len(spatial)
        low = np.minimum(np.array(ensure_tuple_rep(self.min_size, d)), spatial)
        high = np.maximum(low, np.floor(spatial * self.max_fraction).astype(int))
        fg = (img.detach().float().amax(0) > self.fg_threshold).cpu().numpy()
        centres = np.argwhere(fg)
        boxes = []
        for _ in range(self.n_boxes):
            best, best_share = None, -1.0
            for _ in range(self.tries):
                size = np.array([self.R.randint(lo, hi + 1) for lo, hi in zip(low, high)])
                centre = centres[self.R.randint(len(centres))] if len(centres) else np.array([self.R.randint(s) for s in spatial])
                start = np.clip(centre - size // 2, 0, spatial - size)
                share = float(fg[tuple(slice(a, a + n) for a, n in zip(start, size))].mean()) if len(centres) else 1.0
                if share > best_share:
                    best, best_share = np.concatenate([start, start + size]), share
                if share >= self.min_foreground:
                    break
            boxes.append(best)
        return np.stack(boxes).astype(np.float32)

    def __call__(self, data: dict) -> dict:
        img = torch.as_tensor(data[self.key])
        boxes = self.sample_boxes(img)
        d = img.ndim - 1
        resize = Resize(spatial_size=ensure_tuple_rep(self.query_size, d), mode="bilinear" if d == 2 else "trilinear")
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            crops = []
            for box in boxes:
                crop = resize(crop_box(img, box))
                crops.append(self.augment(crop) if self.augment is not None else crop)
        finally:
            set_track_meta(tracking)
        out = dict(data)
        out[self.views_key] = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in crops])
        out[self.boxes_key] = torch.from_numpy(boxes)
        return out


def query_boxes(spatial_dims: int, query_size: int, n_boxes: int = 10, min_size: int | Sequence[int] = 8,
                max_fraction: float = 0.5, modality: str = "auto", intensity: float = 0.1, noise_std: float = 0.02,
                fg_threshold: float = 0.05) -> RandQueryBoxesd | ModalityViewsd:
    """The query-box task's views: :class:`RandQueryBoxesd` with intensity-only augmentation of the crops
    (HU-window jitter for CT items with ``modality="auto"``)."""
    def build(jitter):
        chain: list = [RandWindowJitter()] if jitter["window_jitter"] else []
        if intensity:
            chain += [RandScaleIntensity(factors=intensity, prob=0.5), RandShiftIntensity(offsets=intensity, prob=0.5)]
        if noise_std:
            chain.append(RandGaussianNoise(std=noise_std, prob=0.3))
        chain.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
        return RandQueryBoxesd(n_boxes, min_size, max_fraction, query_size, fg_threshold, augment=Compose(chain))
    return _per_modality(build, modality)
