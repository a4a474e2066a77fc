"""Scanning: what is found, how series are grouped, and how each kind of bad input is reported."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.data.scan import scan_folder, write_datalist


def _copy_series(src, dst, keep=None):
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.iterdir())
    for i, f in enumerate(files):
        if keep is None or i in keep:
            shutil.copy(f, dst / f.name)
    return sorted(dst.iterdir())


def test_phantom_folder_scans_to_one_entry_per_series_and_image(phantoms):
    result = scan_folder(phantoms, progress=False)
    ct = [e for e in result.entries if e["modality"] == "CT"]
    xr = [e for e in result.entries if e["modality"] == "XR"]
    series = [e for e in ct if isinstance(e["image"], list)]
    assert len(series) == 2 and len(ct) == 4 and len(xr) == 2  # 2 DICOM series + 2 NIfTI, 2 radiographs
    for e in series:
        assert e["spatial_dims"] == 3 and e["shape"] == [40, 36, 20] and e["spacing"] == [8.0, 8.0, 10.0]
        z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in e["image"]]
        assert z == sorted(z)  # ordered by position along the slice normal
    assert result.skipped == [] and result.documents == 3  # labels.csv, labels_ct.csv, labels_xray.csv


def test_datalist_never_holds_patient_names_or_ids(phantoms, tmp_path):
    path = write_datalist(scan_folder(phantoms, progress=False), tmp_path / "dl.json")
    text = path.read_text()
    assert "PHANTOM" not in text and "MEDSSL-PHANTOM" not in text
    data = json.loads(text)
    hashes = {e["patient"] for e in data["training"]}
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
    first = data["training"][0]["image"]
    assert not os.path.isabs(first[0] if isinstance(first, list) else first)  # relative to the datalist


def test_salt_changes_hashes(phantoms):
    a = scan_folder(phantoms / "ct_dicom", salt="a", progress=False).entries
    b = scan_folder(phantoms / "ct_dicom", salt="b", progress=False).entries
    assert [e["patient"] for e in a] != [e["patient"] for e in b]


def test_interleaved_series_are_separated(phantoms, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for case in ("case_000", "case_001"):  # same file names in both series: rename as they come in
        for f in (phantoms / "ct_dicom" / case).iterdir():
            shutil.copy(f, mixed / f"{case}_{f.name}")
    entries = scan_folder(mixed, progress=False).entries
    assert len(entries) == 2
    for e in entries:
        uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in e["image"]}
        assert len(uids) == 1 and len(e["image"]) == 20


def test_missing_slice_and_uneven_spacing_warn_but_keep(phantoms, tmp_path):
    src = phantoms / "ct_dicom" / "case_000"
    _copy_series(src, tmp_path / "gap", keep=set(range(20)) - {7, 8})
    uneven = _copy_series(src, tmp_path / "uneven")
    ds = pydicom.dcmread(uneven[10])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 3.0
    ds.save_as(uneven[10])
    gap = scan_folder(tmp_path / "gap", progress=False).entries
    assert len(gap) == 1 and gap[0]["shape"][2] == 18 and "about 2 missing slice" in gap[0]["warnings"][0]
    odd = scan_folder(tmp_path / "uneven", progress=False).entries
    assert len(odd) == 1 and odd[0]["shape"][2] == 20 and "uneven slice spacing" in odd[0]["warnings"][0]


def test_bad_files_are_skipped_with_reasons(phantoms, tmp_path):
    folder = tmp_path / "bad"
    good = _copy_series(phantoms / "ct_dicom" / "case_000", folder / "series")
    data = good[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) - 500])
    (folder / "notes.dcm").write_text("this is not DICOM")
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    os.symlink(folder / "nowhere.nii.gz", folder / "dangling.nii.gz")
    result = scan_folder(folder, progress=False)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in result.skipped}
    assert reasons["truncated.dcm"].startswith("truncated")
    assert "not a DICOM" in reasons["notes.dcm"] or "damaged DICOM" in reasons["notes.dcm"]
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["broken.png"].startswith("cannot decode image")
    assert reasons["dangling.nii.gz"].startswith("unreadable")
    series = [e for e in result.entries if isinstance(e["image"], list)]
    assert len(series) == 1 and len(series[0]["image"]) == 20  # the good series is intact
    assert "truncated" in result.summary() and "empty file" in result.summary()


def test_nan_and_4d_volumes_are_kept_with_warnings(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    vol[0, 0, :3] = np.nan
    vol[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan_mr.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((8, 9, 10, 3)).astype(np.float32), np.eye(4)), tmp_path / "fmri.nii.gz")
    entries = {os.path.basename(e["image"]): e for e in scan_folder(tmp_path, progress=False).entries}
    assert "4 NaN/Inf" in entries["nan_mr.nii.gz"]["warnings"][0]
    assert entries["fmri.nii.gz"]["frame"] == 0 and entries["fmri.nii.gz"]["shape"] == [8, 9, 10]


def test_empty_and_missing_folders(tmp_path):
    result = scan_folder(tmp_path, progress=False)
    assert result.entries == [] and result.skipped == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "nope", progress=False)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        scan_folder(tmp_path / "f.txt", progress=False)


def test_label_masks_are_not_images(tmp_path):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((20, 20)) > 0.5).astype(np.uint8) * 255).save(tmp_path / "vessels.png")
    result = scan_folder(tmp_path, progress=False)
    assert result.entries == [] and "label mask" in result.skipped[0]["reason"]


def test_nrrd_and_mha_volumes_scan_with_their_geometry(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for i, suffix in enumerate([".nrrd", ".mha"] * 4):  # several files: scanned by concurrent threads
        img = sitk.GetImageFromArray(rng.normal(100, 20, size=(6, 7, 8)).astype(np.float32))  # (z, y, x)
        img.SetSpacing((0.5, 0.75, 2.0))
        sitk.WriteImage(img, str(tmp_path / f"mr_{i}{suffix}"))
    entries = scan_folder(tmp_path, progress=False).entries
    assert len(entries) == 8
    assert all(e["shape"] == [8, 7, 6] and e["spacing"] == [0.5, 0.75, 2.0] and e["modality"] == "MR" for e in entries)


def _edit_series(phantoms, tmp_path, name, change, case="case_000"):
    """A copy of a phantom series with ``change(index, dataset)`` applied to every slice."""
    files = _copy_series(phantoms / "ct_dicom" / case, tmp_path / name)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        change(i, ds)
        ds.save_as(f)
    return tmp_path / name


def test_gantry_tilt_is_warned_and_kept(phantoms, tmp_path):
    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.35 * z, z]  # origins drift in-plane: about 19 degrees

    entry = scan_folder(_edit_series(phantoms, tmp_path, "tilted", tilt), progress=False).entries[0]
    assert len(entry["image"]) == 20 and any("gantry tilt of about 19" in w and "kept" in w for w in entry["warnings"])


def test_a_slice_without_position_is_skipped_with_a_reason_not_made_a_2d_image(phantoms, tmp_path):
    def drop(i, ds):
        if i == 5:
            del ds.ImagePositionPatient

    result = scan_folder(_edit_series(phantoms, tmp_path, "nopos", drop), progress=False)
    assert [e["spatial_dims"] for e in result.entries] == [3]  # before: a 3D volume and a stray 2D slice
    assert len(result.entries[0]["image"]) == 19
    assert len(result.skipped) == 1 and "without ImagePositionPatient" in result.skipped[0]["reason"]


def test_unparseable_spacing_and_lying_rows_are_reported(phantoms, tmp_path):
    def spacing(i, ds):
        from pydicom.dataelem import DataElement

        ds["PixelSpacing"] = DataElement(0x00280030, "LO", "abc\\def")  # text where numbers belong (pydicom refuses DS)

    entry = scan_folder(_edit_series(phantoms, tmp_path, "spacing", spacing), progress=False).entries[0]
    assert any("not readable: 1 mm assumed" in w for w in entry["warnings"])

    def rows(i, ds):
        ds.Rows = ds.Rows * 4  # the header claims more pixels than the file holds

    result = scan_folder(_edit_series(phantoms, tmp_path, "rows", rows), progress=False)
    assert result.entries == [] and len(result.skipped) == 20
    assert "header says" in result.skipped[0]["reason"] and "pixel data holds" in result.skipped[0]["reason"]


def test_two_patients_sharing_a_series_uid_are_kept_apart(phantoms, tmp_path):
    uid = pydicom.dcmread(next((phantoms / "ct_dicom" / "case_000").iterdir())).SeriesInstanceUID
    shared = tmp_path / "shared"
    _edit_series(phantoms, shared, "a", lambda i, ds: None)
    _edit_series(phantoms, shared, "b", lambda i, ds: setattr(ds, "SeriesInstanceUID", uid), case="case_001")
    result = scan_folder(shared, progress=False)
    assert [len(e["image"]) for e in result.entries] == [20, 20]  # before: one volume, the second patient "duplicate slices"
    assert len({e["patient"] for e in result.entries}) == 2
    assert all(any("shared by 2 patients" in w for w in e["warnings"]) for e in result.entries)


def test_unreadable_folders_and_undecodable_names_are_reported(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "fine.txt").write_text("x")
    with open(os.path.join(os.fsencode(folder), b"scan\xff.png"), "wb") as f:
        f.write(b"not an image")
    real_walk = os.walk

    def walk(top, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(folder / "locked")))
        yield from real_walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    result = scan_folder(folder, progress=False)
    reasons = {s["path"]: s["reason"] for s in result.skipped}
    assert reasons[str(folder / "locked")].startswith("unreadable folder (Permission denied")
    assert reasons[str(folder / "scan\\xff.png")] == "file name is not valid UTF-8 (rename it)"
    assert "2 file(s) skipped" in result.summary()
    write_datalist(result, tmp_path / "dl.json")  # the undecodable name is written, escaped, not a crash


def test_volumes_thinner_than_the_patch_are_reported(phantoms, caplog):
    import logging

    from medssl.data.dataset import load_source

    with caplog.at_level(logging.WARNING):
        load_source(phantoms / "ct_nifti", spatial_dims=3, min_size=32)
    assert "2 of 2 volumes are thinner than the 32-voxel training patch" in caplog.text  # 20 slices deep


def test_headers_are_read_in_order_with_a_bounded_number_in_flight():
    """100,000 files must not mean 100,000 futures and results held at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from medssl.data.scan import _bounded_map

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def job(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        with lock:
            state["now"] -= 1
        return i * i

    submitted = []

    def jobs():
        for i in range(500):
            submitted.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        out = []
        for value in _bounded_map(pool, job, jobs(), window=16):
            assert len(submitted) - len(out) <= 16  # never more than the window submitted ahead of what was consumed
            out.append(value)
    assert out == [i * i for i in range(500)]


def test_scan_reports_its_speed_and_prints_plain_progress_lines_off_a_terminal(phantoms, capsys):
    result = scan_folder(phantoms, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and f"{result.files}/{result.files} files (" in err and "files/s)" in err
    assert result.files > 0 and result.seconds > 0 and "files examined in" in result.summary()
