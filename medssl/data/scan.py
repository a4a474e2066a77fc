"""Scanning a folder of clinical images into a MONAI-style datalist.

``scan_folder(root)`` walks ``root``, recognises every image it can use and reports every file
it cannot, with the reason. One unreadable file never stops a scan. The result is::

    {"training": [{"image": "rel/path.nii.gz" | ["slice1.dcm", ...], "modality": "CT",
                   "patient": "3f2a...", "spatial_dims": 3, "shape": [...], "spacing": [...]}],
     "skipped":  [{"path": "rel/bad.dcm", "reason": "truncated: ..."}]}

DICOM is found by content (the "DICM" preamble), whatever the file is called; files named
``.dcm``/``.ima`` or with no extension are also tried without a preamble. Patient names and IDs
only ever leave this module as salted hashes (:mod:`medssl.data.privacy`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..progress import plain_progress
from .dicom import DicomFile, UnreadableFile, group_series, looks_like_dicom, read_dicom_header
from .privacy import default_salt, patient_hash

__all__ = ["ScanResult", "scan_folder", "write_datalist", "reason_kind", "VOLUME_SUFFIXES", "PHOTO_SUFFIXES"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_COMPANION_SUFFIXES = (".raw", ".zraw", ".img.gz")  # data halves of .mhd / .nhdr headers
_MAYBE_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
# Documents that sit beside images (labels, notes, reports): counted, not reported as skipped.
_DOCUMENT_SUFFIXES = (".csv", ".tsv", ".json", ".txt", ".md", ".yaml", ".yml", ".xml", ".html", ".pdf", ".log", ".py")
_FUNDUS_WORDS = {"fundus", "retina", "retinal", "chasedb1", "drive", "aptos", "eyepacs", "messidor", "idrid"}
_XRAY_WORDS = {"xray", "cxr", "radiograph", "radiographs", "chest", "cr", "dx", "nih", "chexpert", "mimic"}
_CT_WORDS = {"ct", "cta", "hu"}
_MASK_WORDS = {"label", "labels", "seg", "segmentation", "mask", "masks", "annotation", "1stho", "2ndho", "gt", "manual"}


@dataclass
class ScanResult:
    """Entries found and files skipped, with paths absolute until written."""

    entries: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    documents: int = 0  # text files (csv, json, txt ...) passed over
    files: int = 0  # files examined
    seconds: float = 0.0  # how long the scan took

    def summary(self) -> str:
        """A plain-text table: entries per modality and dimensionality, skipped files per reason."""
        lines = [f"{'modality':<10}{'2D':>6}{'3D':>6}", "-" * 22]
        counts = Counter((e["modality"], e["spatial_dims"]) for e in self.entries)
        for mod in sorted({m for m, _ in counts}):
            lines.append(f"{mod:<10}{counts[(mod, 2)]:>6}{counts[(mod, 3)]:>6}")
        lines.append(f"{'total':<10}{sum(c for (_, d), c in counts.items() if d == 2):>6}"
                     f"{sum(c for (_, d), c in counts.items() if d == 3):>6}")
        if self.seconds:
            lines.append(f"\n{self.files} files examined in {self.seconds:.1f} s ({self.files / self.seconds:.0f} files/s)")
        warned = [e for e in self.entries if e.get("warnings")]
        if warned:
            lines.append(f"\n{len(warned)} entr{'y' if len(warned) == 1 else 'ies'} kept with warnings:")
            lines += [f"  {_show(e['image'])}: {'; '.join(e['warnings'])}" for e in warned[:20]]
        if self.documents:
            lines.append(f"\n{self.documents} document file(s) (csv, json, txt ...) passed over")
        if self.skipped:
            lines.append(f"\n{len(self.skipped)} file(s) skipped:")
            reasons = Counter(reason_kind(s["reason"]) for s in self.skipped)
            for kind, n in reasons.most_common():
                example = next(s for s in self.skipped if reason_kind(s["reason"]) == kind)
                lines.append(f"  {n:>5} x {kind}  (e.g. {example['path']}: {example['reason']})")
        return "\n".join(lines)


def _show(image) -> str:
    return f"{image[0]} (+{len(image) - 1} slices)" if isinstance(image, list) else str(image)


def reason_kind(reason: str) -> str:
    """The kind of a skip reason (its text before the first colon or bracket), for counting."""
    return reason.split(":")[0].split("(")[0].strip()


def _suffix(path: str) -> str:
    name = path.lower()
    for suf in VOLUME_SUFFIXES + PHOTO_SUFFIXES + _COMPANION_SUFFIXES + (".npz", ".json", ".csv"):
        if name.endswith(suf):
            return suf
    return os.path.splitext(name)[1]


def _words(path: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", path.lower()))


def _guess_modality(path: str, rgb: bool, dims: int, air_fraction: float) -> str:
    words = _words(path)
    if dims == 2:
        if words & _FUNDUS_WORDS:
            return "FUNDUS"
        if words & _XRAY_WORDS or not rgb:
            return "XR"
        return "OT"
    if words & _CT_WORDS or air_fraction > 0.02:  # many voxels near -1000 HU: air in a CT
        return "CT"
    return "MR"  # a volume without air at -1000 is most likely MR (or PET, which scales the same way)


def _mask_reason(arr: np.ndarray, path: str) -> str | None:
    """Segmentations and annotations stored beside images are not images to pretrain on."""
    sample = arr[tuple(slice(None, None, max(1, s // 64)) for s in arr.shape)]
    values = np.unique(sample)
    integer = bool(np.all(np.mod(values, 1) == 0))
    if len(values) <= 2 or (integer and len(values) <= 32 and _stem_words(path) & _MASK_WORDS):
        return f"looks like a label mask ({len(values)} distinct values: {values[:6].tolist()}), not an image"
    return None


def _stem_words(path: str) -> set[str]:
    return _words(os.path.basename(path))


def _patient_key(path: str, root: str, patient_from: str) -> str:
    """Non-DICOM files carry no patient id: take the file name (without extension) or, with
    ``patient_from="folder"``, the first folder below the scanned root (one folder per patient)."""
    parts = Path(os.path.relpath(path, root)).parts
    if patient_from == "folder" and len(parts) > 1:
        return parts[0]
    return re.sub(r"(\.nii)?\.[^.]+$", "", parts[-1])


def _load_volume(path: str) -> tuple[np.ndarray, list[int], list[float], int]:
    """Array (x, y, z[, t]), size, spacing and channel count. nibabel reads NIfTI (it accepts the
    non-orthonormal affines that ITK refuses); SimpleITK reads NRRD / MHA / MHD."""
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(path)
            arr = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors ...
            raise UnreadableFile(f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
        zooms = [float(z) for z in img.header.get_zooms()]
        return arr, list(arr.shape), zooms[: arr.ndim], 1
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UnreadableFile(f"cannot read volume ({first[-1] if first else exc})") from None
    channels = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)  # a copy: a view would dangle once img is freed. (z, y, x[, c]) -> (x, y, z)
    arr = np.moveaxis(arr, -1, 0) if channels > 1 else arr
    arr = arr.transpose(tuple(range(arr.ndim - 1, -1, -1)))
    arr = arr[..., 0] if channels > 1 else arr
    return arr, list(img.GetSize()), [float(s) for s in img.GetSpacing()], channels


def _read_volume(path: str, root: str, salt: str, modality: str | None, patient_from: str) -> dict:
    if os.path.getsize(path) == 0:
        raise UnreadableFile("empty file (0 bytes)")
    arr, size, spacing, channels = _load_volume(path)
    spacing = [round(s, 6) for s in spacing]
    warnings = []
    entry: dict = {}
    if len(size) == 4 and size[3] == 1:  # a 4D header holding one 3D volume
        arr, size, spacing = arr[..., 0], size[:3], spacing[:3]
    if len(size) == 4:
        warnings.append(f"4D volume with {size[3]} frames; frame 0 is used")
        entry["frame"] = 0
        size, spacing = size[:3], spacing[:3]
        arr = arr[..., 0]
    if len(size) not in (2, 3):
        raise UnreadableFile(f"unsupported {len(size)}D image (shape {size})")
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad == arr.size:
        raise UnreadableFile("no finite voxel (all NaN/Inf)")
    if bad:
        warnings.append(f"{bad} NaN/Inf voxel(s), replaced at load by the lowest finite value")
    if bad:
        arr = np.where(np.isfinite(arr), arr, 0)
    mask = _mask_reason(arr, path)
    if mask:
        raise UnreadableFile(mask)
    dims = 3 if len(size) == 3 and size[2] > 1 else 2
    step = tuple(slice(None, None, 2) for _ in range(arr.ndim))
    air = float(np.mean((arr[step] > -1100) & (arr[step] < -900)))
    entry.update(
        image=path,
        modality=modality or _guess_modality(path, channels > 1, dims, air),
        patient=patient_hash(_patient_key(path, root, patient_from), salt),
        spatial_dims=dims,
        shape=size[:dims],
        spacing=spacing[:dims],
    )
    if channels > 1:
        entry["channels"] = channels
    if warnings:
        entry["warnings"] = warnings
    return entry


def _read_photo(path: str, root: str, salt: str, modality: str | None, patient_from: str) -> dict:
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise UnreadableFile("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: catches truncated files
            mode, (width, height) = im.mode, im.size
            rgb = mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr")
            arr = np.asarray(im.convert("RGB") if rgb else im, dtype=np.int32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableFile(f"cannot decode image ({exc})") from None
    if rgb:  # a grey radiograph saved as RGB is still grey
        rgb = bool(np.abs(arr[..., 0] - arr[..., 1]).max() > 2 or np.abs(arr[..., 1] - arr[..., 2]).max() > 2)
    mask = _mask_reason(arr, path)
    if mask:
        raise UnreadableFile(mask)
    entry = dict(
        image=path,
        modality=modality or _guess_modality(path, rgb, 2, 0.0),
        patient=patient_hash(_patient_key(path, root, patient_from), salt),
        spatial_dims=2,
        shape=[width, height],  # MONAI's PILReader gives (W, H)
        spacing=[1.0, 1.0],
    )
    if rgb:
        entry["channels"] = 3
    return entry


def _classify(path: str) -> str:
    suf = _suffix(path)
    if suf in VOLUME_SUFFIXES:
        return "volume"
    if suf in PHOTO_SUFFIXES:
        return "photo"
    if suf in _COMPANION_SUFFIXES:
        return "companion"
    if suf in _DOCUMENT_SUFFIXES:
        return "document"
    if looks_like_dicom(path) or suf in _MAYBE_DICOM_SUFFIXES:
        return "dicom"
    return "unknown"


def _examine(args) -> tuple[str, object]:
    """Read one file's header. Returns ("entry", dict) | ("dicom", DicomFile) | ("skip", reason) | ("companion" | "document", None)."""
    path, root, salt, modality, patient_from = args
    kind = _classify(path)
    try:
        if kind == "volume":
            return "entry", _read_volume(path, root, salt, modality, patient_from)
        if kind == "photo":
            return "entry", _read_photo(path, root, salt, modality, patient_from)
        if kind == "dicom":
            return "dicom", read_dicom_header(path, force=not looks_like_dicom(path))
        if kind in ("companion", "document"):
            return kind, None
        if _suffix(path) == ".npz":
            return "skip", "MedMNIST-style .npz archive: pass the .npz itself to medssl (it is not scanned)"
        return "skip", f"unrecognised format ({_suffix(path) or 'no extension'})"
    except UnreadableFile as exc:
        return "skip", str(exc)
    except PermissionError:
        return "skip", "permission denied"
    except OSError as exc:
        return "skip", f"unreadable ({exc.strerror or exc})"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return False
    return True


def _walk(root: str, exclude: set[str]) -> tuple[list[str], list[dict]]:
    """Files to examine, and the folders and names that cannot be (unreadable folders, non-UTF-8 names)."""
    paths, skipped = [], []

    def unreadable(exc: OSError) -> None:
        skipped.append({"path": _printable(exc.filename or root), "reason": f"unreadable folder ({exc.strerror or exc})"})

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in [d for d in dirs if not _utf8(d)]:
            dirs.remove(d)
            skipped.append({"path": _printable(os.path.join(folder, d)), "reason": "folder name is not valid UTF-8"})
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.startswith(".") or os.path.abspath(path) in exclude:
                continue
            if not _utf8(name):
                skipped.append({"path": _printable(path), "reason": "file name is not valid UTF-8 (rename it)"})
                continue
            paths.append(path)
    return paths, skipped


def _bounded_map(pool, fn, jobs, window: int):
    """``pool.map(fn, jobs)`` in order with at most ``window`` jobs in flight (``Executor.map`` submits all of them
    first: 100,000 futures and their results held at once)."""
    from collections import deque

    pending = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _printable(path: str) -> str:
    """``path`` with undecodable bytes shown as ``\\xNN`` escapes (so it can be printed and written to JSON)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def scan_folder(
    root: str | os.PathLike,
    salt: str | None = None,
    modality: str | None = None,
    progress: bool = True,
    workers: int = 4,
    exclude: tuple[str, ...] = (),
    patient_from: str = "file",
) -> ScanResult:
    """Find every usable image under ``root``.

    Args:
        root: folder to scan (recursively; hidden files and folders are left out).
        salt: salt for patient hashes (default: :func:`medssl.data.privacy.default_salt`).
        modality: modality to give non-DICOM files (NIfTI, NRRD, PNG ...) instead of guessing it
            from the path and intensities. DICOM files always keep their own Modality tag.
        progress: show a progress bar.
        workers: threads reading headers (I/O bound).
        exclude: absolute paths to leave out (e.g. the datalist being written).
        patient_from: for non-DICOM files, ``"file"`` (each file its own patient) or ``"folder"``
            (the first folder below ``root`` names the patient). DICOM uses PatientID.

    Raises:
        FileNotFoundError: ``root`` does not exist. NotADirectoryError: it is a file.
    """
    from tqdm.auto import tqdm

    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"scan: folder {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"scan: {root} is a file; give the folder that contains it")
    salt = default_salt() if salt is None else salt  # once, before the worker threads start
    import time

    started = time.perf_counter()
    paths, unreachable = _walk(root, {os.path.abspath(p) for p in exclude})
    result = ScanResult(skipped=unreachable, files=len(paths))
    dicoms: list[DicomFile] = []
    if patient_from not in ("file", "folder"):
        raise ValueError(f"patient_from must be 'file' or 'folder', got {patient_from!r}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = _bounded_map(pool, _examine, ((p, root, salt, modality, patient_from) for p in paths), 64 * max(1, workers))
        if progress and sys.stderr.isatty():
            outcomes = tqdm(outcomes, total=len(paths), desc=f"scanning {root}", unit="file")
        elif progress:
            outcomes = plain_progress(outcomes, len(paths), f"scanning {root}")
        for path, (kind, value) in zip(paths, outcomes):
            if kind == "entry":
                result.entries.append(value)
            elif kind == "dicom":
                dicoms.append(value)
            elif kind == "skip":
                result.skipped.append({"path": path, "reason": value})
            elif kind == "document":
                result.documents += 1
    series, skipped = group_series(dicoms)
    result.skipped += [{"path": p, "reason": r} for p, r in skipped]
    for s in series:
        entry = dict(
            image=s.files if s.spatial_dims == 3 and len(s.files) > 1 else s.files[0],
            modality=s.modality,
            patient=patient_hash(s.patient_id, salt),
            spatial_dims=s.spatial_dims,
            shape=s.shape,
            spacing=[round(float(v), 6) for v in s.spacing],
        )
        if s.channels > 1:
            entry["channels"] = s.channels
        if s.photometric == "MONOCHROME1":
            entry["photometric"] = "MONOCHROME1"  # for the record: ITK's reader already inverts it
        if s.warnings:
            entry["warnings"] = s.warnings
        result.entries.append(entry)
    result.entries.sort(key=lambda e: _show(e["image"]))
    result.seconds = time.perf_counter() - started
    return result


def _relative(path: str, base: str) -> str:
    return os.path.relpath(path, base)


def write_datalist(result: ScanResult, out: str | os.PathLike) -> Path:
    """Write ``result`` as JSON with paths relative to the datalist's folder (MONAI convention).

    The file is written atomically (temporary file + rename), so an interrupted scan never
    leaves a half-written datalist behind.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = str(out.parent)
    entries = []
    for e in result.entries:
        e = dict(e)
        e["image"] = [_relative(p, base) for p in e["image"]] if isinstance(e["image"], list) else _relative(e["image"], base)
        entries.append(e)
    skipped = [{"path": _relative(s["path"], base), "reason": s["reason"]} for s in result.skipped]
    with atomic_write(out, "w") as f:
        json.dump({"training": entries, "skipped": skipped}, f, indent=1)
    return out
