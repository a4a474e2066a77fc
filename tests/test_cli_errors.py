"""Bad input through the ``medssl`` command: one line naming the file or setting and the problem, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.cli import main


def _npz(path, images, labels=None, val=True, **extra):
    arrays = {"train_images": images, **({"train_labels": labels} if labels is not None else {})}
    if val:
        arrays.update(val_images=images[:4], val_labels=(labels[:4] if labels is not None else np.array([[0], [1], [0], [1]])))
    np.savez(path, **{**arrays, **extra})
    return path


def _images(n=8, spatial_dims=2):
    return np.random.default_rng(0).integers(0, 255, (n,) + (28,) * spatial_dims, dtype=np.uint8)


def _labels(n=8):
    return (np.arange(n) % 2)[:, None]


def _run(tmp_path):
    return tmp_path / "run"


CASES = {  # name -> (make the input in tmp_path, then the command) and the words the one line must hold
    "datalist entry without image": (lambda t: (t / "d.json").write_text(json.dumps({"training": [{"modality": "CT"}]})),
                                     lambda t: ["pretrain", "--bundle", "mae_ct_3d", "--data", str(t / "d.json"), "--out", str(_run(t))],
                                     ["d.json", "training[0]", "no 'image'"]),
    "training is not a list": (lambda t: (t / "d.json").write_text(json.dumps({"training": {"image": "a.nii.gz"}})),
                               lambda t: ["pretrain", "--bundle", "mae_ct_3d", "--data", str(t / "d.json"), "--out", str(_run(t))],
                               ["d.json", "must be a list"]),
    "moved files in a datalist": (lambda t: (t / "d.json").write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]})),
                                  lambda t: ["pretrain", "--bundle", "mae_ct_3d", "--data", str(t / "d.json"), "--out", str(_run(t))],
                                  ["d.json", "missing files", "moved"]),
    "text file named .npz": (lambda t: (t / "x.npz").write_text("not an archive"),
                             lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--data", str(t / "x.npz"), "--out", str(_run(t))],
                             ["x.npz", "not a readable .npz"]),
    ".npz without image arrays": (lambda t: np.savez(t / "x.npz", pixels=_images()),
                                  lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--data", str(t / "x.npz"), "--out", str(_run(t))],
                                  ["x.npz", "no <split>_images", "pixels"]),
    "negative labels": (lambda t: _npz(t / "x.npz", _images(), _labels() - 1),
                        lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                   "--bundle", "mae_xray_2d"],
                        ["x.npz", "negative classes"]),
    "float labels": (lambda t: _npz(t / "x.npz", _images(), _labels() + 0.5),
                     lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                "--bundle", "mae_xray_2d"],
                     ["x.npz", "class labels must be integers"]),
    "label count differs": (lambda t: _npz(t / "x.npz", _images(), _labels(6), val=False, val_images=_images(4), val_labels=_labels(4)),
                            lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                       "--bundle", "mae_xray_2d"],
                            ["x.npz", "6 labels for 8 images"]),
    "no val split": (lambda t: _npz(t / "x.npz", _images(), _labels(), val=False),
                     lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                "--bundle", "mae_xray_2d"],
                     ["x.npz", "'val' or 'test' split"]),
    "one class only": (lambda t: _npz(t / "x.npz", _images(), _labels() * 0),
                       lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                  "--bundle", "mae_xray_2d"],
                       ["x.npz", "one class only"]),
    "a class only in val": (lambda t: _npz(t / "x.npz", _images(), _labels(), val=False, val_images=_images(4),
                                           val_labels=np.array([[0], [1], [2], [0]])),
                            lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "ev"),
                                       "--bundle", "mae_xray_2d"],
                            ["x.npz", "[2]", "never in train"]),
    "string labels in a CSV": (lambda t: (t / "l.csv").write_text("image,label\na.png,pneumonia\n"),
                               lambda t: ["evaluate", "--checkpoint", str(t / "m.pt"), "--data", str(t / "l.csv"), "--out", str(t / "ev"),
                                          "--bundle", "mae_xray_2d"],
                               ["l.csv", "line 2", "'pneumonia'"]),
    "truncated checkpoint": (lambda t: (t / "m.pt").write_bytes(b"PK\x03\x04 truncated"),
                             lambda t: ["embed", "--checkpoint", str(t / "m.pt"), "--data", str(t / "x.npz"), "--out", str(t / "e.npz"),
                                        "--bundle", "mae_xray_2d"],
                             ["m.pt", "not a readable medssl checkpoint"]),
    "max epochs 0": (lambda t: None,
                     lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--data", str(t / "x.npz"), "--out", str(_run(t)), "--max-epochs", "0"],
                     ["max_epochs", ">= 1"]),
    "negative batch size": (lambda t: None,
                            lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--data", str(t / "x.npz"), "--out", str(_run(t)),
                                       "--batch-size", "-2"],
                            ["batch_size", ">= 1"]),
    "image size not divisible by the patch": (lambda t: None,
                                              lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--out", str(_run(t)), "--size", "micro",
                                                         "--image-size", "30", "--patch-size", "8", "--max-epochs", "1"],
                                              ["30", "patch"]),
    "output path is a file": (lambda t: (t / "taken").write_text("x"),
                              lambda t: ["pretrain", "--bundle", "mae_xray_2d", "--data", str(t / "x.npz"), "--out", str(t / "taken")],
                              ["taken", "is a file"]),
    "a task without its views": (lambda t: None,
                                 lambda t: ["pretrain", "--bundle", "dino_xray_2d", "--data", str(t / "x.npz"), "--out", str(_run(t)),
                                            "--size", "micro", "--patch-size", "4", "--max-epochs", "1", "--set", "views=[null]",
                                            "--set", "out_dim=64"],
                                 ["task 'dino' needs batch keys", "views", "view pipeline"]),
    "2D archive to a 3D bundle": (lambda t: None,
                                  lambda t: ["pretrain", "--bundle", "mae_ct_3d", "--data", str(t / "x.npz"), "--out", str(_run(t))],
                                  ["x.npz", "2D images", "mae_ct_3d is 3D", "spatial_dims=2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    make, command, words = CASES[case]
    _npz(tmp_path / "x.npz", _images(), _labels())  # a good archive for cases about something else
    (tmp_path / "m.pt").write_bytes(b"")  # replaced where the case is about the checkpoint
    if case.startswith(("negative labels", "float labels", "label count", "no val", "one class", "a class only",
                        "string labels")):
        import torch

        from medssl.models import ViT

        torch.save(ViT(2, 1, patch_size=16, size="tiny", window_size=7, global_every=3).state_dict(), tmp_path / "m.pt")
    make(tmp_path)
    rc = main(["-q", *command(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    line = [line for line in err.splitlines() if "error:" in line]
    assert len(line) == 1, err
    for word in words:
        assert word in line[0], (word, line[0])


def test_a_one_class_validation_split_warns_loudly_and_reports_balanced_accuracy(tmp_path, capsys):
    data = _npz(tmp_path / "x.npz", _images(16), _labels(16), val=False, val_images=_images(4), val_labels=np.zeros((4, 1), int))
    assert main(["-q", "pretrain", "--bundle", "mae_xray_2d", "--data", str(data), "--out", str(tmp_path / "run"), "--size", "micro",
                 "--max-epochs", "1", "--batch-size", "8"]) == 0
    rc = main(["-q", "evaluate", "--checkpoint", str(tmp_path / "run" / "models" / "model.pt"), "--data", str(data), "--out",
               str(tmp_path / "ev"), "--methods", "knn", "--baselines", "", "--seeds", "1", "--poolings", "mean", "--fractions", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "val split has one class only" in captured.err and "balanced accuracy" in captured.err
    assert "balanced" in (tmp_path / "ev" / "results.md").read_text()
