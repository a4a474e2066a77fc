"""The standard pretraining pipeline: datalist entry -> fixed-size tensor the model sees.

``build_transforms`` returns one MONAI ``Compose`` whose deterministic head (load, orientation,
spacing, intensity, padding, foreground map) is what ``CacheDataset``/``PersistentDataset``
cache, and whose random tail (patches or slices) runs at every draw. The pieces are MONAI
transforms plus the few of ours in :mod:`~medssl.data.io`, :mod:`~medssl.data.intensity`
and :mod:`~medssl.data.patches`.

Three shapes of output, chosen by ``spatial_dims`` and ``source_dims``:

- 3D from 3D: random foreground-weighted patches of ``size`` (``num_samples`` per volume);
- 2D from 2D: the whole image resized (longest side = ``size``) and padded to a square, or, with
  ``binning``, resized into its entry's ``bin_shape`` (:mod:`~medssl.data.binning`);
- 2D from 3D: random foreground-weighted axial slices, resized and padded the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    Orientationd,
    Resized,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.utils import ensure_tuple_rep

from ..errors import UserError
from .binning import BINNING_MODES, FitToBind
from .fields import KeepFieldsd
from .intensity import ModalityIntensityd, ToChannelsd
from .io import LoadMedicalImaged
from .patches import ForegroundGridd, RandForegroundPatchesd, SliceAxisLastd

__all__ = ["PipelineConfig", "build_transforms"]


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the standard pipeline (the defaults suit a small ViT on CPU)."""

    spatial_dims: int = 3
    size: int | Sequence[int] = 64  # patch edge (3D) or image edge (2D); divisible by the ViT patch
    source_dims: int | None = None  # 3 with spatial_dims=2: train a 2D model on slices of volumes
    channels: int = 1  # what the model takes: grey 1, RGB 3, or one per CT window
    ct_windows: object = "abdomen"  # a name, (level, width), or a list for several channels
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    pixdim: Sequence[float] | None = None  # resample 3D volumes to this spacing (mm); None keeps it
    num_samples: int = 2  # patches / slices drawn per volume per visit (amortises loading)
    fg_threshold: float = 0.05  # intensity in [0, 1] above which a voxel is foreground
    fg_prob: float = 0.9  # share of patches centred on foreground
    binning: str = "none"  # none | strict | smart: 2D images keep their aspect, resized into their entry's bin_shape
    max_upscale: float | None = 2.0  # binned images are never enlarged more than this


    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        source = self.source_dims or self.spatial_dims
        if source not in (2, 3) or source < self.spatial_dims:
            raise ValueError(f"source_dims {self.source_dims} does not fit spatial_dims {self.spatial_dims}")
        if self.binning not in BINNING_MODES:
            raise UserError(f"binning must be one of {', '.join(BINNING_MODES)}, got {self.binning!r}")
        if self.binning != "none" and not self.spatial_dims == source == 2:
            raise UserError(f"binning {self.binning!r} is for 2D images of many sizes; {source}D sources train on fixed-size "
                            "patches or slices (use binning: none)")


def build_transforms(config: PipelineConfig | None = None, train: bool = True, **overrides) -> Compose:
    """Build the pipeline for ``config`` (or ``PipelineConfig(**overrides)``).

    ``train=False`` gives the deterministic twin used for embeddings and evaluation: 3D volumes
    come out whole (padded to at least ``size``; tile them with :func:`medssl.data.tiling.tiles`)
    and 2D-from-3D takes the middle slice instead of random ones.
    """
    cfg = config or PipelineConfig(**overrides)
    source = cfg.source_dims or cfg.spatial_dims
    k = "image"
    head = [
        LoadMedicalImaged(keys=k),
        ModalityIntensityd(keys=k, ct_windows=cfg.ct_windows, mr_percentiles=cfg.mr_percentiles),
        ToChannelsd(keys=k, channels=cfg.channels),
    ]
    if source == 3:
        head[1:1] = [Orientationd(keys=k, axcodes="RAS", labels=None)]
        if cfg.pixdim is not None:
            head[2:2] = [Spacingd(keys=k, pixdim=ensure_tuple_rep(cfg.pixdim, 3), mode="bilinear")]
    size = ensure_tuple_rep(cfg.size, cfg.spatial_dims)
    plane = (size[0], size[1])
    to_square = [Resized(keys=k, spatial_size=max(plane), size_mode="longest", mode="area"), SpatialPadd(keys=k, spatial_size=plane)]
    if cfg.spatial_dims == 3:
        cell = max(1, min(size) // 4)
        head += [SpatialPadd(keys=k, spatial_size=size), ForegroundGridd(keys=k, threshold=cfg.fg_threshold, cell=cell)]
        tail = [RandForegroundPatchesd(keys=k, patch_size=size, num_samples=cfg.num_samples, fg_prob=cfg.fg_prob, cell=cell)]
        if not train:
            head, tail = head[:-1], []  # the whole volume; no foreground map needed
    elif source == 3:  # 2D slices of 3D volumes
        cell = (16, 16, 1)  # one row of cells per slice: slices are drawn by their foreground share
        head += [SliceAxisLastd(keys=k), ForegroundGridd(keys=k, threshold=cfg.fg_threshold, cell=cell)]
        tail = [RandForegroundPatchesd(keys=k, patch_size=(-1, -1, 1), num_samples=cfg.num_samples, fg_prob=cfg.fg_prob, cell=cell),
                SqueezeDimd(keys=k, dim=3)] + to_square
        if not train:
            head, tail = head[:-1], [CenterSpatialCropd(keys=k, roi_size=(-1, -1, 1)), SqueezeDimd(keys=k, dim=3)] + to_square
    elif cfg.binning != "none":  # each image into its own bin's shape, aspect kept (medssl.data.binning)
        head += [FitToBind(keys=k, max_upscale=cfg.max_upscale)]
        tail = []
    else:
        head += to_square
        tail = []
    finish = [KeepFieldsd(keys=k), EnsureTyped(keys=k, track_meta=False)]  # every scalar entry field reaches the batch
    return Compose(head + tail + finish)
