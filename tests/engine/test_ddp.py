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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
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
