"""The shared disk cache: keys that see changed files and transforms, atomic files, concurrent writers, medssl prepare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from medssl.data.cache import SharedCacheDataset, entry_key, transform_key
from medssl.data.pipeline import build_transforms
from medssl.data.scan import scan_folder


@pytest.fixture()
def nifti_entries(phantoms, tmp_path):
    """The phantom NIfTI volumes, copied so a test may change them."""
    folder = tmp_path / "data"
    shutil.copytree(phantoms / "ct_nifti", folder)
    return scan_folder(folder, progress=False, salt="t").entries


def test_a_second_pass_reads_the_cache_and_equals_the_transforms(nifti_entries, tmp_path):
    transform = build_transforms(spatial_dims=3, size=16, train=False)
    first = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")
    items = [first[i] for i in range(len(first))]
    assert first.writes == len(nifti_entries) and first.hits == 0
    again = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")  # a later run
    for i, item in enumerate(items):
        assert torch.equal(again[i]["image"], item["image"])
    assert again.hits == len(nifti_entries) and again.writes == 0
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_changed_file_or_transform_is_read_again(nifti_entries, tmp_path):
    transform = build_transforms(spatial_dims=3, size=16, train=False)
    ds = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")
    before = ds[0]["image"].clone()
    path = nifti_entries[0]["image"]
    import nibabel as nib

    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0 - 1000, img.affine, img.header), path)  # now all air
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")
    after = changed[0]["image"]
    assert changed.writes == 1 and not torch.equal(after, before) and float(after.max()) == 0.0
    other = build_transforms(spatial_dims=3, size=16, train=False, ct_windows="lung")
    assert transform_key(other) != transform_key(transform) == transform_key(build_transforms(spatial_dims=3, size=16, train=False))
    assert SharedCacheDataset(nifti_entries, other, tmp_path / "cache").cache_file(nifti_entries[1]) != ds.cache_file(nifti_entries[1])
    assert entry_key({"image": np.zeros((1, 4, 4))}) is None  # in-memory arrays are not cached


def test_a_torn_cache_file_is_recomputed(nifti_entries, tmp_path):
    transform = build_transforms(spatial_dims=3, size=16, train=False)
    ds = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")
    good = ds[0]["image"].clone()
    path = ds.cache_file(nifti_entries[0])
    path.write_bytes(path.read_bytes()[:100])  # a kill in the middle of a foreign copy
    again = SharedCacheDataset(nifti_entries, transform, tmp_path / "cache")
    assert torch.equal(again[0]["image"], good) and again.writes == 1
    torch.load(path, weights_only=True)  # rewritten whole


_WRITER = """
import sys
from medssl.data.cache import SharedCacheDataset
from medssl.data.pipeline import build_transforms
from medssl.data.scan import scan_folder
entries = scan_folder(sys.argv[1], progress=False, salt="t").entries
ds = SharedCacheDataset(entries, build_transforms(spatial_dims=3, size=16, train=False), sys.argv[2])
for _ in range(5):  # the two writers race on every item, again and again
    for i in range(len(ds)):
        ds.cache_file(ds.data[i]).unlink(missing_ok=True)
        ds.prepare(i)
for i in range(len(ds)):
    ds[i]
print(ds.writes)
"""


def test_two_concurrent_writers_leave_only_whole_files(nifti_entries, tmp_path):
    folder = os.path.dirname(nifti_entries[0]["image"])
    (tmp_path / "writer.py").write_text(_WRITER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), folder, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == len(nifti_entries) and not list((tmp_path / "cache").glob(".*"))
    reference = SharedCacheDataset(nifti_entries, build_transforms(spatial_dims=3, size=16, train=False), tmp_path / "fresh")
    for i, e in enumerate(nifti_entries):
        cached = torch.load(tmp_path / "cache" / reference.cache_file(e).name, weights_only=True)
        assert torch.equal(cached["image"], reference[i]["image"])


def test_medssl_prepare_fills_the_cache_a_training_run_then_only_reads(phantoms, tmp_path, capsys):
    from medssl.cli import main

    cache = tmp_path / "cache"
    tiny = ["--set", "vit_size=micro", "--set", "patch_size=4", "--set", "window_size=2", "--set", "batch_size=2"]
    assert main(["prepare", str(phantoms / "ct_nifti"), "--cache", str(cache), "--bundle", "mae_ct_3d", "--image-size", "16",
                 "--workers", "0", *tiny]) == 0
    out = capsys.readouterr()
    assert "2 item(s) written, 0 already there, 0 unreadable" in out.out and "items/s" in out.err
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(files) == 2
    assert main(["-q", "pretrain", "--bundle", "mae_ct_3d", "--data", str(phantoms / "ct_nifti"), "--out", str(tmp_path / "run"),
                 "--image-size", "16", "--max-epochs", "1", "--set", "cache=disk", "--set", f"cache_dir={cache}", *tiny]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == files  # every item a cache hit: nothing rewritten
    assert main(["prepare", str(phantoms / "ct_nifti"), "--cache", str(cache), "--bundle", "mae_ct_3d", "--image-size", "16",
                 "--workers", "0", *tiny]) == 0
    assert "0 item(s) written, 2 already there" in capsys.readouterr().out
