"""Run folders through ``medssl pretrain``: one run per folder, records that are data, resume that extends, privacy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.engine.run_folder import LOCK_NAME, lock_run_folder, release_run_folder, remove_orphans


def _npz(path, spatial_dims=2, n=12):
    rng = np.random.default_rng(0)
    shape = (n,) + (28,) * spatial_dims
    np.savez(path, train_images=rng.integers(0, 255, shape, dtype=np.uint8), train_labels=rng.integers(0, 2, (n, 1)))
    return path


@pytest.fixture
def npz(tmp_path):
    return _npz(tmp_path / "tiny.npz")


def _pretrain(npz, out, *extra):
    return main(["-q", "pretrain", "--bundle", "mae_xray_2d", "--data", str(npz), "--out", str(out), "--size", "micro",
                 "--batch-size", "4", *extra])


def _weights(path):
    return torch.load(path, weights_only=True)["network"]


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_starts_over(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--max-epochs", "2") == 0
    assert _pretrain(npz, out, "--max-epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "models").glob("checkpoint_*.pt"))[-1] == "checkpoint_00000006.pt"  # untouched
    assert _pretrain(npz, out, "--max-epochs", "1", "--overwrite") == 0
    assert sorted(p.name for p in (out / "models").glob("checkpoint_*.pt")) == ["checkpoint_00000003.pt"]
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_extending_a_finished_run_trains_on_with_a_rebuilt_schedule(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--max-epochs", "1") == 0
    done = torch.load(out / "models" / "checkpoint_00000003.pt", weights_only=True)
    assert done["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the 1-epoch cosine ended at 0
    assert _pretrain(npz, out, "--max-epochs", "2", "--resume") == 0
    extended = torch.load(out / "models" / "checkpoint_00000006.pt", weights_only=True)
    assert extended["lr_scheduler"]["lr_lambdas"][0]["total_steps"] == 6  # the schedule of the new total
    changed = [k for k, v in extended["network"].items() if not torch.equal(v, done["network"][k])]
    assert len(changed) > 10  # before the fix: learning rate 0, bit-identical weights
    assert _pretrain(npz, out, "--max-epochs", "2", "--resume") == 0  # a requeued job: nothing to train, and it says so
    assert "nothing to train" in capsys.readouterr().out
    assert _pretrain(npz, out, "--max-epochs", "1", "--resume") == 2  # fewer epochs than trained: refused


def test_resume_without_a_checkpoint_says_so_on_the_console(npz, tmp_path, capsys):
    assert _pretrain(npz, tmp_path / "run", "--max-epochs", "1", "--resume") == 0
    assert "no checkpoint in" in capsys.readouterr().err


def test_a_live_lock_is_refused_a_stale_one_taken_over(npz, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK_NAME).write_text(f"{sleeper.pid}@{socket.gethostname()}\n")
        assert _pretrain(npz, out, "--max-epochs", "1") == 2
        assert "in use by another run" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / "models").mkdir()
    orphan = out / "models" / ".checkpoint_00000003.pt.a1b2c3d4"  # what a kill during atomic_write leaves
    orphan.write_bytes(b"half")
    assert _pretrain(npz, out, "--max-epochs", "1") == 0  # the lock's process is gone: stale
    assert "taking it over" in capsys.readouterr().out
    assert not orphan.exists() and (out / "models" / "model.pt").is_file()


def test_the_lock_is_reentrant_within_a_process_and_orphans_are_only_temp_files(tmp_path):
    lock_run_folder(tmp_path)
    lock_run_folder(tmp_path)
    release_run_folder(tmp_path)
    assert (tmp_path / LOCK_NAME).exists()
    release_run_folder(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    keep = [tmp_path / "checkpoint_00000003.pt", tmp_path / ".hidden", tmp_path / "events.out.tfevents.1.host"]
    for p in keep + [tmp_path / ".run.json.x_9Ab3cd"]:
        p.write_text("x")
    assert [p.name for p in remove_orphans(tmp_path)] == [".run.json.x_9Ab3cd"]
    assert all(p.exists() for p in keep)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        lock_run_folder(tmp_path / "file")


def test_run_json_is_data_opening_a_shared_run_folder_runs_no_code(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--max-epochs", "1") == 0
    marker = tmp_path / "pwned"
    record = json.loads((out / "run.json").read_text())
    record["overrides"]["pixel_mean"] = f"$open({str(marker)!r}, 'w').write('x') and 0.0"
    (out / "run.json").write_text(json.dumps(record))
    ckpt = str(out / "models" / "model.pt")
    for cmd in (["embed", "--checkpoint", ckpt, "--data", str(npz), "--out", str(tmp_path / "e.npz")],
                ["attention", "--checkpoint", ckpt, "--data", str(npz), "--out", str(tmp_path / "att")],
                ["evaluate", "--checkpoint", ckpt, "--data", str(npz), "--out", str(tmp_path / "ev"), "--methods", "knn",
                 "--baselines", "", "--seeds", "1"],
                ["pretrain", "--bundle", "mae_xray_2d", "--data", str(npz), "--out", str(out), "--max-epochs", "2", "--resume"]):
        assert main(["-q", *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert "run.json" in err and "pixel_mean" in err and "plain values" in err
        assert not marker.exists()
    record["overrides"] = {"pixel_mean": 0.0, "train#handlers": {"_target_": "os.system", "command": f"touch {marker}"}}
    (out / "run.json").write_text(json.dumps(record))
    assert main(["-q", "embed", "--checkpoint", ckpt, "--data", str(npz), "--out", str(tmp_path / "e.npz")]) == 2
    assert "_target_" in capsys.readouterr().err and not marker.exists()


def test_private_records_hash_the_data_path(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--max-epochs", "1", "--private") == 0
    recorded = json.loads((out / "run.json").read_text())["overrides"]["dataset_dir"]
    assert recorded.startswith("private:") and str(tmp_path) not in (out / "run.json").read_text()
    assert main(["-q", "pretrain", "--bundle", "mae_xray_2d", "--out", str(out), "--max-epochs", "2", "--resume"]) == 2
    assert "give --data again" in capsys.readouterr().err
    assert _pretrain(npz, out, "--max-epochs", "2", "--resume", "--private") == 0
