"""The MAE task: finite loss and gradients in 2D/3D, a loss that falls, pictures that keep what was visible."""

from __future__ import annotations

import pytest
import torch

from medssl.models import ViT
from medssl.tasks import TASKS, MAETask, build_task, patchify


def _task(spatial_dims, **kw):
    torch.manual_seed(0)
    backbone = ViT(spatial_dims, in_channels=1, patch_size=4, size="micro", window_size=kw.pop("window_size", None), global_every=2)
    return MAETask(backbone, **kw)


def _images(spatial_dims, n=3):
    torch.manual_seed(1)
    x = torch.rand(n, 1, *[16] * spatial_dims)
    x[0, :, :8] = 0  # a black border over half of image 0
    return x


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("window_size,threshold", [(None, None), (2, 0.0)])
def test_loss_and_gradients(spatial_dims, window_size, threshold):
    task = _task(spatial_dims, window_size=window_size, background_threshold=threshold)
    out = task({"image": _images(spatial_dims)})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in task.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    expected_background = 0.0 if threshold is None else (2 ** (spatial_dims - 1) * 2 ** spatial_dims / 2) / 4**spatial_dims / 3 * 2
    assert out["background"].item() == pytest.approx(expected_background, abs=1e-6)


def test_background_dropping_shrinks_the_encoder_input():
    x = _images(2)
    x[:, :, :8] = 0
    seen = {}
    for thr in (None, 0.0):
        task = _task(2, background_threshold=thr)
        seen[thr] = task.sample(x)[1].keep.shape[1]
    assert seen[0.0] < seen[None]


def test_loss_falls_when_fitting_a_small_set():
    task = _task(2, norm_pix_loss=False)
    batch = {"image": _images(2, n=8)}
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3)
    losses = []
    for step in range(100):
        torch.manual_seed(step)
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_visualize_keeps_visible_patches_and_hides_the_rest(spatial_dims):
    task = _task(spatial_dims, background_threshold=0.0).eval()
    x = _images(spatial_dims)
    torch.manual_seed(3)
    pics = task.visualize({"image": x})
    assert set(pics) == {"input", "masked", "reconstruction"}
    assert all(v.shape == x.shape for v in pics.values())
    hidden = torch.isnan(patchify(pics["masked"], task.patch_size)).all(-1)  # (B, N)
    share = hidden.float().mean().item()
    assert 0.3 < share < 0.75  # 75% of the foreground tokens (a sixth of the tokens are background)
    shown = ~hidden
    assert torch.equal(patchify(pics["reconstruction"], task.patch_size)[shown], patchify(x, task.patch_size)[shown])


def test_registry_builds_mae_by_name():
    assert TASKS["mae"] is MAETask
    backbone = ViT(2, patch_size=4, size="micro")
    assert isinstance(build_task("mae", backbone, mask_ratio=0.5), MAETask)
    with pytest.raises(ValueError, match="unknown task"):
        build_task("rotation", backbone)
