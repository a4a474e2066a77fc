"""Embedded phantoms: deterministic, plausible HU, labels as promised."""

from __future__ import annotations

import csv

import numpy as np

from medssl.data.synthetic import drr, make_ct_phantom


def test_phantom_is_deterministic_and_plausible():
    a = make_ct_phantom(3, shape=(48, 48, 24), spacing=(7.0, 7.0, 10.0), lesion=True)
    b = make_ct_phantom(3, shape=(48, 48, 24), spacing=(7.0, 7.0, 10.0), lesion=True)
    assert np.array_equal(a.volume, b.volume) and a.lesion == 1 and a.lesion_mm > 0
    v = a.volume
    assert v.min() == -1000 and v[0, 0, 0] < -900  # air outside the body
    centre = v[16:32, 16:32, 8:16]
    assert -200 < np.median(centre) < 200  # soft tissue inside
    assert v.max() > 500  # bone
    c = make_ct_phantom(4, shape=(48, 48, 24), spacing=(7.0, 7.0, 10.0), lesion=False)
    assert c.lesion == 0 and not np.array_equal(a.volume, c.volume)


def test_drr_has_bright_bone_and_dark_air():
    case = make_ct_phantom(0, shape=(48, 48, 24), spacing=(7.0, 7.0, 10.0))
    img = drr(case.volume, case.spacing)
    assert img.shape == (24, 48) and img.dtype == np.uint8
    assert img[:, 0].max() < 30 and img[:, 24].mean() > 150  # outside body dark, spine column bright


def test_labels_file_alternates(phantoms):
    rows = list(csv.DictReader(open(phantoms / "labels.csv")))
    assert [r["lesion"] for r in rows] == ["0", "1"]
    assert (phantoms / "ct_dicom" / "case_001").is_dir() and (phantoms / "xray" / "case_001.png").is_file()
