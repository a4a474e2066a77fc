"""The medssl command line: fast help, scan / preview / demo write what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medssl.cli import main


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-c", "import sys, medssl.cli; medssl.cli.main(['--help'])"],
                         capture_output=True, text=True)
    for cmd in ("scan", "preview", "phantoms", "demo", "pretrain", "embed"):
        assert cmd in out.stdout
    mods = subprocess.run([sys.executable, "-c", "import sys, medssl.cli; print('monai' in sys.modules, 'torch' in sys.modules)"],
                          capture_output=True, text=True).stdout.split()
    assert mods == ["False", "False"]  # heavy imports happen inside the commands


def test_scan_then_preview(phantoms, tmp_path, capsys):
    assert main(["-q", "scan", str(phantoms), "--out", str(tmp_path / "dl.json")]) == 0
    printed = capsys.readouterr().out
    assert "CT" in printed and "wrote" in printed
    data = json.loads((tmp_path / "dl.json").read_text())
    assert len(data["training"]) == 6
    assert main(["-q", "preview", str(tmp_path / "dl.json"), "--out", str(tmp_path / "pv"), "--size-3d", "16"]) == 0
    pngs = sorted((tmp_path / "pv").glob("*.png"))
    assert [p.name for p in pngs] == ["preview_2d_000.png", "preview_3d_000.png"]
    img = np.asarray(Image.open(pngs[1]))
    assert img.shape[0] > 200 and img.std() > 10  # a real picture, not a blank page


def test_scan_errors_are_clear(tmp_path, capsys):
    assert main(["-q", "scan", str(tmp_path / "missing"), "--out", str(tmp_path / "dl.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["-q", "scan", str(tmp_path / "empty"), "--out", str(tmp_path / "dl.json")]) == 1


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "demo"), "--cases", "2", "--epochs", "1"]) == 0
    out = tmp_path / "demo"
    assert (out / "datalist.json").is_file() and (out / "data" / "labels.csv").is_file()
    assert len(list((out / "preview").glob("preview_*.png"))) == 2
    assert (out / "pretrain" / "models" / "model.pt").is_file()
    assert (out / "pretrain" / "pictures" / "mae_final.png").is_file()
    assert json.loads((out / "pretrain" / "run.json").read_text())["bundle"] == "mae_ct_3d"
    printed = capsys.readouterr().out
    assert "previews:" in printed and "MAE pictures:" in printed
    assert main(["-q", "demo", "--out", str(tmp_path / "demo"), "--cases", "2", "--epochs", "1"]) == 0  # the README twice


def _tiny_npz(path, spatial_dims=2, n=24):
    rng = np.random.default_rng(0)
    shape = (n,) + (28,) * spatial_dims
    np.savez(path, train_images=rng.integers(0, 255, shape, dtype=np.uint8), train_labels=rng.integers(0, 2, (n, 1)),
             val_images=rng.integers(0, 255, (8,) + shape[1:], dtype=np.uint8), val_labels=rng.integers(0, 2, (8, 1)))
    return path


@pytest.mark.parametrize("spatial_dims,bundle", [(2, "mae_xray_2d"), (3, "mae_ct_3d")])
def test_pretrain_resume_and_embed_on_a_medmnist_npz(tmp_path, spatial_dims, bundle, capsys):
    data = _tiny_npz(tmp_path / "tiny.npz", spatial_dims)
    run = tmp_path / "run"
    common = ["pretrain", "--bundle", bundle, "--data", str(data), "--out", str(run), "--size", "micro", "--batch-size", "8"]
    assert main(["-q", *common, "--max-epochs", "1"]) == 0
    assert "%|" not in capsys.readouterr().err  # -q: no tqdm bar
    record = json.loads((run / "run.json").read_text())
    assert record["overrides"]["image_size"] == 28 and record["overrides"]["patch_size"] == 4
    assert "progress" not in record["overrides"]  # a display choice, not a training setting
    assert main([*common, "--max-epochs", "2", "--resume"]) == 0
    err = capsys.readouterr().err  # without -q, progress would be plain lines here (stderr is no terminal) ...
    assert "\r" not in err and "%|" not in err and "iterations, loss" not in err  # ... but 3 steps per epoch need none
    assert (run / "models" / "checkpoint_00000006.pt").is_file()  # 3 steps per epoch, continued to epoch 2
    out = tmp_path / "emb.npz"
    assert main(["-q", "embed", "--checkpoint", str(run / "models" / "model.pt"), "--data", str(data), "--out", str(out)]) == 0
    emb = np.load(out)  # every split: 24 train + 8 val rows, with the split, a stable id and the label
    assert emb["embeddings"].shape == (32, 48) and emb["label"].shape == (32,)
    assert emb["split"].tolist() == ["train"] * 24 + ["val"] * 8 and len(set(emb["id"].tolist())) == 32
    with np.load(data) as z:
        assert emb["label"].tolist() == z["train_labels"][:, 0].tolist() + z["val_labels"][:, 0].tolist()
    import pandas as pd

    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table.columns[:5]) == ["id", "split", "label", "source", "patient"] and table.shape == (32, 5 + 48)
    assert (table["source"] == "tiny").all() and table["id"].tolist() == emb["id"].tolist()
    np.testing.assert_allclose(table[[f"e{i}" for i in range(48)]].to_numpy(), emb["embeddings"], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "emb.npz.parts").exists()


def test_pretrain_and_embed_errors(tmp_path, capsys):
    assert main(["pretrain", "--bundle", "nope", "--out", str(tmp_path)]) == 2
    assert "no bundle named 'nope'" in capsys.readouterr().err
    assert main(["pretrain", "--bundle", "mae_ct_3d", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert main(["embed", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "e.npz")]) == 2


@pytest.mark.parametrize("spatial_dims,bundle,sets", [
    (2, "dino_xray_2d", ["out_dim=64", "n_local_crops=2"]),
    (3, "mae_dino_ct_3d", ["out_dim=64", "n_local_crops=2"]),
    (3, "simclr_xray_2d", ["method=barlow", "view_modality=CT", "spatial_dims=3"]),  # a 2D recipe asked for in 3D
])
def test_contrastive_pretraining_then_attention_maps(tmp_path, spatial_dims, bundle, sets):
    data = _tiny_npz(tmp_path / "tiny.npz", spatial_dims, n=16)
    run = tmp_path / "run"
    flags = [f for s in sets for f in ("--set", s)]
    assert main(["-q", "pretrain", "--bundle", bundle, "--data", str(data), "--out", str(run), "--size", "micro",
                 "--batch-size", "8", "--max-epochs", "1", *flags]) == 0
    pictures = sorted(p.name for p in (run / "pictures").glob("*_final.png"))
    assert pictures == {"dino_xray_2d": ["dino_final.png"], "mae_dino_ct_3d": ["dino_final.png", "mae_final.png"],
                        "simclr_xray_2d": ["barlow_final.png"]}[bundle]
    out = tmp_path / "attention"
    assert main(["-q", "attention", "--checkpoint", str(run / "models" / "model.pt"), "--data", str(data), "--out", str(out),
                 "--max-images", "5"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["attention_000.png", "attention_001.png"]


@pytest.mark.parametrize("spatial_dims,bundle", [(2, "brainfuse_xray_2d"), (3, "brainfuse_3d")])
def test_supervised_brainfuse_pretraining_then_fused_scans_written_as_files(tmp_path, spatial_dims, bundle, capsys):
    """The user's path: labelled data, classify + Barlow Twins + latent fusion summed, then `medssl fuse` on the checkpoint."""
    data = _tiny_npz(tmp_path / "tiny.npz", spatial_dims, n=16)
    run = tmp_path / "run"
    assert main(["-q", "pretrain", "--bundle", bundle, "--data", str(data), "--out", str(run), "--size", "micro",
                 "--batch-size", "8", "--max-epochs", "1", "--set", "bt_dim=32", "--set", "fuse_patients=3",
                 "--set", "task_names=['classify','barlow','brainfuse']"]) == 0
    assert sorted(p.name for p in (run / "pictures").glob("*_final.png")) == ["barlow_final.png", "brainfuse_final.png"]
    import torch

    from medssl.engine import latest_checkpoint

    state = torch.load(latest_checkpoint(run / "models"), weights_only=True)["network"]
    assert float(state["tasks.classify.head.bias"].abs().sum()) > 0  # the classifier trained (its bias starts at 0)
    assert any(k.startswith("tasks.brainfuse.generator.") for k in state)
    out = tmp_path / "fused"
    assert main(["-q", "fuse", "--checkpoint", str(run / "models" / "model.pt"), "--data", str(data), "--out", str(out),
                 "--patients", "3", "--count", "2"]) == 0
    suffix = ".nii.gz" if spatial_dims == 3 else ".png"
    for i in range(2):
        for kind in ("raw", "latent", "latent_detail", "partition"):
            assert (out / f"fused_{i:03d}_{kind}{suffix}").stat().st_size > 100
    record = json.loads((out / "fusion.json").read_text())
    for scan in record["fused"]:
        assert len(set(scan["patients"])) == 3 and sum(scan["shares"]) == pytest.approx(1, abs=1e-3)
    if spatial_dims == 3:
        import nibabel as nib

        raw = nib.load(out / "fused_000_raw.nii.gz").get_fdata()
        parts = nib.load(out / "fused_000_partition.nii.gz").get_fdata()
        assert raw.shape == parts.shape == (28, 28, 28) and set(np.unique(parts)) <= {1, 2, 3}
        assert 0 <= raw.min() and raw.max() <= 1
    else:
        assert Image.open(out / "fused_000_raw.png").size == (28, 28)
    assert (out / "fusion.png").stat().st_size > 1000
    assert main(["fuse", "--checkpoint", str(run / "models" / "model.pt"), "--data", str(data), "--out", str(out),
                 "--patients", "20"]) == 2  # more patients than a fused scan can have: one line, no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2..8" in err
