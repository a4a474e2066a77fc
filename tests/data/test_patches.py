"""Foreground-weighted patches and slices: shapes, where they land, determinism, no cache mutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.patches import ForegroundGrid, RandForegroundPatches, RandForegroundPatchesd, SliceAxisLastd


def _corner_blob(spatial_dims: int) -> torch.Tensor:
    img = torch.zeros(1, *([64] * spatial_dims))
    img[(slice(None),) + (slice(0, 12),) * spatial_dims] = 1.0  # foreground only in one corner
    return img


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grid_is_foreground_fraction(spatial_dims):
    grid = ForegroundGrid(threshold=0.5, cell=8)(_corner_blob(spatial_dims))
    assert grid.shape == (8,) * spatial_dims
    assert grid[(0,) * spatial_dims] == 1.0 and grid[(1,) * spatial_dims] == pytest.approx(0.5**spatial_dims)
    assert grid.sum() == pytest.approx(12**spatial_dims / 8**spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patches_land_on_foreground(spatial_dims):
    img = _corner_blob(spatial_dims)
    grid = ForegroundGrid(threshold=0.5, cell=8)(img)
    sampler = RandForegroundPatches(patch_size=16, num_samples=50, fg_prob=1.0, cell=8)
    sampler.set_random_state(0)
    patches = sampler(img, grid)
    assert len(patches) == 50 and all(p.shape == (1,) + (16,) * spatial_dims for p in patches)
    assert all(p.sum() > 0 for p in patches)  # every centre on foreground -> every patch holds some
    uniform = RandForegroundPatches(patch_size=16, num_samples=200, fg_prob=0.0).set_random_state(0)
    assert np.mean([p.sum() > 0 for p in uniform(img, grid)]) < 0.5  # without the map most would be air


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patches_are_deterministic_copies(spatial_dims):
    img = torch.rand(1, *([20] * spatial_dims))
    before = img.clone()
    a = RandForegroundPatchesd(patch_size=8, num_samples=3).set_random_state(7)({"image": img, "fg_grid": None})
    b = RandForegroundPatchesd(patch_size=8, num_samples=3).set_random_state(7)({"image": img, "fg_grid": None})
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert all("fg_grid" not in x for x in a)
    a[0]["image"].zero_()
    assert torch.equal(img, before)  # the cached volume is never written through a patch


def test_full_extent_and_too_large_patches():
    img = torch.rand(1, 10, 12, 7)
    s = RandForegroundPatches(patch_size=(-1, -1, 1), num_samples=2).set_random_state(0)
    assert [p.shape for p in s(img)] == [(1, 10, 12, 1)] * 2
    with pytest.raises(ValueError, match="larger than the image"):
        RandForegroundPatches(patch_size=16)(img)


def test_slice_axis_last_picks_the_coarse_axis():
    from monai.data import MetaTensor

    img = MetaTensor(torch.rand(1, 30, 4, 30), affine=torch.diag(torch.tensor([1.0, 5.0, 1.0, 1.0])))
    out = SliceAxisLastd(keys="image")({"image": img})["image"]
    assert out.shape == (1, 30, 30, 4)
