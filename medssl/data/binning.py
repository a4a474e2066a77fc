"""Size binning: batches of images of many sizes without spending compute on padding.

A radiograph archive mixes chest films (about square), extremities (tall and narrow) and
cropped detector frames. Pad-to-square (the default pipeline) resizes each image's longest side
to ``size`` and pads the rest: a 1:2 hand radiograph then costs twice the tokens it has. Binning
(after VariViT, Varma et al., MIDL 2024) batches images of similar shape instead; the ViT takes
any grid, so each batch can have its own shape.

- **strict**: one bin per native shape. Every image of a bin is scaled by the same factor
  (longest side ``size``, rounded up to a multiple of the patch), so no batch has padding beyond
  that rounding; shapes with fewer images than a batch cannot be batched and are left out
  (:attr:`BinPlan.dropped` lists them).
- **smart**: ``n_bins`` bin shapes chosen from the data. Each image, scaled to longest side
  ``size``, is a point ``shape / size`` (its aspect); Lloyd's k-means on these points (started
  from quantiles of the first axis' share, so it is deterministic; a cluster too small for a
  batch is dissolved into its neighbours) groups similar aspects, and a
  bin's shape is the ``quantile`` (default 0.9) of its members' scaled shapes along each axis,
  rounded up to the patch. An image is then resized into its bin with its aspect kept (never
  enlarged beyond ``max_upscale`` times its native size) and padded. Nothing is discarded.

:func:`plan_bins` makes the plan; ``plan.entries`` carry ``bin_shape`` for :class:`FitToBind`
(the pipeline's last deterministic step, so caches hold binned images) and ``plan.keys`` is
what :class:`~medssl.engine.determinism.BinnedBatchSampler` batches by.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import MapTransform, Resize, SpatialPad

from ..errors import UserError

__all__ = ["BinPlan", "plan_bins", "fit_shape", "FitToBin", "FitToBind", "entry_shape", "BINNING_MODES"]

BINNING_MODES = ("none", "strict", "smart")


class MissingShape(UserError, ValueError):
    """Binning needs every entry's image shape."""


def entry_shape(entry: dict) -> tuple[int, ...]:
    """The spatial shape of an entry's image: its ``shape`` field (from ``medssl scan``) or, for an
    in-memory image (MedMNIST), the array's shape after the channel axis."""
    if entry.get("shape"):
        return tuple(int(s) for s in entry["shape"])
    image = entry.get("image")
    if hasattr(image, "shape") and len(image.shape) >= 3:
        return tuple(int(s) for s in image.shape[1:])
    raise MissingShape(f"{str(image)[:120]}: the entry has no 'shape'; binning needs it (make the datalist with `medssl scan`)")


def _round_up(x: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(x / multiple - 1e-9)) * multiple)


def _scaled(shape: Sequence[int], size: int) -> np.ndarray:
    """``shape`` with its longest side resized to ``size`` (aspect kept)."""
    shape = np.asarray(shape, dtype=np.float64)
    return shape * (size / shape.max())


def fit_shape(shape: Sequence[int], bin_shape: Sequence[int], max_upscale: float | None = None) -> tuple[int, ...]:
    """The size an image of ``shape`` is resized to inside ``bin_shape``: the largest with its
    aspect kept that fits, never more than ``max_upscale`` times ``shape`` (``None``: no limit)."""
    scale = min(b / s for b, s in zip(bin_shape, shape))
    if max_upscale is not None:
        scale = min(scale, max_upscale)
    return tuple(max(1, min(b, int(round(s * scale)))) for s, b in zip(shape, bin_shape))


@dataclass
class BinPlan:
    """Which bin every kept entry goes to, and what could not be batched.

    Attributes:
        mode: ``none``, ``strict`` or ``smart``.
        entries: the kept entries, each with ``bin_shape`` (binned modes) — hand these to the dataset.
        keys: one bin key per kept entry (the bin's shape), or ``None`` without binning.
        bin_shapes: the bins' shapes with how many images each holds.
        dropped: ``(native shape, count)`` of the shapes strict binning could not batch.
    """

    mode: str
    entries: list[dict]
    keys: list[Hashable] | None
    bin_shapes: dict[tuple[int, ...], int] = field(default_factory=dict)
    dropped: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return sum(n for _, n in self.dropped)

    def report(self) -> str:
        """One line: the bins and what was left out."""
        if self.mode == "none":
            return "binning: none (every image padded to a square)"
        shown = ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in sorted(self.bin_shapes.items(), key=lambda kv: -kv[1])[:8])
        more = f" and {len(self.bin_shapes) - 8} more" if len(self.bin_shapes) > 8 else ""
        line = f"binning: {self.mode}, {len(self.bin_shapes)} bin(s): {shown}{more}"
        if self.dropped:
            line += (f"; {self.n_dropped} image(s) of {len(self.dropped)} size(s) with fewer images than a batch left out "
                     f"(e.g. {'x'.join(map(str, self.dropped[0][0]))}: {self.dropped[0][1]})")
        return line


def _lloyd(points: np.ndarray, centres: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means from ``centres``: (each point's cluster, the centres)."""
    centres = centres.copy()
    assign = None
    for _ in range(iterations):
        new = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        for c in range(len(centres)):
            if (assign == c).any():
                centres[c] = points[assign == c].mean(0)
    return assign, centres


def _clusters(points: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """k-means started from quantiles of the first coordinate; a cluster with fewer than ``min_size``
    points is dissolved into the others (its centre removed, Lloyd rerun) until none is left."""
    order = np.argsort(points[:, 0], kind="stable")
    centres = points[order[np.linspace(0, len(points) - 1, k).round().astype(int)]]
    while True:
        assign, centres = _lloyd(points, centres)
        sizes = np.bincount(assign, minlength=len(centres))
        if len(centres) == 1 or sizes.min() >= min_size:
            break
        centres = np.delete(centres, sizes.argmin(), axis=0)
    return np.unique(assign, return_inverse=True)[1]


def plan_bins(entries: Sequence[dict], mode: str = "smart", n_bins: int = 4, size: int = 224, multiple: int = 16,
              batch_size: int = 16, quantile: float = 0.9, log: bool = True) -> BinPlan:
    """Assign ``entries`` to bins (see the module docstring); ``mode="none"`` returns them unchanged.

    Args:
        size: the longest side of a binned image (the token budget: ``size / patch`` tokens per edge).
        multiple: bin edges are multiples of this (the ViT patch).
        batch_size: strict bins with fewer images are left out; smart bins are merged until each has this many.
        quantile: a smart bin's edge covers this share of its members at full scale (the rest are shrunk slightly).
    """
    entries = list(entries)
    if mode not in BINNING_MODES:
        raise UserError(f"binning must be one of {', '.join(BINNING_MODES)}, got {mode!r}")
    if mode == "none":
        return BinPlan("none", entries, None)
    if size % multiple:
        raise UserError(f"binning: the image size {size} is not a multiple of the patch size {multiple}")
    shapes = [entry_shape(e) for e in entries]
    if mode == "strict":
        counts = Counter(shapes)
        keep = {s for s, n in counts.items() if n >= batch_size}
        dropped = sorted(((s, n) for s, n in counts.items() if s not in keep), key=lambda sn: -sn[1])
        bins = {s: tuple(_round_up(v, multiple) for v in _scaled(s, size)) for s in keep}
        kept = [(e, bins[s]) for e, s in zip(entries, shapes) if s in keep]
    else:
        points = np.stack([_scaled(s, size) / size for s in shapes])
        k = max(1, min(int(n_bins), len(set(map(tuple, points.round(4).tolist())))))
        assign = _clusters(points, k, min(batch_size, len(entries)))  # a bin too small for a batch is merged away
        bin_of = {}
        for c in np.unique(assign):
            member = points[assign == c] * size
            bin_of[c] = tuple(_round_up(v, multiple) for v in np.quantile(member, quantile, axis=0))
        kept = [(e, bin_of[c]) for e, c in zip(entries, assign)]
        dropped = []
    if not kept:
        raise UserError(f"strict binning: no image size has {batch_size} images (a batch); use binning 'smart' "
                        f"({len(set(shapes))} different sizes among {len(entries)} images)")
    plan = BinPlan(mode, [dict(e, bin_shape=list(b)) for e, b in kept], [b for _, b in kept],
                   dict(Counter(b for _, b in kept)), dropped)
    if log:
        import logging

        logging.getLogger(__name__).info(plan.report())
    return plan


class FitToBin:
    """Resize a channel-first image into ``bin_shape`` with its aspect kept, then zero-pad it (centred)."""

    def __init__(self, max_upscale: float | None = 2.0) -> None:
        self.max_upscale = max_upscale

    def __call__(self, img: torch.Tensor, bin_shape: Sequence[int]) -> torch.Tensor:
        bin_shape = tuple(int(b) for b in bin_shape)
        if len(bin_shape) != img.ndim - 1:
            raise ValueError(f"a {len(bin_shape)}D bin for a {img.ndim - 1}D image")
        shape = fit_shape(img.shape[1:], bin_shape, self.max_upscale)
        if tuple(shape) != tuple(img.shape[1:]):  # area averaging when shrinking, linear when enlarging
            mode = "area" if all(t <= s for t, s in zip(shape, img.shape[1:])) else ("bilinear" if len(shape) == 2 else "trilinear")
            img = Resize(spatial_size=shape, mode=mode)(img)
        return SpatialPad(spatial_size=bin_shape, method="symmetric")(img)


class FitToBind(MapTransform):
    """Dictionary version of :class:`FitToBin`: the bin comes from the entry's ``bin_shape`` field."""

    def __init__(self, keys="image", shape_key: str = "bin_shape", max_upscale: float | None = 2.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.shape_key, self.fit = shape_key, FitToBin(max_upscale)

    def __call__(self, data):
        d = dict(data)
        if self.shape_key not in d:
            raise KeyError(f"FitToBind: the entry has no {self.shape_key!r} (make the entries with medssl.data.binning.plan_bins)")
        for key in self.key_iterator(d):
            d[key] = self.fit(d[key], d[self.shape_key])
        return d
