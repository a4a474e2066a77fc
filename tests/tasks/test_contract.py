"""The contract every pretraining task keeps, checked once per task in 2D and 3D.

A new task gets its own subclass of :class:`TaskContract` (``make_task`` and ``make_batch``);
the tests are inherited.
"""

from __future__ import annotations

import pytest
import torch

from medssl.data.views import multi_crop, two_views
from medssl.engine import MultiTask
from medssl.models import ViT
from medssl.tasks import BarlowTwinsTask, DINOTask, MAETask, SimCLRTask

SIZE, LOCAL = 16, 8


def _backbone(spatial_dims: int) -> ViT:
    torch.manual_seed(0)
    return ViT(spatial_dims, in_channels=1, patch_size=4, size="micro", window_size=2, global_every=2, cls_token=True)


def _images(spatial_dims: int, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, *[SIZE] * spatial_dims, generator=g)


def _batch(images: torch.Tensor, views) -> dict:
    if views is None:
        return {"image": images}
    views.set_random_state(seed=3)
    items = [views({"image": img}) for img in images]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("spatial_dims", [2, 3])
class TaskContract:
    """Inherited tests; subclasses say how to build the task and its views."""

    def make_task(self, backbone):
        raise NotImplementedError

    def make_views(self, spatial_dims):
        return None

    def _setup(self, spatial_dims):
        task = self.make_task(_backbone(spatial_dims))
        task.step_start(0.5)  # past any warm-up or frozen phase
        return task, _batch(_images(spatial_dims), self.make_views(spatial_dims))

    def test_finite_loss_and_a_gradient_for_every_trainable_parameter(self, spatial_dims):
        task, batch = self._setup(spatial_dims)
        out = task(batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        assert trainable
        for name, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(float(p.grad.abs().sum()) > 0 for _, p in task.backbone.named_parameters())

    def test_missing_views_are_named(self, spatial_dims):
        task, batch = self._setup(spatial_dims)
        with pytest.raises(KeyError, match=task.required_keys[0]):
            MultiTask([task])({"patient": ["p0"]}, 1)

    def test_pictures_match_the_images(self, spatial_dims):
        task, batch = self._setup(spatial_dims)
        pictures = task.visualize(batch)
        for name, img in pictures.items():
            assert img.shape[0] == batch["image"].shape[0] and img.shape[2:] == batch["image"].shape[2:], name
            assert torch.isfinite(img[~torch.isnan(img)]).all()


class TestMAE(TaskContract):
    def make_task(self, backbone):
        return MAETask(backbone, mask_ratio=0.5)


class TestDINO(TaskContract):
    def make_task(self, backbone):
        return DINOTask(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16)

    def make_views(self, spatial_dims):
        return multi_crop(spatial_dims, SIZE, LOCAL, n_local=2)


class TestDINOWithSpreadingAids(TestDINO):
    def make_task(self, backbone):
        return DINOTask(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16, head_batch_norm=True, koleo_weight=0.1)


class TestSimCLR(TaskContract):
    def make_task(self, backbone):
        return SimCLRTask(backbone, hidden_dim=32, out_dim=16)

    def make_views(self, spatial_dims):
        return two_views(spatial_dims, SIZE, modality="DX")


class TestBarlowTwins(TaskContract):
    def make_task(self, backbone):
        return BarlowTwinsTask(backbone, hidden_dim=32, out_dim=32)

    def make_views(self, spatial_dims):
        return two_views(spatial_dims, SIZE)
