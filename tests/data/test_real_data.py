"""Checks on real clinical files from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.transforms import Orientation

from medssl.data.dataset import load_source
from medssl.data.io import LoadMedicalImage
from medssl.data.pipeline import build_transforms
from medssl.data.scan import scan_folder

VENDORS = ["ge_anatomical_001", "generic_anatomical_001", "philips_anatomical_002", "siemens_anatomical_001"]


@pytest.mark.parametrize("vendor", VENDORS)
def test_vendor_series_scan_to_one_volume_matching_ground_truth(shared_data, vendor):
    folder = shared_data / "dicom" / "dicom2nifti_tests" / vendor
    result = scan_folder(folder, progress=False)
    assert len(result.entries) == 1
    entry = result.entries[0]
    assert entry["spatial_dims"] == 3 and entry["modality"] == "MR" and isinstance(entry["image"], list)
    ras = Orientation("RAS", labels=None)
    vol = ras(LoadMedicalImage()(entry["image"]))
    truth_path = str(folder) + "_ground_truth.nii.gz"
    if not os.path.exists(truth_path):  # dicom2nifti ships no reference for the Philips series
        assert vol.shape == (1, 768, 768, 4) and [s["reason"][:14] for s in result.skipped] == ["MR phase image"] * 4
        return
    truth = ras(LoadMedicalImage()(truth_path))
    assert vol.shape == truth.shape
    assert torch.equal(vol.as_tensor(), truth.as_tensor())


def test_ct_small_loads_in_hu(shared_data):
    img = LoadMedicalImage()(str(shared_data / "dicom" / "pydicom_3.0.2" / "CT_small.dcm"))
    assert img.shape == (1, 128, 128)
    import pydicom

    ds = pydicom.dcmread(shared_data / "dicom" / "pydicom_3.0.2" / "CT_small.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(img[0].numpy().T, hu)  # MONAI's (x, y) order is the transpose of (rows, cols)


@pytest.mark.parametrize("relpath,channels", [
    ("dicom/pydicom_data_1.0.0/RG1_UNCR.dcm", 1),
    ("xray/00000001_000.png", 1),
    ("xray/covid-19-pneumonia-58-prior.jpg", 3),
    ("fundus/CHASEDB1/Image_01L.jpg", 3),
    ("fundus/skimage_retina.jpg", 3),
])
def test_2d_images_load_as_2d(shared_data, relpath, channels):
    entry = scan_folder(shared_data / os.path.dirname(relpath), progress=False).entries
    entry = next(e for e in entry if e["image"].endswith(os.path.basename(relpath)))
    assert entry["spatial_dims"] == 2
    img = LoadMedicalImage()(entry["image"])
    assert img.ndim == 3 and img.shape[0] == channels
    out = build_transforms(spatial_dims=2, size=64, channels=1)(entry)
    assert out["image"].shape == (1, 64, 64) and float(out["image"].max()) > 0.5


def test_monochrome1_radiograph_has_bright_bone(shared_data):
    """RG1 is a MONOCHROME1 chest CR: after loading, the mediastinum (centre) is brighter than the lung fields."""
    img = LoadMedicalImage()(str(shared_data / "dicom" / "pydicom_data_1.0.0" / "RG1_UNCR.dcm"))[0].numpy().T  # (rows, cols)
    h, w = img.shape
    centre = np.median(img[h // 3 : 2 * h // 3, int(w * 0.45) : int(w * 0.55)])
    lungs = np.median(img[h // 3 : 2 * h // 3, int(w * 0.2) : int(w * 0.3)])
    assert centre > lungs


@pytest.mark.parametrize("name", ["brain1_image.nrrd", "brain2_image.nrrd", "breast1_image.nrrd"])
def test_nrrd_mri_loads_as_3d(shared_data, name):
    entries = scan_folder(shared_data / "volumes" / "pyradiomics", progress=False).entries
    entry = next(e for e in entries if e["image"].endswith(name))
    assert entry["spatial_dims"] == 3 and entry["modality"] == "MR"
    out = build_transforms(spatial_dims=3, size=16, num_samples=1)(entry)
    assert out[0]["image"].shape == (1, 16, 16, 16)
    assert not any(e["image"].endswith("label.nrrd") for e in entries)  # label maps are not images


@pytest.mark.parametrize("name,dims,size", [("pneumoniamnist_28_trainval.npz", 2, 28), ("adrenalmnist3d_28_trainval.npz", 3, 28),
                                            ("adrenalmnist3d_64_trainval.npz", 3, 64)])
def test_medmnist_archives(shared_data, name, dims, size):
    path = shared_data / "medmnist" / name
    train, val = load_source(path, split="train"), load_source(path, split="val")
    assert len(train) in (4708, 1188) and len(val) in (524, 98)
    assert train[0]["image"].shape == (1,) + (size,) * dims and {e["label"] for e in train} == {0, 1}


def test_whole_shared_folder_scans_without_dying(shared_data):
    result = scan_folder(shared_data, progress=False)
    assert len(result.entries) > 50
    dicom_series = [e for e in result.entries if isinstance(e["image"], list)]
    assert len(dicom_series) == 4  # the four vendor series, never merged with the single files
