"""The contract every pretraining task keeps, checked once per task in 2D and 3D.

A new task gets its own subclass of :class:`TaskContract` (``make_task`` and ``make_views``);
the tests are inherited. Each task runs on the ViT and, unless it needs a token grid
(``needs_grid``), on :class:`ConvEncoder`, a minimal encoder that is not a ViT and only keeps the
:class:`~medssl.models.base.Encoder` interface: what a second backbone must offer to plug in.
"""

from __future__ import annotations

import pytest
import torch

from medssl.data.block_masks import jepa_blocks
from medssl.data.views import multi_crop, query_boxes, two_views
from medssl.engine import MultiTask
from torch import nn

from medssl.models import Medformer, ViT
from medssl.models.base import Encoder, GridEncoder
from medssl.tasks import (BarlowTwinsTask, BrainFuseTask, BYOLTask, ClassificationTask, DINOTask, JigsawTask, MAETask,
                          IJEPATask, QueryBoxTask, RawBrainFuseTask, SimCLRTask, SwAVTask)

SIZE, LOCAL = 16, 8


class ConvEncoder(nn.Module):
    """Not a ViT: strided convolutions whose output cells are the tokens, plus a learned summary
    token. It keeps :class:`Encoder` (and records the ``context`` it was given), nothing more."""

    num_prefix_tokens = 1

    def __init__(self, spatial_dims: int, in_channels: int = 1, embed_dim: int = 24) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.embed_dim = spatial_dims, in_channels, embed_dim
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.stem = nn.Sequential(conv(in_channels, embed_dim, 4, stride=4), nn.GELU(), conv(embed_dim, embed_dim, 1))
        self.summary = nn.Linear(embed_dim, embed_dim)
        self.contexts: list = []

    def forward(self, x, keep=None, context=None):
        if keep is not None:
            raise ValueError("ConvEncoder has no token grid to mask")
        self.contexts.append(context)
        cells = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([self.summary(cells.mean(1, keepdim=True)), cells], 1)


def _backbone(spatial_dims: int, kind: str = "vit") -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        return ConvEncoder(spatial_dims)
    if kind == "medformer":  # one Perceiver IO for 2D and 3D; a task takes the view of its dimensionality
        return Medformer(patch_size=4, embed_dim=24, num_heads=2, depth=1, num_latents=4, latents_per_entry=2).view(spatial_dims)
    return ViT(spatial_dims, in_channels=1, patch_size=4, size="micro", window_size=2, global_every=2, cls_token=True)


def test_the_vit_keeps_the_grid_interface_and_the_conv_encoder_only_the_base_one():
    assert isinstance(_backbone(2), GridEncoder) and isinstance(_backbone(3), Encoder)
    conv = _backbone(2, "conv")
    assert isinstance(conv, Encoder) and not isinstance(conv, GridEncoder)


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
@pytest.mark.parametrize("encoder", ["vit", "conv", "medformer"])
class TaskContract:
    """Inherited tests; subclasses say how to build the task and its views."""

    needs_grid = False  # masked-token tasks need a GridEncoder and skip the conv encoder

    def make_task(self, backbone):
        raise NotImplementedError

    def make_views(self, spatial_dims):
        return None

    def _setup(self, spatial_dims, encoder="vit"):
        if encoder == "conv" and self.needs_grid:
            pytest.skip("this task masks tokens of a grid: it needs a GridEncoder")
        task = self.make_task(_backbone(spatial_dims, encoder))
        task.step_start(0.5)  # past any warm-up or frozen phase
        batch = _batch(_images(spatial_dims), self.make_views(spatial_dims))
        batch["modality"] = ["CT", "MR", "CT", "XR"]
        return task, batch

    def test_finite_loss_and_a_gradient_for_every_trainable_parameter(self, spatial_dims, encoder):
        task, batch = self._setup(spatial_dims, encoder)
        out = task(batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        idle = {f"backbone.{n}" for n in getattr(task.backbone, "idle_parameters", set)()}  # a Medformer view: the other adapter
        trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad and n not in idle]
        assert trainable
        for name, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(float(p.grad.abs().sum()) > 0 for _, p in task.backbone.named_parameters())

    def test_the_encoder_sees_the_batch_context(self, spatial_dims, encoder):
        task, batch = self._setup(spatial_dims, encoder)
        if encoder != "conv":
            pytest.skip("the ViT ignores its context; the conv encoder records it")
        task(batch)
        seen = [c for c in task.backbone.contexts if c is not None]
        assert seen, "the task called its encoder without the batch context"
        self.check_contexts(seen)

    def check_contexts(self, seen):
        for context in seen:  # multi-view inputs get the context repeated view-major
            n = len(context["modality"])
            assert n % 4 == 0 and context["modality"] == ["CT", "MR", "CT", "XR"] * (n // 4)

    def test_missing_views_are_named(self, spatial_dims, encoder):
        task, batch = self._setup(spatial_dims, encoder)
        with pytest.raises(KeyError, match=task.required_keys[0]):
            MultiTask([task])({"patient": ["p0"]}, 1)

    def test_pictures_match_the_images(self, spatial_dims, encoder):
        task, batch = self._setup(spatial_dims, encoder)
        pictures = task.visualize(batch)
        for name, img in pictures.items():
            assert img.shape[0] == batch["image"].shape[0] and img.shape[2:] == batch["image"].shape[2:], name
            assert torch.isfinite(img[~torch.isnan(img)]).all()


class TestMAE(TaskContract):
    needs_grid = True

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


class TestDINOSinkhorn(TestDINO):
    def make_task(self, backbone):
        return DINOTask(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16, centering="sinkhorn")


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


class TestBYOL(TaskContract):
    def make_task(self, backbone):
        return BYOLTask(backbone, hidden_dim=32, out_dim=16)

    def make_views(self, spatial_dims):
        return two_views(spatial_dims, SIZE)


class TestSwAV(TaskContract):
    def make_task(self, backbone):
        return SwAVTask(backbone, hidden_dim=32, out_dim=16, n_prototypes=12)

    def make_views(self, spatial_dims):
        return multi_crop(spatial_dims, SIZE, LOCAL, n_local=2)  # DINO's multi-crop: 2 global views and local crops


class TestSwAVTwoViews(TestSwAV):
    def make_views(self, spatial_dims):
        return two_views(spatial_dims, SIZE)


class TestIJEPA(TaskContract):
    needs_grid = True

    def make_task(self, backbone):
        return IJEPATask(backbone, predictor_dim=16, predictor_depth=1)

    def make_views(self, spatial_dims):  # a 4^d token grid: small blocks so the context keeps tokens
        return jepa_blocks(patch_size=4, n_targets=2, target_scale=(0.1, 0.2), context_scale=(0.85, 1.0))


class TestJigsaw(TaskContract):
    def make_task(self, backbone):
        return JigsawTask(backbone, grid=2, n_permutations=10, tile_dim=16, hidden_dim=32)


class TestQueryBox(TaskContract):
    def make_task(self, backbone):
        return QueryBoxTask(backbone, queries_per_box=2, max_boxes=4, decoder_dim=32, decoder_heads=2)

    def make_views(self, spatial_dims):
        return query_boxes(spatial_dims, query_size=8, n_boxes=3, min_size=4)


class TestQueryBoxEMA(TestQueryBox):
    def make_task(self, backbone):
        return QueryBoxTask(backbone, queries_per_box=2, max_boxes=4, decoder_dim=32, decoder_heads=2, crop_encoder="ema")


class TestRawBrainFuse(TaskContract):
    """Fused scans feed Barlow Twins (two views each), the classifier (soft labels) and the
    consistency term, so every partner's parameters must get a gradient through the fusion task."""

    def make_task(self, backbone):
        return RawBrainFuseTask(backbone, n_patients=2, views=two_views(backbone.spatial_dims, SIZE),
                                barlow=BarlowTwinsTask(backbone, hidden_dim=32, out_dim=32),
                                classify=ClassificationTask(backbone, 3), consistency_weight=1.0)

    def _setup(self, spatial_dims, encoder="vit"):
        task, batch = super()._setup(spatial_dims, encoder)
        batch["patient"] = ["a", "b", "c", "d"]
        batch["label"] = torch.tensor([0, 1, 2, 1])
        return task, batch

    def check_contexts(self, seen):
        """Fused scans carry their first source's context; the sources carry their own."""
        assert all(set(c["modality"]) <= {"CT", "MR", "XR"} for c in seen)
        assert any(c["modality"] == ["CT", "MR", "CT", "XR"] for c in seen)  # the sources, encoded in batch order


class TestBrainFuse(TestRawBrainFuse):
    needs_grid = True  # the generator decodes the token grid

    def make_task(self, backbone):
        return BrainFuseTask(backbone, n_patients=3, views=two_views(backbone.spatial_dims, SIZE),
                             barlow=BarlowTwinsTask(backbone, hidden_dim=32, out_dim=32),
                             classify=ClassificationTask(backbone, 3), consistency_weight=1.0, generator_dim=32,
                             min_generator_quality=-1.0)  # past the generator gate: every use of a fused scan runs
