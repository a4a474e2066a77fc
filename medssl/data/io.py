"""Loading one datalist entry into a channel-first float tensor.

:class:`LoadMedicalImage` is a thin layer over MONAI's ``LoadImage`` that adds what a folder of
clinical files needs and MONAI leaves to the user:

- a DICOM series given as an *ordered list of slice files* (what :mod:`medssl.data.scan` writes)
  is read as one volume by :class:`DicomSeriesReader`; MONAI's own readers would stack a list of
  files as channels;
- the reader is chosen by file type (ITK for DICOM/NRRD/MHA, so RescaleSlope/Intercept is applied
  and CT comes out in HU; nibabel for NIfTI; PIL for PNG/JPEG), whatever readers are installed;
- single-slice DICOM (ITK gives depth 1) becomes a 2D image; one frame of a 4D volume is selected;
- MONOCHROME1 radiographs come out with bone bright, as in MONOCHROME2 (GDCM, under ITK,
  already inverts them; a test holds us to that, since a second inversion would undo it);
- NaN/Inf voxels are replaced by the lowest finite value, with a warning naming the file;
- arrays (MedMNIST) pass through as tensors, so one pipeline serves files and arrays;
- every failure raises :class:`UnreadableImage` naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms import LoadImage, MapTransform, SqueezeDim, Transform

__all__ = ["DicomSeriesReader", "LoadMedicalImage", "LoadMedicalImaged", "UnreadableImage", "describe", "root_cause"]

logger = logging.getLogger(__name__)


class UnreadableImage(RuntimeError):
    """An image that cannot be loaded; the message names the file and the reason."""


def root_cause(exc: BaseException) -> BaseException:
    """The error under MONAI's "applying transform ..." wrappers (each raised ``from`` the one below)."""
    while exc.__cause__ is not None and "applying transform" in str(exc):
        exc = exc.__cause__
    return exc


class DicomSeriesReader(ITKReader):
    """Read an ordered list of DICOM slice files as one 3D volume (ITK ``ImageSeriesReader``).

    MONAI's ``ITKReader`` treats a *list* of files as channels and a *folder* as "the first
    series in it"; neither fits a datalist entry that names exactly the slices of one series.
    The slice order is the caller's (scanning sorts by position along the slice normal).
    """

    def verify_suffix(self, filename) -> bool:
        return isinstance(filename, (list, tuple)) and len(filename) > 1

    def read(self, data, **kwargs):
        import itk

        return itk.imread([os.fspath(f) for f in data], **{**self.kwargs, **kwargs})


def describe(image) -> str:
    """A short name for an entry's image in messages: the file, or the first slice of a series."""
    if isinstance(image, (list, tuple)):
        return f"{image[0]} (series of {len(image)} files)" if image else "empty series"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"array {tuple(image.shape)}"
    return os.fspath(image)


# Reader per kind of source. DICOM (any name), NRRD and MHA/MHD go to ITK.
_READERS = {
    "series": lambda: DicomSeriesReader(affine_lps_to_ras=True),
    "nifti": NibabelReader,
    "photo": PILReader,
    "itk": lambda: ITKReader(affine_lps_to_ras=True),
}


def _reader_kind(image) -> str:
    if isinstance(image, (list, tuple)):
        return "series" if len(image) > 1 else _reader_kind(image[0])
    name = os.fspath(image).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        return "photo"
    return "itk"


class LoadMedicalImage(Transform):
    """Load a file, a DICOM series (list of files) or an array as a channel-first float32 tensor.

    Args:
        frame: for 4D volumes, the frame to keep (``None`` keeps all frames as channels).
    """

    def __init__(self, frame: int | None = None) -> None:
        self.frame = frame
        # One MONAI LoadImage per reader kind, built on first use: LoadImage's constructor
        # instantiates every installed reader, which is too much work to repeat per image.
        self._loaders: dict[str, LoadImage] = {}

    def _loader(self, kind: str) -> LoadImage:
        if kind not in self._loaders:
            self._loaders[kind] = LoadImage(reader=_READERS[kind](), image_only=True, ensure_channel_first=True, dtype=np.float32)
        return self._loaders[kind]

    def __call__(self, image, frame: int | None = None) -> torch.Tensor:
        frame = self.frame if frame is None else frame
        if isinstance(image, (np.ndarray, torch.Tensor)):
            img = MetaTensor(torch.as_tensor(np.asarray(image), dtype=torch.float32))
        else:
            img = self._read(image)
        if frame is not None:  # a 4D volume loads as (frames, x, y, z): keep one frame
            img = img[frame : frame + 1]
        if img.ndim == 4 and img.shape[-1] == 1:  # one DICOM slice: a 2D image
            img = SqueezeDim(dim=-1, update_meta=True)(img)
        if not torch.isfinite(img).all():
            bad = ~torch.isfinite(img)
            low = img[~bad].min() if (~bad).any() else torch.tensor(0.0)
            logger.warning("%s: %d NaN/Inf voxel(s) replaced by %g", describe(image), int(bad.sum()), float(low))
            img = torch.where(bad, low, img)
        return img

    def _read(self, image) -> MetaTensor:
        name = describe(image)
        paths = list(image) if isinstance(image, (list, tuple)) else [image]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UnreadableImage(f"{name}: file not found ({missing[0]}); was it moved after the datalist was written?")
        if any(os.path.getsize(p) == 0 for p in paths):
            raise UnreadableImage(f"{name}: empty file (0 bytes)")
        source = image if len(paths) > 1 else os.fspath(paths[0])
        try:
            return self._loader(_reader_kind(image))(source)
        except Exception as exc:  # readers raise RuntimeError, OSError, ValueError, EOFError ...
            reason = str(exc).strip().splitlines()
            raise UnreadableImage(f"{name}: cannot read ({type(exc).__name__}: {reason[-1] if reason else ''})") from exc


class LoadMedicalImaged(MapTransform):
    """Dictionary wrapper of :class:`LoadMedicalImage`; reads the 4D ``frame`` from the entry."""

    def __init__(self, keys: KeysCollection = "image", frame_key: str = "frame", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalImage()
        self.frame_key = frame_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], frame=d.get(self.frame_key))
        return d

