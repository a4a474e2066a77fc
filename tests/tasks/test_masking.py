"""Token masks: exact ratio, same count per window, background never shown or predicted."""

from __future__ import annotations

import pytest
import torch

from medssl.models import WindowLayout
from medssl.tasks import patch_foreground, patchify, sample_mask, unpatchify


def _sets(mask, b):
    keep = set(mask.keep[b][mask.keep[b] >= 0].tolist())
    target = set(mask.target[b][mask.target[b] >= 0].tolist())
    return keep, target


@pytest.mark.parametrize("grid,window", [((8, 8), None), ((8, 8), (4, 4)), ((4, 4, 4), (2, 2, 2)), ((5, 6), (2, 4))])
def test_without_background_every_window_shows_the_same_share(grid, window):
    n = torch.Size(grid).numel()
    layout = WindowLayout(grid, window) if window else None
    torch.manual_seed(0)
    mask = sample_mask(torch.ones(3, n, dtype=torch.bool), 0.75, layout)
    for b in range(3):
        keep, target = _sets(mask, b)
        assert not keep & target and keep | target == set(range(n))
    if layout is None:
        assert mask.keep.shape == (3, int(n * 0.25)) and (mask.keep >= 0).all()
    else:
        expected = torch.arange(layout.n_windows)[None, :, None]
        for slots in (mask.target, mask.keep):  # both grouped window by window (the decoder windows too)
            per_window = layout.window_of[slots.clamp(min=0)].view(3, layout.n_windows, -1)
            valid = (slots >= 0).view(3, layout.n_windows, -1)
            assert ((per_window == expected) | ~valid).all()
        if not layout.padded:  # full windows: exactly floor(T / 4) visible in each
            assert valid.sum(-1).eq(layout.tokens_per_window // 4).all()


@pytest.mark.parametrize("window", [None, (2, 2)])
def test_background_is_never_kept_nor_predicted(window):
    torch.manual_seed(0)
    fg = torch.rand(4, 36) > 0.4
    fg[3] = False  # an image of pure background
    mask = sample_mask(fg, 0.6, WindowLayout((6, 6), window) if window else None)
    for b in range(4):
        keep, target = _sets(mask, b)
        fg_b = set(torch.nonzero(fg[b]).flatten().tolist())
        assert keep | target == fg_b and not keep & target
    assert (mask.keep[3] < 0).all() and (mask.target[3] < 0).all()


def test_masks_differ_between_draws_and_repeat_with_a_generator():
    fg = torch.ones(1, 64, dtype=torch.bool)
    a = sample_mask(fg, 0.75, generator=torch.Generator().manual_seed(1)).keep
    b = sample_mask(fg, 0.75, generator=torch.Generator().manual_seed(1)).keep
    c = sample_mask(fg, 0.75, generator=torch.Generator().manual_seed(2)).keep
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="ratio"):
        sample_mask(torch.ones(1, 4, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patchify_round_trip_and_foreground(spatial_dims):
    img = torch.rand(2, 3, *[8] * spatial_dims)
    img[0, :, :4] = 0
    patches = patchify(img, (4,) * spatial_dims)
    assert patches.shape == (2, 2**spatial_dims, 3 * 4**spatial_dims)
    assert torch.equal(unpatchify(patches, (4,) * spatial_dims, (2,) * spatial_dims, 3), img)
    fg = patch_foreground(patches, 0.0)
    assert fg[1].all() and fg[0].sum() == 2 ** (spatial_dims - 1)
