"""Loading entries: DICOM series vs NIfTI, HU, MONOCHROME1, NaN, 4D frames, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Orientation

from medssl.data.io import LoadMedicalImage, LoadMedicalImaged, UnreadableImage
from medssl.data.scan import scan_folder


def test_dicom_series_equals_nifti_and_is_in_hu(phantoms):
    from medssl.data.synthetic import make_ct_phantom

    series = next(e for e in scan_folder(phantoms / "ct_dicom", progress=False).entries if "case_000" in e["image"][0])
    ras = Orientation("RAS", labels=None)
    from_dicom = ras(LoadMedicalImage()(series["image"]))
    from_nifti = ras(LoadMedicalImage()(str(phantoms / "ct_nifti" / "case_000.nii.gz")))
    assert from_dicom.shape == from_nifti.shape == (1, 40, 36, 20)
    assert torch.equal(from_dicom.as_tensor(), from_nifti.as_tensor())
    assert np.allclose(from_dicom.affine, from_nifti.affine)
    hu = make_ct_phantom(0 * 100_003 + 0, (40, 36, 20), (8.0, 8.0, 10.0), lesion=False).volume
    assert float(from_dicom.min()) == hu.min() == -1000.0  # rescale intercept applied: air is -1000 HU
    assert float(from_dicom.max()) == hu.max()


def test_single_slice_dicom_is_2d(phantoms):
    img = LoadMedicalImage()(str(sorted((phantoms / "ct_dicom" / "case_000").iterdir())[0]))
    assert img.shape == (1, 40, 36)


def test_monochrome1_comes_out_inverted_once(phantoms, tmp_path):
    import pydicom

    src = sorted((phantoms / "ct_dicom" / "case_000").iterdir())[5]
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    normal = LoadMedicalImage()(str(src))
    inverted = LoadMedicalImage()(str(tmp_path / "m1.dcm"))
    total = inverted + normal  # GDCM maps stored v to (4095 - v): the sum is constant, bone stays bright
    assert torch.allclose(total, total.flatten()[0].expand_as(total)) and not torch.equal(inverted, normal)


def test_arrays_nan_and_frames():
    arr = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    arr[0, 0, 0, 0] = np.nan
    out = LoadMedicalImage()(arr, frame=1)
    assert out.shape == (1, 4, 5, 6) and torch.equal(out[0], torch.as_tensor(arr[1]))
    out = LoadMedicalImage()(arr)
    assert torch.isfinite(out).all() and out[0, 0, 0, 0] == 1.0  # lowest finite value


def test_errors_name_the_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "junk.nrrd").write_text("NRRD0004\nnonsense")
    with pytest.raises(UnreadableImage, match="moved.nii.gz: file not found"):
        LoadMedicalImage()(str(tmp_path / "moved.nii.gz"))
    with pytest.raises(UnreadableImage, match="empty.nii.gz: empty file"):
        LoadMedicalImage()(str(tmp_path / "empty.nii.gz"))
    with pytest.raises(UnreadableImage, match="junk.nrrd: cannot read"):
        LoadMedicalImaged()({"image": str(tmp_path / "junk.nrrd")})
