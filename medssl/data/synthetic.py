"""Embedded default data: CT-like abdominal phantoms written as real DICOM series and NIfTI,
plus radiograph-like projections as PNG.

The phantoms let every command run on a fresh machine with no download. Each case is drawn
from a seed: a body outline with a subcutaneous fat layer, liver, spleen, kidneys, aorta, a
vertebral body with cortical bone, bowel gas, lung bases in the upper slices, Gaussian noise,
and in about half the cases a hypodense liver lesion, whose presence is the case's label.
Values are in HU; DICOM stores them as unsigned integers with RescaleIntercept -1024.

Layout written by :func:`make_phantoms`::

    out/ct_dicom/case_000/slice_000.dcm ...   one DICOM series per case (axial, LPS geometry)
    out/ct_nifti/case_000.nii.gz              the same volume as NIfTI (RAS affine)
    out/xray/case_000.png                     a digitally reconstructed radiograph (AP)
    out/labels.csv                            case, lesion (0/1), lesion diameter in mm
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PhantomCase", "make_ct_phantom", "make_phantoms", "drr", "embedded_dataset", "EMBEDDED_KINDS"]


@dataclass(frozen=True)
class PhantomCase:
    """One generated case: HU volume indexed (x, y, z) in LPS order, its spacing and label."""

    volume: np.ndarray  # (X, Y, Z) float32 HU; x -> patient left, y -> posterior, z -> superior
    spacing: tuple[float, float, float]  # mm
    lesion: int  # 1 if a liver lesion is present
    lesion_mm: float


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_ct_phantom(seed: int, shape=(96, 96, 64), spacing=(3.5, 3.5, 4.0), lesion: bool | None = None) -> PhantomCase:
    """Draw one abdominal CT phantom (HU). Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    fov = np.array(shape) * np.array(spacing)
    # coordinates in mm, centred: x left(+)/right(-), y posterior(+), z superior(+)
    axes = [(np.arange(n) + 0.5) * s - f / 2 for n, s, f in zip(shape, spacing, fov)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    vol = np.full(shape, -1000.0, dtype=np.float32)  # air

    scale = rng.uniform(0.85, 1.08)
    a, b = 0.40 * fov[0] * scale, 0.28 * fov[1] * scale  # body semi-axes (mm)
    taper = 1.0 - 0.08 * (z / (fov[2] / 2)) ** 2  # slightly narrower at both ends
    body = (x / (a * taper)) ** 2 + (y / (b * taper)) ** 2 <= 1.0
    inner = (x / (a * taper - 12)) ** 2 + (y / (b * taper - 12)) ** 2 <= 1.0
    vol[body] = -100.0  # subcutaneous fat
    vol[inner] = 40.0  # muscle / soft tissue
    jitter = lambda s: rng.normal(0, s)  # noqa: E731  (organ placement varies per case)
    liver = _ellipsoid((x, y, z), (-0.45 * a + jitter(5), -0.1 * b + jitter(4), 0.15 * fov[2]), (0.42 * a, 0.55 * b, 0.35 * fov[2]))
    vol[liver & inner] = 60.0
    spleen = _ellipsoid((x, y, z), (0.55 * a + jitter(4), 0.25 * b, 0.2 * fov[2]), (0.16 * a, 0.3 * b, 0.18 * fov[2]))
    vol[spleen & inner] = 50.0
    for side in (-1, 1):
        kidney = _ellipsoid((x, y, z), (side * 0.38 * a + jitter(3), 0.45 * b, -0.05 * fov[2] + jitter(4)), (0.12 * a, 0.2 * b, 0.2 * fov[2]))
        vol[kidney & inner] = 150.0  # enhancing cortex
        medulla = _ellipsoid((x, y, z), (side * 0.38 * a, 0.45 * b, -0.05 * fov[2]), (0.06 * a, 0.1 * b, 0.12 * fov[2]))
        vol[medulla & inner] = 30.0
    aorta = (x - 0.05 * a) ** 2 + (y - 0.3 * b) ** 2 <= (0.06 * a) ** 2
    vol[aorta & inner] = 180.0
    spine_c = (0.0, 0.72 * b)
    vertebra = (x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2 <= (0.13 * a) ** 2
    marrow = (x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2 <= (0.10 * a) ** 2
    vol[vertebra & body] = 700.0
    vol[marrow & body] = 250.0
    for _ in range(rng.integers(3, 7)):  # bowel gas pockets
        c = (rng.uniform(-0.3, 0.4) * a, rng.uniform(-0.6, 0.0) * b, rng.uniform(-0.4, 0.1) * fov[2])
        gas = _ellipsoid((x, y, z), c, rng.uniform(6, 14, size=3))
        vol[gas & inner & ~liver] = -900.0
    for side in (-1, 1):  # lung bases in the upper slices
        lung = _ellipsoid((x, y, z), (side * 0.45 * a, 0.1 * b, 0.62 * fov[2]), (0.35 * a, 0.7 * b, 0.3 * fov[2]))
        vol[lung & inner & ~(vertebra | aorta)] = -850.0

    has_lesion = bool(rng.random() < 0.5) if lesion is None else bool(lesion)
    diameter = 0.0
    if has_lesion:
        diameter = float(rng.uniform(14, 28))
        for _ in range(100):  # place the lesion fully inside the liver
            c = (-0.45 * a + rng.uniform(-0.2, 0.2) * a, -0.1 * b + rng.uniform(-0.25, 0.25) * b, 0.15 * fov[2] + rng.uniform(-0.15, 0.15) * fov[2])
            sphere = _ellipsoid((x, y, z), c, (diameter / 2,) * 3)
            if sphere.any() and np.all(liver[sphere]):
                break
        vol[sphere] = 15.0  # hypodense (cyst / metastasis)
    vol += rng.normal(0.0, 12.0, size=shape).astype(np.float32)  # quantum noise
    vol = np.round(np.clip(vol, -1000.0, None))  # whole HU, as a scanner stores them
    return PhantomCase(vol.astype(np.float32), tuple(float(s) for s in spacing), int(has_lesion), diameter)


def drr(volume_hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Digitally reconstructed AP radiograph of a (X, Y, Z) HU volume: (Z, X) uint8, bone bright."""
    mu = np.clip(volume_hu + 1000.0, 0, None) / 1000.0 * 0.02  # linear attenuation per mm (water ~0.02)
    line = mu.sum(axis=1) * spacing[1]  # log-attenuation integrated along y (anterior-posterior): (X, Z)
    img = np.clip(line / max(float(np.percentile(line, 99.5)), 1e-6), 0, 1) ** 1.5  # film-like contrast
    return (np.flipud(img.T) * 255).astype(np.uint8)  # rows = superior -> inferior, as a radiograph


def _write_dicom_series(case: PhantomCase, folder: Path, index: int, seed: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda *parts: generate_uid(entropy_srcs=["medssl-phantom", str(seed), str(index), *map(str, parts)])  # noqa: E731
    study, series, frame = uid("study"), uid("series"), uid("frame")
    sx, sy, sz = case.spacing
    nx, ny, nz = case.volume.shape
    origin = (-nx * sx / 2, -ny * sy / 2, -nz * sz / 2)  # LPS, mm, so the volume is centred
    stored = np.clip(np.round(case.volume + 1024.0), 0, 4095).astype(np.uint16)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "medssl phantom", "ABDOMEN PHANTOM"
        ds.PatientName, ds.PatientID = f"PHANTOM^CASE{index:03d}", f"MEDSSL-PHANTOM-{index:03d}"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(origin[0], 4), round(origin[1], 4), round(origin[2] + k * sz, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sy, sx]  # (between rows, between columns)
        ds.SliceThickness = sz
        ds.SliceLocation = round(origin[2] + k * sz, 4)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 50, 400
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


def _write_nifti(case: PhantomCase, path: Path) -> None:
    import nibabel as nib

    sx, sy, sz = case.spacing
    nx, ny, nz = case.volume.shape
    origin = np.array([-nx * sx / 2, -ny * sy / 2, -nz * sz / 2])
    # the array is in LPS order; NIfTI affines map to RAS, so x and y flip sign
    affine = np.array([[-sx, 0, 0, -origin[0]], [0, -sy, 0, -origin[1]], [0, 0, sz, origin[2]], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.round(case.volume).astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def make_phantoms(out: str | os.PathLike, n_cases: int = 8, seed: int = 0, shape=(96, 96, 64), spacing=(3.5, 3.5, 4.0),
                  formats=("dicom", "nifti", "xray"), progress: bool = True) -> Path:
    """Write ``n_cases`` phantoms under ``out`` (see the module docstring for the layout).

    Lesions alternate present/absent so both labels occur in any set of two or more cases.
    Returns ``out``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    unknown = set(formats) - {"dicom", "nifti", "xray"}
    if unknown:
        raise ValueError(f"unknown phantom formats {sorted(unknown)}; choose from dicom, nifti, xray")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(n_cases), desc="writing phantoms", unit="case", disable=not progress):
        case = make_ct_phantom(seed * 100_003 + i, shape, spacing, lesion=bool(i % 2))
        name = f"case_{i:03d}"
        if "dicom" in formats:
            _write_dicom_series(case, out / "ct_dicom" / name, i, seed)
        if "nifti" in formats:
            _write_nifti(case, out / "ct_nifti" / f"{name}.nii.gz")
        if "xray" in formats:
            (out / "xray").mkdir(exist_ok=True)
            Image.fromarray(drr(case.volume, case.spacing)).save(out / "xray" / f"{name}.png")
        rows.append({"case": name, "lesion": case.lesion, "lesion_mm": round(case.lesion_mm, 1)})
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "lesion", "lesion_mm"])
        writer.writeheader()
        writer.writerows(rows)
    # ready-made labelled tables for `medssl evaluate` / `benchmark` (label: lesion present)
    for fmt, name, rel, modality in (("nifti", "labels_ct.csv", "ct_nifti/{}.nii.gz", "CT"), ("xray", "labels_xray.csv", "xray/{}.png", "XR")):
        if fmt in formats:
            with open(out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["image", "label", "modality"])
                writer.writeheader()
                writer.writerows({"image": rel.format(r["case"]), "label": r["lesion"], "modality": modality} for r in rows)
    return out


EMBEDDED_KINDS = ("ct_dicom", "ct_nifti", "xray")


def embedded_dataset(kind: str = "ct_dicom", root: str | os.PathLike | None = None, n_cases: int = 8, seed: int = 0) -> str:
    """Folder of the embedded default data (generated once, on first use): the bundles' ``dataset_dir``.

    ``root`` defaults to ``$MEDSSL_DATA`` or ``~/.cache/medssl/phantoms``. The set is written to a
    temporary sibling and renamed into place, so concurrent first uses (DDP ranks) never see half a set.
    """
    import shutil
    import tempfile

    if kind not in EMBEDDED_KINDS:
        raise ValueError(f"embedded data kind must be one of {EMBEDDED_KINDS}, got {kind!r}")
    root = Path(root or os.environ.get("MEDSSL_DATA") or Path.home() / ".cache" / "medssl" / "phantoms")
    if not (root / "labels.csv").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        make_phantoms(tmp, n_cases=n_cases, seed=seed, progress=False)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first (or root exists but is incomplete)
            if not (root / "labels.csv").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return str(root / kind)
