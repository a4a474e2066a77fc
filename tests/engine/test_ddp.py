"""DDP on CPU: the bundle's multi_gpu_train.yaml overlay under torchrun with two gloo processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from medssl.bundles import bundle_root


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("bundle,spatial_dims,extra", [
    ("mae_xray_2d", 2, []),
    ("mae_dino_ct_3d", 3, ["--out_dim", "64", "--n_local_crops", "2"]),  # cyclic: each task leaves the other's head unused
    ("brainfuse_xray_2d", 2, ["--bt_dim", "32"]),  # summed: Barlow Twins + latent fusion on every step
])
def test_two_process_training_shards_data_and_syncs_gradients(tmp_path, bundle, spatial_dims, extra):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, train_images=rng.integers(0, 255, (24,) + (28,) * spatial_dims, dtype=np.uint8),
             train_labels=rng.integers(0, 2, (24, 1)))
    configs = bundle_root(bundle) / "configs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "monai.bundle", "run",
           "--config_file", f"['{configs / 'train.yaml'}','{configs / 'multi_gpu_train.yaml'}']",
           "--logging_file", str(configs / "logging.conf"), "--dataset_dir", str(data), "--output_dir", str(tmp_path / "run"),
           "--vit_size", "micro", "--image_size", "28", "--patch_size", "4", "--window_size", "0", "--batch_size", "4",
           "--max_epochs", "2", "--picture_every", "2", "--samples_per_volume", "1", *extra]
    env = {**os.environ, "MEDSSL_SALT": "t", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # 24 images over 2 ranks at 4 per step: 3 steps per epoch, so the final checkpoint is iteration 6
    assert [p.name for p in (tmp_path / "run" / "models").glob("checkpoint_*.pt")] == ["checkpoint_00000006.pt"]
    # only rank 0 reports: one summary line per epoch, one TensorBoard writer, no progress lines from rank 1
    assert len(re.findall(r"epoch 2/2 \(iteration 6\): loss \S+ .* grad_norm \S+", out.stdout)) == 1
    assert out.stdout.count("Engine run finished") == 1 and out.stdout.count(" training on ") == 1
    assert len(list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))) == 1


_TINY_DINO = ["--vit_size", "micro", "--image_size", "28", "--patch_size", "4", "--window_size", "0", "--max_epochs", "2",
              "--picture_every", "2", "--samples_per_volume", "1", "--out_dim", "64", "--n_local_crops", "2", "--amp", "none",
              "--cache", "none", "--checkpoint_every", "2",
              # the paper's DINO, not the bundle's short-budget recipe: BatchNorm statistics stay per rank on CPU
              # (SyncBatchNorm needs a GPU), so a BatchNorm head cannot equal one process with the whole batch, and the
              # sharp (0.02) Sinkhorn teacher turns fp32 summation-order noise into 2e-5 differences in 6 steps
              # (its all-reduced sums are checked in tests/tasks/test_contrastive.py)
              "--head_batch_norm", "False", "--centering", "ema", "--teacher_temp", "0.07", "--warmup_teacher_temp", "0.04"]
_SAVE_EACH_RANK = """
finalize:
  - "$torch.save(@multitask.state_dict(), @output_dir + f'/rank{dist.get_rank()}.pt')"
  - "$dist.is_initialized() and dist.destroy_process_group()"
"""
_CRASH = '''
from ignite.engine import Events


def crash_at(trainer, iteration):
    """Every rank stops at ``iteration`` before its step, as a killed job does (the last checkpoint is older)."""
    @trainer.on(Events.ITERATION_STARTED(once=iteration))
    def _kill(engine):
        raise SystemExit(f"killed at iteration {iteration}")
    return trainer.run()
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_nodes_end_identical_equal_one_process_and_resume_exactly(tmp_path):
    """Two `torchrun` invocations (2 nodes x 1 process, c10d rendezvous on localhost, gloo) train DINO to the same weights on
    both ranks, equal to one process with the same global batch; a run killed mid-epoch resumes on both ranks to the
    same weights. DINO because its step draws no random numbers (views are seeded per image, the centre is averaged over
    ranks), so the runs differ only in the order fp32 sums are taken."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, train_images=rng.integers(0, 255, (24, 28, 28), dtype=np.uint8), train_labels=rng.integers(0, 2, (24, 1)))
    (tmp_path / "save.yaml").write_text(_SAVE_EACH_RANK)
    (tmp_path / "crash.py").write_text(_CRASH)
    (tmp_path / "crash.yaml").write_text('imports: ["$import torch", "$import monai", "$import medssl", "$import crash"]\n'
                                        'run: ["$crash.crash_at(@train#trainer, 5)"]\n')
    configs = bundle_root("dino_xray_2d") / "configs"
    env = {**os.environ, "MEDSSL_SALT": "t", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def bundle_run(files, out, batch_size, *extra):
        files = [str(configs / "train.yaml")] + [str(f) for f in files]
        return ["-m", "monai.bundle", "run", "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]", "--dataset_dir", str(data),
                "--output_dir", str(tmp_path / out), "--batch_size", str(batch_size), *_TINY_DINO, *extra]

    overlay = [configs / "multi_gpu_train.yaml", tmp_path / "save.yaml"]
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "--rdzv_id", "medssl-test", *bundle_run(overlay, "two_nodes", 4)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    one = subprocess.run([sys.executable, *bundle_run([], "one_process", 8)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / "two_nodes" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in rank0:  # DDP keeps the replicas bit-identical: every rank applies the same averaged gradient
        assert torch.equal(rank0[k], rank1[k]), k
    single = torch.load(tmp_path / "one_process" / "models" / "checkpoint_00000006.pt", weights_only=True)["network"]
    # 2 x 4 images per step vs 8 in one process: the same images, views and centre; only fp32 sums differ (gloo adds two
    # half-batch mean gradients, one process one batch: ~1e-7 relative), so weights agree to 2e-6 after 6 AdamW steps.
    # The attention key bias is the exception: its gradient is zero up to rounding (softmax ignores it), and AdamW scales
    # rounding noise of ~1e-10 by 1 / (sqrt(v) + 1e-8) to steps of ~1e-2 lr, so it gets 1e-4 (lr 5e-4, 6 steps).
    for k in rank0:
        atol = 1e-4 if k.endswith("qkv.bias") else 2e-6
        torch.testing.assert_close(rank0[k], single[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")

    # killed at iteration 5 (mid-epoch 2; the last checkpoint is iteration 4), then resumed: both ranks continue from the
    # same checkpoint and sampler position and end where the uninterrupted run ended
    two_procs = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    killed = subprocess.run([*two_procs, *bundle_run(overlay + [tmp_path / "crash.yaml"], "resumed", 4)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert killed.returncode != 0 and "killed at iteration 5" in killed.stdout + killed.stderr
    assert sorted(p.name for p in (tmp_path / "resumed" / "models").glob("checkpoint_*.pt"))[-1] == "checkpoint_00000004.pt"
    resumed = subprocess.run([*two_procs, *bundle_run(overlay, "resumed", 4, "--resume", "true")], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    for r in (0, 1):
        state = torch.load(tmp_path / "resumed" / f"rank{r}.pt", weights_only=True)
        for k in rank0:
            assert torch.equal(state[k], rank0[k]), (r, k)


def test_sync_batch_norm_leaves_cpu_modules_and_single_processes_alone(monkeypatch, caplog):
    import logging

    import medssl.distributed as dist
    from medssl.distributed import sync_batch_norm

    head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert sync_batch_norm(head) is head and isinstance(head[1], torch.nn.BatchNorm1d)  # one process: nothing to sync
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with caplog.at_level(logging.INFO, logger="medssl.distributed"):
        assert sync_batch_norm(head) is head and isinstance(head[1], torch.nn.BatchNorm1d)  # gloo on CPU: no SyncBatchNorm
    assert "SyncBatchNorm needs a GPU" in caplog.text
    no_bn = torch.nn.Linear(2, 2)
    assert sync_batch_norm(no_bn) is no_bn
