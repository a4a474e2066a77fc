"""The standard pipeline and the dataset builder: shapes, caching, and skipping bad files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from medssl.data.dataset import build_dataset, build_loader, load_datalist, load_source
from medssl.data.pipeline import build_transforms
from medssl.data.scan import scan_folder, write_datalist


@pytest.mark.parametrize("spatial_dims,source_dims,size", [(3, None, 16), (2, None, 32), (2, 3, 32)])
def test_pipeline_shapes_from_phantoms(phantoms, spatial_dims, source_dims, size):
    source = source_dims or spatial_dims
    entries = [e for e in scan_folder(phantoms, progress=False).entries if e["spatial_dims"] == source]
    t = build_transforms(spatial_dims=spatial_dims, source_dims=source_dims, size=size, num_samples=2)
    t.set_random_state(0)
    out = t(entries[0])
    samples = out if isinstance(out, list) else [out]
    assert len(samples) == (2 if source == 3 else 1)
    for s in samples:
        assert type(s["image"]) is torch.Tensor and s["image"].shape == (1,) + (size,) * spatial_dims
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        assert {"image", "patient", "modality", "spatial_dims"} <= set(s)
        assert all(k == "image" or not isinstance(v, (list, dict)) for k, v in s.items())  # scalars only


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_entry_fields_reach_the_batch_collated(phantoms, spatial_dims):
    """Every scalar datalist field (a user's own too) reaches the batch: strings as lists, numbers as tensors;
    lists stay behind, and a field only some items carry is left out of the batch instead of failing it."""
    entries = [e for e in scan_folder(phantoms, progress=False).entries if e["spatial_dims"] == spatial_dims][:2]
    for i, e in enumerate(entries):
        e.update(source="site-a", organ=i + 1, weight=0.5, split="train", notes=["not", "a", "scalar"], empty=None)
    entries[0]["only_here"] = "x"
    t = build_transforms(spatial_dims=spatial_dims, size=16, num_samples=1)
    batch = next(iter(build_loader(build_dataset(entries, t), batch_size=2, shuffle=False)))
    assert batch["image"].shape == (2, 1, *[16] * spatial_dims)
    assert batch["source"] == ["site-a", "site-a"] and batch["split"] == ["train", "train"]
    assert batch["modality"] == [e["modality"] for e in entries] and len(batch["patient"]) == 2
    assert torch.equal(batch["organ"], torch.tensor([1, 2])) and torch.equal(batch["spatial_dims"], torch.tensor([spatial_dims] * 2))
    assert torch.allclose(batch["weight"], torch.tensor([0.5, 0.5], dtype=batch["weight"].dtype))
    assert "notes" not in batch and "empty" not in batch and "only_here" not in batch


def test_ct_windows_become_channels(phantoms):
    entry = next(e for e in scan_folder(phantoms / "ct_nifti", progress=False).entries)
    out = build_transforms(spatial_dims=3, size=16, channels=3, ct_windows=["abdomen", "lung", "bone"], num_samples=1)(entry)
    assert out[0]["image"].shape == (3, 16, 16, 16)


@pytest.mark.parametrize("cache", [None, "memory", "disk"])
def test_loader_skips_a_corrupt_file_and_keeps_batches_full(phantoms, tmp_path, cache, caplog):
    entries = [e for e in scan_folder(phantoms / "ct_nifti", progress=False).entries] * 3
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    entries.insert(2, {"image": str(bad), "modality": "CT", "patient": "x", "spatial_dims": 3})
    ds = build_dataset(entries, build_transforms(spatial_dims=3, size=16, num_samples=2), cache=cache,
                       cache_dir=tmp_path / "cache", progress=False)
    with caplog.at_level(logging.WARNING):
        batches = list(build_loader(ds, batch_size=2, shuffle=False))
    assert len(batches) == 3 and all(b["image"].shape == (4, 1, 16, 16, 16) for b in batches)
    assert "corrupt.nii.gz" in caplog.text
    assert list(ds.bad) == [2]


def test_cached_loading_gives_the_same_patches(phantoms):
    entries = scan_folder(phantoms / "ct_nifti", progress=False).entries
    t = build_transforms(spatial_dims=3, size=16, num_samples=1)
    plain, cached = build_dataset(entries, t), build_dataset(entries, t, cache="memory", progress=False)
    t.set_random_state(3)
    a = plain[0][0]["image"]
    t.set_random_state(3)
    b = cached[0][0]["image"]
    assert torch.equal(a, b)


def test_moved_files(phantoms, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantoms / "ct_nifti", data)
    path = write_datalist(scan_folder(data, progress=False), tmp_path / "dl.json")
    assert len(load_datalist(path)) == 2
    (data / "case_000.nii.gz").unlink()
    assert len(load_datalist(path)) == 1  # the rest still loads; the missing one is named in a warning
    shutil.rmtree(data)
    with pytest.raises(FileNotFoundError, match="were the files moved"):
        load_datalist(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(tmp_path / "bad.json")


def _npz(path, spatial_dims, rgb=False, test=False):
    rng = np.random.default_rng(0)
    shape = (6,) + (8,) * spatial_dims + ((3,) if rgb else ())
    arrays = {"train_images": rng.integers(0, 256, shape, dtype=np.uint8), "train_labels": rng.integers(0, 2, (6, 1)),
              "val_images": rng.integers(0, 256, shape, dtype=np.uint8)[:2], "val_labels": rng.integers(0, 2, (2, 1))}
    if test:
        arrays.update(test_images=arrays["val_images"], test_labels=arrays["val_labels"])
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_medmnist_npz(tmp_path, spatial_dims):
    from medssl.data.medmnist import medmnist_splits

    path = _npz(tmp_path / "m.npz", spatial_dims)
    entries = load_source(path, split="train")
    assert len(entries) == 6 and entries[0]["image"].shape == (1,) + (8,) * spatial_dims
    assert entries[0]["image"].max() <= 1.0 and entries[0]["label"] in (0, 1)
    assert medmnist_splits(path) == ["train", "val"]
    assert medmnist_splits(_npz(tmp_path / "t.npz", spatial_dims, test=True)) == ["train", "val", "test"]
    with pytest.raises(ValueError, match="no split 'test'"):
        load_source(path, split="test")
    out = build_transforms(spatial_dims=spatial_dims, size=8, num_samples=1)(entries[0])
    out = out[0] if isinstance(out, list) else out
    assert torch.allclose(out["image"], torch.as_tensor(entries[0]["image"]))  # preset "none": untouched
    assert out["label"] == entries[0]["label"]


def test_medmnist_rgb(tmp_path):
    entries = load_source(_npz(tmp_path / "rgb.npz", 2, rgb=True))
    assert entries[0]["image"].shape == (3, 8, 8)


def test_datalist_roundtrip_through_json(phantoms, tmp_path):
    path = write_datalist(scan_folder(phantoms, progress=False), tmp_path / "sub" / "dl.json")
    raw = json.loads(path.read_text())
    assert len(load_source(path)) == len(raw["training"]) == 6
    assert len(load_source(path, spatial_dims=2)) == 2


def test_resampling_to_a_target_spacing(phantoms):
    from monai.transforms import Compose

    entry = next(e for e in scan_folder(phantoms / "ct_nifti", progress=False).entries)  # 40x36x20 at 8x8x10 mm
    t = build_transforms(spatial_dims=3, size=16, pixdim=(16.0, 16.0, 20.0), num_samples=1)
    head = Compose(t.transforms[:3])  # load, orientation, spacing
    assert tuple(head(entry)["image"].shape) == (1, 20, 18, 10)


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_2d_images_follow_monai_axis_order_and_display_upright(tmp_path, rgb):
    from medssl.viz.views import display_2d

    img = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3) * 40  # 2 rows, 3 columns
    img = np.repeat(img[..., None], 3, -1) if rgb else img
    np.savez(tmp_path / "rect.npz", train_images=img[None], train_labels=np.zeros((1, 1)))
    tensor = load_source(tmp_path / "rect.npz")[0]["image"]
    assert tensor.shape == ((3,) if rgb else (1,)) + (3, 2)  # (C, W, H), as MONAI's PNG reader gives
    shown = display_2d(tensor)
    np.testing.assert_allclose(shown[..., 0] if rgb else shown, img[..., 0] / 255.0 if rgb else img / 255.0, rtol=1e-6)


@pytest.mark.parametrize("dtype,scale,expect_max", [(np.uint8, 255, 1.0), (np.float32, 1000.0, 1.0), (np.float32, 0.5, 0.5),
                                                     (np.int16, 3000, 1.0)])
def test_medmnist_images_are_scaled_by_their_own_range(tmp_path, dtype, scale, expect_max):
    from medssl.data.medmnist import load_medmnist

    rng = np.random.default_rng(0)
    images = (rng.random((6, 28, 28)) * scale).astype(dtype)
    images[0, 0, 0] = dtype(scale) if dtype != np.uint8 else 255  # the range's top is in the split
    images[0, 0, 1] = 0
    np.savez(tmp_path / "f.npz", train_images=images, train_labels=np.zeros((6, 1), int))
    values = np.stack([e["image"] for e in load_medmnist(tmp_path / "f.npz")])
    assert values.dtype == np.float32 and values.min() == 0.0
    assert values.max() == pytest.approx(expect_max, rel=1e-6)  # a float archive was divided by 255 before: max 3.9 or 0.002


def test_images_left_out_are_reported(phantoms, tmp_path, caplog):
    import shutil

    folder = shutil.copytree(phantoms, tmp_path / "data")
    (folder / "ct_nifti" / "empty.nii.gz").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        entries = load_source(folder, spatial_dims=3)
    assert entries and all(e["spatial_dims"] == 3 for e in entries)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 6 images left out because they are not 3D" in said  # the radiograph PNGs
    assert "1 file(s) left out: 1 x empty file" in said


def test_hold_out_keeps_patients_whole_and_training_non_empty():
    from medssl.data.dataset import hold_out

    entries = [{"image": f"{p}_{i}.png", "patient": f"p{p}"} for p in range(10) for i in range(3)]
    train, held = hold_out(entries, 0.2, seed=1)
    assert len(held) == 6 and len(train) == 24
    assert not {e["patient"] for e in train} & {e["patient"] for e in held}  # a patient's images stay together
    assert hold_out(entries, 0.2, seed=1) == (train, held) and hold_out(entries, 0.2, seed=2)[1] != held
    assert hold_out(entries, 0.0) == (entries, [])
    assert len(hold_out(entries[:3], 0.9)[0]) == 3  # one patient: nothing can be held out
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hold_out(entries, 1.0)


def test_every_entry_gets_a_salted_patient_whatever_the_source(tmp_path, monkeypatch):
    """Patient mixing and patient-level splits need a patient on every entry: a CSV's patient column
    (hashed), else the image's path (each image its own patient)."""
    from medssl.data.dataset import load_source
    from medssl.data.privacy import patient_hash

    monkeypatch.setenv("MEDSSL_SALT", "s")
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "with.csv").write_text("image,label,patient\na.png,0,P1\nb.png,1,P1\nc.png,0,P2\n")
    (tmp_path / "without.csv").write_text("image,label\na.png,0\nb.png,1\n")
    named = load_source(str(tmp_path / "with.csv"))
    assert [e["patient"] for e in named] == [patient_hash("P1")] * 2 + [patient_hash("P2")]
    assert all("P1" not in e["patient"] for e in named)  # hashed, never the id itself
    plain = load_source(str(tmp_path / "without.csv"))
    assert len({e["patient"] for e in plain}) == 2 and all(len(e["patient"]) == 16 for e in plain)
    listed = load_source([{"image": str(tmp_path / "a.png")}, {"image": str(tmp_path / "a.png"), "patient": "kept"}])
    assert listed[0]["patient"] == patient_hash(str(tmp_path / "a.png")) and listed[1]["patient"] == "kept"
