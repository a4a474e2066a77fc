"""Attention maps: raster order restored from window-major order, range, overlays, pictures."""

from __future__ import annotations

import pytest
import torch

from medssl.models import ViT
from medssl.data.tiling import most_foreground_block
from medssl.viz.attention import attention_maps, overlay, write_attention_pictures


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls_token", [True, False])
def test_windowed_and_global_models_give_the_same_map(spatial_dims, cls_token):
    # with one block (always global) a windowed model computes what the global one does, only with
    # its tokens in window-major order (and padded: 6 tokens per axis in windows of 4)
    torch.manual_seed(0)
    glob = ViT(spatial_dims, 1, patch_size=2, embed_dim=16, depth=1, num_heads=2, cls_token=cls_token)
    win = ViT(spatial_dims, 1, patch_size=2, embed_dim=16, depth=1, num_heads=2, window_size=4, cls_token=cls_token)
    win.load_state_dict(glob.state_dict())
    x = torch.rand(2, 1, *[12] * spatial_dims)
    a, b = attention_maps(glob, x, per_head=True), attention_maps(win, x, per_head=True)
    assert a.shape == (2, 2, *[12] * spatial_dims)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    mean = attention_maps(win, x)
    assert mean.shape == (2, 1, *[12] * spatial_dims) and mean.min() == 0 and mean.max() == 1
    assert len(torch.unique(mean[0, 0][(slice(0, 2),) * spatial_dims])) == 1  # one value per 2-pixel patch (nearest)


def test_overlay_is_rgb_and_keeps_unattended_anatomy():
    img = torch.rand(1, 1, 8, 8)
    maps = torch.zeros(1, 1, 8, 8)
    maps[..., :4, :] = 1
    rgb = overlay(img, maps)
    assert rgb.shape == (1, 3, 8, 8)
    assert torch.allclose(rgb[0, :, 4:], img[0, 0, 4:].expand(3, -1, -1))  # no attention: the grey image
    assert not torch.allclose(rgb[0, 0, :4], rgb[0, 2, :4])  # attended: coloured


def test_pictures_pick_the_most_foreground_block(tmp_path):
    vol = torch.zeros(1, 40, 20, 20)
    vol[:, 24:36, 4:16, 4:16] = 1
    block = most_foreground_block(vol, 16)
    assert block.shape == (1, 16, 16, 16) and block.sum() == 12 * 12 * 12 * (8 / 12)  # x-block 16:32 holds 8 of 12 slices
    small = most_foreground_block(torch.ones(1, 10, 12, 16), 16)
    assert small.shape == (1, 16, 16, 16) and small.sum() == 10 * 12 * 16
    vit = ViT(3, 1, patch_size=4, size="micro", window_size=2)
    files = write_attention_pictures(vit, [vol, vol[:, :16]], tmp_path, size=16, per_page=1)
    assert [f.name for f in files] == ["attention_000.png", "attention_001.png"] and all(f.stat().st_size > 1000 for f in files)
