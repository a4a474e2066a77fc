"""Settings reach the bundle as given, or are refused: nulls on every path, unknown keys, expressions in --set.

Each path a user takes is tested: ``medssl pretrain --set``, ``run_bundle`` from Python, and
``python -m monai.bundle run`` in a subprocess (MONAI's runner is where the ``null`` was lost).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medssl.bundle_settings import _argv_pairs, check_known, check_plain, config_settings, guard_monai_runner
from medssl.bundles import bundle_root, run_bundle
from medssl.cli import main
from medssl.models import ViT

TINY_3D = dict(vit_size="micro", image_size=16, patch_size=4, batch_size=2, cache="none", max_epochs=1)


@pytest.fixture
def built_windows(monkeypatch):
    """The window sizes of every ViT built while the test runs."""
    seen = []
    init = ViT.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.window_size)

    monkeypatch.setattr(ViT, "__init__", spy)
    return seen


def _npz(path, spatial_dims, n=8, dtype=np.uint8, high=255):
    rng = np.random.default_rng(0)
    shape = (n,) + (28,) * spatial_dims
    images = (rng.random(shape) * high).astype(dtype)
    np.savez(path, train_images=images, train_labels=rng.integers(0, 2, (n, 1)), val_images=images[:4],
             val_labels=np.array([[0], [1], [0], [1]]))
    return path


def test_a_null_window_reaches_the_model_through_run_bundle(phantoms, tmp_path, monkeypatch, built_windows):
    monkeypatch.chdir(tmp_path)
    run_bundle("mae_ct_3d", "train", dict(TINY_3D, window_size=None, dataset_dir=str(phantoms / "ct_dicom"),
                                          output_dir=str(tmp_path / "run")))
    assert built_windows and all(w is None for w in built_windows)  # MONAI's run() dropped it: (4, 4, 4) was built


@pytest.mark.parametrize("value", ["null", "0"])
def test_global_attention_through_medssl_set_and_the_medmnist_fit(tmp_path, value, built_windows):
    data = _npz(tmp_path / "v.npz", 3)
    assert main(["-q", "pretrain", "--bundle", "mae_ct_3d", "--data", str(data), "--out", str(tmp_path / "run"), "--size", "micro",
                 "--max-epochs", "1", "--batch-size", "4", "--set", f"window_size={value}"]) == 0
    assert built_windows and all(w is None for w in built_windows)
    built_windows.clear()
    assert main(["-q", "pretrain", "--bundle", "mae_ct_3d", "--data", str(data), "--out", str(tmp_path / "fit"), "--size", "micro",
                 "--max-epochs", "1", "--batch-size", "4"]) == 0  # the MedMNIST fit asks for global attention
    assert built_windows and all(w is None for w in built_windows)
    out = tmp_path / "emb.npz"  # embed rebuilds the network that trained
    built_windows.clear()
    assert main(["-q", "embed", "--checkpoint", str(tmp_path / "fit" / "models" / "model.pt"), "--data", str(data),
                 "--out", str(out)]) == 0
    assert built_windows and all(w is None for w in built_windows)


def test_unknown_settings_are_refused_closest_first(tmp_path, capsys):
    data = _npz(tmp_path / "v.npz", 2)
    assert main(["pretrain", "--bundle", "mae_xray_2d", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--set", "mask_ratoi=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown setting 'mask_ratoi'" in err and "did you mean 'mask_ratio'?" in err
    assert err.index("mask_ratio") < err.index("batch_size")  # the closest match comes before the alphabetical rest
    assert not (tmp_path / "r" / "run.json").exists()  # nothing recorded
    known, settings = config_settings(bundle_root("mae_xray_2d") / "configs" / "train.yaml")
    check_known({"train#dataloader#batch_size": 2, "mask_ratio": 0.5}, known, settings, "x")  # paths into known keys pass
    assert "network_def" in known and "network_def" not in settings  # objects are config, not settings


def test_expressions_in_set_are_refused(tmp_path, capsys):
    assert main(["pretrain", "--bundle", "mae_xray_2d", "--out", str(tmp_path / "r"), "--set", "pixel_mean=$1+1"]) == 2
    assert "expression or reference MONAI would run" in capsys.readouterr().err
    for bad in ({"a": "@network"}, {"a": "%other.yaml#x"}, {"a": {"_target_": "os.system", "command": "true"}}, {"a": [1, "$x"]}):
        with pytest.raises(ValueError, match="plain values"):
            check_plain(bad, "run.json")
    check_plain({"a": [1, 2.5, "abdomen"], "b": None, "c": {"simclr": {"out_dim": 8}}}, "run.json")


def test_the_guard_reads_fire_command_lines():
    assert _argv_pairs(["run", "--config_file", "a.yaml", "--window_size", "None", "--resume", "--x=3"]) == {
        "config_file": "a.yaml", "window_size": "None", "resume": None, "x": "3"}
    guard_monai_runner(["/usr/bin/medssl", "--window_size", "None"])  # not MONAI's runner: nothing to check


def _monai_run(tmp_path, *args, config="train.yaml", bundle="mae_ct_3d"):
    env = dict(os.environ, MEDSSL_SALT="medssl-tests")
    env.pop("MEDSSL_VERBOSE", None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle_root(bundle) / "configs" / config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


@pytest.mark.parametrize("spelling", ["None", "null"])
def test_monai_runner_refuses_a_null_it_would_drop(tmp_path, spelling):
    done = _monai_run(tmp_path, "--window_size", spelling, "--output_dir", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"--window_size {spelling}" in line and "--window_size 0" in line and "4" in line  # the default it would have used
    assert not (tmp_path / "run" / "models").exists()


@pytest.mark.parametrize("spelling", ["false", "no"])
def test_monai_runner_refuses_a_false_it_would_read_as_true(tmp_path, spelling, monkeypatch):
    """Fire parses `False` as a bool but `false` as the text 'false', which is truthy: `--resume false` resumed."""
    done = _monai_run(tmp_path, "--resume", spelling, "--output_dir", str(tmp_path / "run"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"--resume {spelling}" in line and "write --resume False" in line
    assert not (tmp_path / "run" / "models").exists()
    from medssl.bundle_settings import guard_monai_runner

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the guard installs its one-line hook; restored after
    config = str(bundle_root("mae_ct_3d") / "configs" / "train.yaml")
    guard_monai_runner(["/x/monai/bundle/__main__.py", "run", "--config_file", config, "--resume", "False"])  # fire's bool: fine


def test_monai_runner_trains_global_with_0_and_refuses_typos_in_one_line(tmp_path, phantoms):
    settings = ["--dataset_dir", str(phantoms / "ct_dicom"), "--output_dir", str(tmp_path / "run"), "--vit_size", "micro",
                "--image_size", "16", "--patch_size", "4", "--batch_size", "2", "--cache", "none", "--max_epochs", "1"]
    done = _monai_run(tmp_path, *settings, "--window_size", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "models" / "model.pt").is_file()
    typo = _monai_run(tmp_path, *settings, "--mask_ratoi", "0.1")
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "did you mean 'mask_ratio'" in typo.stderr.strip().splitlines()[-1]
    missing = _monai_run(tmp_path, *settings[2:], "--dataset_dir", str(tmp_path / "moved"), "--output_dir", str(tmp_path / "r2"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m monai.bundle: error:") and "moved" in last and "does not exist" in last


def test_mlflow_tracking_logs_the_loss_on_both_paths(tmp_path, phantoms):
    pytest.importorskip("mlflow")
    settings = ["--dataset_dir", str(phantoms / "ct_dicom"), "--vit_size", "micro", "--image_size", "16", "--patch_size", "4",
                "--batch_size", "2", "--cache", "none", "--max_epochs", "1"]
    done = _monai_run(tmp_path, *settings, "--output_dir", str(tmp_path / "run"), "--tracking", "mlflow")
    assert done.returncode == 0, done.stderr[-1500:]  # crashed at iteration 1: float() of a tuple
    assert (tmp_path / "run" / "mlruns.db").stat().st_size > 0
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and "train_loss" in runs[0].data.metrics
    out = tmp_path / "medssl_run"
    assert main(["-q", "pretrain", "--bundle", "mae_ct_3d", "--data", str(phantoms / "ct_dicom"), "--out", str(out),
                 "--size", "micro", "--image-size", "16", "--patch-size", "4", "--batch-size", "2", "--max-epochs", "1",
                 "--set", "cache=none", "--tracking", "mlflow"]) == 0
    assert (out / "mlruns.db").stat().st_size > 0
