"""Augmented views: shapes in 2D and 3D, reproducible from a seed, window jitter that re-windows."""

from __future__ import annotations

import pytest
import torch

from medssl.data.views import MultiViewd, RandWindowJitter, multi_crop, two_views, view_augmentation


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multi_crop_shapes_and_reproducibility(spatial_dims):
    views = multi_crop(spatial_dims, 16, 8, n_local=3)
    img = torch.rand(1, *[24] * spatial_dims)
    views.set_random_state(seed=5)
    a = views({"image": img, "patient": "p"})
    assert a["views"].shape == (2, 1, *[16] * spatial_dims) and a["local_views"].shape == (3, 1, *[8] * spatial_dims)
    assert a["patient"] == "p" and torch.equal(a["image"], img)
    assert not torch.equal(a["views"][0], a["views"][1])  # two different draws
    views.set_random_state(seed=5)
    assert torch.equal(views({"image": img})["views"], a["views"])
    views.set_random_state(seed=6)
    assert not torch.equal(views({"image": img})["views"], a["views"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_crop_scale_is_an_area_or_volume_share(spatial_dims):
    # a crop of at most 1/8 of the area/volume out of an image that is one ramp: the view spans a narrow range
    ramp = torch.linspace(0, 1, 32).view(1, 32, *[1] * (spatial_dims - 1)).expand(1, *[32] * spatial_dims).contiguous()
    chain = view_augmentation(spatial_dims, 16, scale=(0.05, 0.125), flip_axes=(), rotate_degrees=0, intensity=0, gamma=None,
                              noise_std=0, blur=None)
    chain.set_random_state(seed=0)
    for _ in range(5):
        v = chain(ramp)
        assert v.shape == (1, *[16] * spatial_dims)
        edge = 0.125 ** (1 / spatial_dims) * 32
        assert float(v.max() - v.min()) <= edge / 31 + 1e-3


def test_no_colour_jitter_keeps_channels_aligned():
    grey3 = torch.rand(1, 20, 20).expand(3, 20, 20).contiguous()  # an RGB image whose channels are equal
    views = two_views(2, 16, modality="OP")
    views.set_random_state(seed=1)
    v = views({"image": grey3})["views"]
    assert torch.allclose(v[:, 0], v[:, 1]) and torch.allclose(v[:, 0], v[:, 2])


def test_window_jitter_rewindows():
    x = torch.linspace(0, 1, 11)
    jitter = RandWindowJitter(level=0.1, width=(0.5, 0.5), prob=1.0)
    jitter.set_random_state(seed=0)
    y = jitter(x)
    shift = jitter._shift
    assert torch.allclose(y, ((x - 0.5 - shift) / 0.5 + 0.5).clamp(0, 1))
    assert y.min() == 0 and y.max() == 1  # a narrower window saturates both ends


def test_ct_views_jitter_the_window_and_others_do_not():
    ct = view_augmentation(2, 16, window_jitter=True)
    xr = view_augmentation(2, 16)
    assert any(isinstance(t, RandWindowJitter) for t in ct.transforms)
    assert not any(isinstance(t, RandWindowJitter) for t in xr.transforms)
    assert any(isinstance(t, RandWindowJitter) for t in multi_crop(2, 16, 8, modality="CT").global_view.transforms)
    assert not any(isinstance(t, RandWindowJitter) for t in two_views(2, 16, modality="DX").global_view.transforms)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_auto_views_jitter_the_hu_window_of_ct_items_only(spatial_dims, monkeypatch):
    """modality="auto": each item gets its own modality's views (no view_modality setting needed)."""
    from medssl.data.views import ModalityViewsd

    calls = []
    real = RandWindowJitter.__call__
    monkeypatch.setattr(RandWindowJitter, "__call__", lambda self, img: calls.append(1) or real(self, img))
    for build in (lambda: multi_crop(spatial_dims, 16, 8, n_local=1), lambda: two_views(spatial_dims, 16)):
        views = build()
        assert isinstance(views, ModalityViewsd)
        views.set_random_state(seed=0)
        img = torch.rand(1, *[20] * spatial_dims)
        for modality, jittered in (("CT", True), ("ct", True), ("MR", False), ("DX", False), (None, False)):
            calls.clear()
            out = views({"image": img, "modality": modality})
            assert out["views"].shape[:2] == (2, 1)
            assert bool(calls) == jittered, modality
        views.set_random_state(seed=0)
        a = views({"image": img, "modality": "CT"})["views"]
        views.set_random_state(seed=0)
        assert torch.equal(views({"image": img, "modality": "CT"})["views"], a)  # reproducible from the seed
    assert isinstance(two_views(spatial_dims, 16, modality="CT"), MultiViewd)
