"""Reading DICOM headers and grouping files into series.

MONAI reads pixels (``ITKReader`` turns an ordered list of slice files into one volume with
the right affine and applies RescaleSlope/Intercept, so CT comes out in HU), but MONAI has no
notion of *which* files form a volume. This module supplies that: it reads only headers
(pixel data is skipped with ``defer_size``), checks each file, and groups slices so that

- files are grouped by SeriesInstanceUID **and** by what must be equal inside one volume
  (modality, matrix size, samples per pixel, orientation, echo, temporal position), so two
  interleaved series, or files that wrongly share a UID, never mix;
- slices are ordered by their position along the slice normal, not by file name;
- missing slices and uneven spacing are reported as warnings on the entry (the volume is kept);
- projection images (CR, DX, MG, US, ...) and single slices become 2D entries; multi-frame
  objects and stacks of two or more slices become 3D entries.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DicomFile", "DicomSeries", "UnreadableFile", "read_dicom_header", "group_series", "looks_like_dicom"]

# Modalities acquired as single projections or photographs: each file is one 2D image.
PROJECTION_MODALITIES = {"CR", "DX", "MG", "XA", "RF", "US", "IO", "PX", "OP", "XC", "ES", "SM", "GM"}
# DICOM objects that carry pixels or geometry but are not images to pretrain on.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


class UnreadableFile(Exception):
    """A file that cannot be used; ``str(exc)`` is the reason shown to the user."""


@dataclass(slots=True)
class DicomFile:
    """The header facts of one DICOM file that scanning needs (pixels are not read).

    A scan holds one per DICOM file until the series are grouped, so it is kept small: slots, and
    the values files of one series share (UIDs, patient, orientation, ...) interned by :func:`_shared`.
    """

    path: str
    series_uid: str
    modality: str
    patient_id: str  # kept in memory only; written out solely as a salted hash
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    image_type: tuple[str, ...]
    echo: str
    temporal: str
    notes: tuple[str, ...] = ()  # header problems worked around (kept on the entry as warnings)

    @property
    def is_phase(self) -> bool:
        """True for MR phase maps (ImageType value 'P' / 'PHASE' or vendor forms such as 'SW_P')."""
        return any(t == "P" or "PHASE" in t or t.endswith("_P") for t in self.image_type)

    def volume_key(self) -> tuple:
        """Files with equal keys may be stacked into one volume."""
        ori = None if self.orientation is None else tuple(np.round(self.orientation, 3))
        return (self.series_uid, self.patient_id, self.modality, self.rows, self.cols, self.samples, ori, self.echo,
                self.temporal)


@dataclass
class DicomSeries:
    """One image entry built from DICOM: a 2D file, a multi-frame file, or an ordered stack of slices."""

    files: list[str]
    modality: str
    patient_id: str
    spatial_dims: int
    shape: list[int]
    spacing: list[float]
    photometric: str
    channels: int
    warnings: list[str] = field(default_factory=list)


def looks_like_dicom(path: str) -> bool:
    """True when the file carries the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def read_dicom_header(path: str, force: bool = False) -> DicomFile:
    """Read the header of ``path`` and check that its pixel data is complete.

    Args:
        path: the file.
        force: read files without the "DICM" preamble (old or raw DICOM) as DICOM.

    Raises:
        UnreadableFile: with the reason (not DICOM, truncated, no pixel data, not an image ...).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = os.path.getsize(path)
    if size == 0:
        raise UnreadableFile("empty file (0 bytes)")
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=force)
    except InvalidDicomError:
        raise UnreadableFile("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise UnreadableFile(f"damaged DICOM header ({type(exc).__name__}: {exc})") from None
    if "SOPClassUID" not in ds and "Rows" not in ds:
        raise UnreadableFile("not a DICOM image (no SOPClassUID or Rows)")
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    if modality in NON_IMAGE_MODALITIES:
        raise UnreadableFile(f"not an image to pretrain on (Modality={modality})")
    raw = ds._dict.get(_PIXEL_DATA)  # deferred: holds the offset and length, not the bytes
    if raw is None or "Rows" not in ds:
        raise UnreadableFile("no pixel data (header only, or file truncated before the pixels)")
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length not in (None, _UNDEFINED_LENGTH) and tell is not None and tell + length > size:
        raise UnreadableFile(f"truncated: pixel data needs {tell + length} bytes, file has {size}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    notes = []
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    if spacing is not None and min(spacing) <= 0:  # seen in the wild: ImagerPixelSpacing 0\0
        spacing = None
    if spacing is None and (ds.get("PixelSpacing") is not None or ds.get("ImagerPixelSpacing") is not None):
        shown = ds.get("PixelSpacing") if ds.get("PixelSpacing") is not None else ds.get("ImagerPixelSpacing")
        text = str(shown) if isinstance(shown, (str, bytes)) else "\\".join(str(v) for v in shown)  # as written: a\b
        notes.append(f"pixel spacing {text[:40]!r} is not readable: 1 mm assumed")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UnreadableFile(f"image size in the header is not readable ({exc})") from None
    if rows < 1 or cols < 1:
        raise UnreadableFile(f"header gives an image of {rows} x {cols} pixels")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    native = syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "")  # uncompressed
    need = rows * cols * samples * max(1, bits // 8) * max(1, _int(ds.get("NumberOfFrames", 1)))
    if native and length not in (None, _UNDEFINED_LENGTH) and length < need:
        raise UnreadableFile(f"header says {rows} x {cols} pixels ({need} bytes) but the pixel data holds {length} bytes")
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or ds.get("StudyInstanceUID", "") or "unknown")
    return DicomFile(
        path=path,
        series_uid=_shared(str(ds.get("SeriesInstanceUID", "") or f"no-series:{path}")),
        modality=_shared(modality),
        patient_id=_shared(patient),
        rows=rows,
        cols=cols,
        frames=frames,
        samples=samples,
        photometric=_shared(str(ds.get("PhotometricInterpretation", "MONOCHROME2"))),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_shared(_floats(ds.get("ImageOrientationPatient"), 6)),
        pixel_spacing=_shared(spacing),
        image_type=_shared(tuple(str(t).upper() for t in (ds.get("ImageType") or ()))),
        echo=_shared(str(ds.get("EchoNumbers", "") or "")),
        temporal=_shared(str(ds.get("TemporalPositionIdentifier", "") or "")),
        notes=_shared(tuple(notes)),
    )


_SHARED: dict = {}


def _shared(value):
    """One object for equal header values (the files of a series repeat them), so 100,000 headers cost little more
    than their paths and positions. Bounded: past 100,000 distinct values new ones are kept as they are."""
    if value is None:
        return None
    try:
        return _SHARED.setdefault(value, value) if len(_SHARED) < 100_000 or value in _SHARED else value
    except TypeError:  # an unhashable value
        return value


def _int(value, default: int = 1) -> int:
    try:
        return int(value or default)
    except (TypeError, ValueError):
        return default


def _in_plane(f: DicomFile) -> tuple[list[int], list[float]]:
    """Shape and spacing of one frame as MONAI's ITKReader returns it: (columns, rows)."""
    row_mm, col_mm = f.pixel_spacing or (1.0, 1.0)  # PixelSpacing = (between rows, between columns)
    return [f.cols, f.rows], [col_mm, row_mm]


def _single(f: DicomFile) -> DicomSeries:
    shape, spacing = _in_plane(f)
    dims = 3 if f.frames > 1 else 2
    if dims == 3:
        shape, spacing = shape + [f.frames], spacing + [1.0]
    return DicomSeries([f.path], f.modality, f.patient_id, dims, shape, spacing, f.photometric, f.samples,
                       list(f.notes))


def _stack(files: list[DicomFile]) -> DicomSeries:
    """Order slices along the normal of the image plane and check their spacing."""
    ori = np.asarray(files[0].orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    depth = np.array([np.dot(normal, f.position) for f in files])
    order = np.argsort(depth, kind="stable")
    files, depth = [files[i] for i in order], depth[order]
    warnings = []
    steps = np.diff(depth)
    duplicates = int(np.sum(steps < 1e-3))
    if duplicates:
        keep = np.concatenate([[True], steps >= 1e-3])
        files, depth = [f for f, k in zip(files, keep) if k], depth[keep]
        warnings.append(f"{duplicates} duplicate slice position(s) dropped")
        steps = np.diff(depth)
    step = float(np.median(steps)) if len(steps) else 1.0
    if len(files) > 1 and step > 0:  # gantry tilt: slice origins drift in-plane as the stack advances
        origins = np.array([f.position for f in files], dtype=float)
        drift = origins[-1] - origins[0]
        along = np.dot(drift, normal)
        sideways = np.linalg.norm(drift - along * normal)
        angle = float(np.degrees(np.arctan2(sideways, abs(along)))) if abs(along) > 0 else 0.0
        if angle > 0.5:
            warnings.append(f"gantry tilt of about {angle:.1f} degrees: slices kept as acquired (not resampled), "
                            "so the volume is slightly sheared")
    if len(steps) and np.any(np.abs(steps - step) > 0.1 * step):
        gaps = steps[steps > 1.5 * step]
        if len(gaps):
            missing = int(np.sum(np.round(gaps / step) - 1))
            warnings.append(f"about {missing} missing slice(s): gaps of {np.round(gaps, 2).tolist()} mm vs {step:.2f} mm")
        else:
            warnings.append(f"uneven slice spacing: {steps.min():.2f} to {steps.max():.2f} mm")
    shape, spacing = _in_plane(files[0])
    notes = sorted({n for f in files for n in f.notes})
    return DicomSeries(
        [f.path for f in files],
        files[0].modality,
        files[0].patient_id,
        3,
        shape + [len(files)],
        spacing + [round(step, 4)],
        files[0].photometric,
        files[0].samples,
        notes + warnings,
    )


def group_series(files: list[DicomFile]) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """Group header records into image entries.

    Returns:
        ``(series, skipped)`` where ``skipped`` lists ``(path, reason)`` for files left out
        (MR phase maps; slices that cannot be placed in a volume).
    """
    skipped: list[tuple[str, str]] = []
    groups: dict[tuple, list[DicomFile]] = defaultdict(list)
    singles: list[DicomFile] = []
    placed = {f.series_uid for f in files if f.position is not None and f.orientation is not None}
    patients = defaultdict(set)
    for f in files:
        patients[f.series_uid].add(f.patient_id)
    for f in files:
        volume_slice = f.modality not in PROJECTION_MODALITIES and f.frames == 1
        if f.is_phase:
            kind = "/".join(f.image_type)
            skipped.append((f.path, f"MR phase image (ImageType {kind}); medssl pretrains on magnitude images"))
        elif volume_slice and (f.position is None or f.orientation is None) and f.series_uid in placed:
            skipped.append((f.path, "slice without ImagePositionPatient/ImageOrientationPatient: it cannot be placed in "
                                    f"its series {f.series_uid[-24:]}, whose other slices have positions"))
        elif not volume_slice or f.position is None or f.orientation is None:
            singles.append(f)
        else:
            groups[f.volume_key()].append(f)
    series = [_single(f) for f in singles]
    for members in groups.values():
        series.append(_single(members[0]) if len(members) == 1 else _stack(members))
        if len(patients[members[0].series_uid]) > 1:
            series[-1].warnings.append(f"SeriesInstanceUID shared by {len(patients[members[0].series_uid])} patients: "
                                       "their slices are kept apart, one volume per patient")
    series.sort(key=lambda s: s.files[0])
    return series, skipped
