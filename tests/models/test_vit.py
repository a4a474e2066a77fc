"""The ViT backbone: shapes, gradients, any input size, masked forward exactness, windows, export to MONAI."""

from __future__ import annotations

import pytest
import torch

from medssl.models import ViT, WindowLayout, pool_tokens, sincos_position_embedding, to_monai_vit
from medssl.tasks.masking import sample_mask
from medssl.tasks.patchify import patchify


def _vit(spatial_dims, **kw):
    torch.manual_seed(0)
    return ViT(spatial_dims, in_channels=1, patch_size=4, size="micro", **kw).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("window_size", [None, 2])
@pytest.mark.parametrize("cls_token", [True, False])
def test_shapes_and_every_parameter_gets_a_finite_gradient(spatial_dims, window_size, cls_token):
    model = _vit(spatial_dims, window_size=window_size, global_every=2, cls_token=cls_token).train()
    x = torch.randn(2, 1, *[16] * spatial_dims)
    out = model(x)
    assert out.shape == (2, 4**spatial_dims + int(cls_token), 48)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_model_takes_several_input_sizes(spatial_dims):
    model = _vit(spatial_dims, window_size=2)
    for size in (8, 16, 20):  # 20 -> a 5-token grid: windows overhang and are padded
        assert model(torch.randn(1, 1, *[size] * spatial_dims)).shape[1] == 1 + (size // 4) ** spatial_dims


def test_input_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _vit(2)(torch.randn(1, 1, 18, 16))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("window_size", [None, 2])
def test_masked_forward_with_every_token_equals_full_forward(spatial_dims, window_size):
    model = _vit(spatial_dims, window_size=window_size, global_every=2)
    x = torch.randn(2, 1, *[16] * spatial_dims)
    n = 4**spatial_dims
    layout = model.layout((4,) * spatial_dims)
    keep = (torch.arange(n) if layout is None else layout.order).expand(2, -1)
    full = model(x)
    part = model(x, keep)
    torch.testing.assert_close(part[:, 1:], full[:, 1:][:, keep[0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("window_size", [None, 2])
def test_padding_slots_change_nothing(spatial_dims, window_size):
    """A batch padded with -1 slots gives every real token the output it has without the padding."""
    model = _vit(spatial_dims, window_size=window_size, global_every=2)
    x = torch.rand(2, 1, *[16] * spatial_dims)
    x[1, :, :8] = 0  # half of image 1 is background
    layout = model.layout((4,) * spatial_dims)
    fg = patchify(x, model.patch_size).amax(-1) > 0
    torch.manual_seed(1)
    mask = sample_mask(fg, 0.5, layout)
    assert (mask.keep[1] < 0).any()  # image 1 really is padded
    batched = model(x, mask.keep)
    alone = model(x[:1], mask.keep[:1])
    valid = mask.keep[0] >= 0
    torch.testing.assert_close(batched[0, 1:][valid], alone[0, 1:][valid], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()
    assert (batched[1, 1:][mask.keep[1] < 0] == 0).all()


def test_keep_that_ignores_windows_is_refused():
    model = _vit(2, window_size=2)
    keep = torch.arange(16).flip(0).expand(1, -1)  # raster order reversed: not grouped by window
    with pytest.raises(ValueError, match="window"):
        model(torch.randn(1, 1, 16, 16), keep)


def test_windowed_and_global_blocks_follow_vitdet():
    model = ViT(2, patch_size=4, size="micro", depth=6, window_size=2, global_every=3)
    assert model.global_blocks == (False, False, True, False, False, True)
    assert all(ViT(2, patch_size=4, size="micro", window_size=None).global_blocks)
    assert ViT(2, patch_size=4, size="micro", depth=4, window_size=2, global_every=3).global_blocks[-1]  # last is global


def test_window_layout_order_is_a_permutation_with_padding():
    layout = WindowLayout((5, 4), (2, 2))
    assert layout.n_windows == 6 and layout.tokens_per_window == 4 and layout.padded
    real = layout.order[layout.order >= 0]
    assert sorted(real.tolist()) == list(range(20))
    assert (layout.order[layout.slot_of] == torch.arange(20)).all()
    assert layout.order[:4].tolist() == [0, 1, 4, 5]  # first window: rows 0-1, columns 0-1


def test_position_embeddings_are_log_spaced_sinusoids():
    emb = sincos_position_embedding((3, 4, 5), 50)
    assert emb.shape == (60, 50)
    assert (emb[:, 48:] == 0).all()  # 50 is not a multiple of 6: the last channels stay zero
    assert torch.allclose(emb[0, :8], torch.tensor([0.0] * 8))  # sin(0) of axis 0
    # axis-0 channels: frequencies 1 / 10000 ** (i / 8), so position 1 gives sin(omega_i)
    omega = 1 / 10000 ** (torch.arange(8) / 8)
    assert torch.allclose(emb[20, :8], omega.sin(), atol=1e-6)
    assert len({tuple(r.tolist()) for r in emb}) == 60  # every token distinct


@pytest.mark.parametrize("mode,size", [("cls", 48), ("mean", 48), ("flatten", 16 * 48)])
def test_pooling(mode, size):
    tokens = torch.randn(2, 17, 48)
    pooled = pool_tokens(tokens, mode, 1)
    assert pooled.shape == (2, size)
    if mode == "mean":
        assert torch.allclose(pooled, tokens[:, 1:].mean(1))
    with pytest.raises(ValueError):
        pool_tokens(tokens, "max", 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pixel_standardisation_equals_standardising_the_input(spatial_dims):
    plain, standardising = _vit(spatial_dims), _vit(spatial_dims, pixel_mean=0.5, pixel_std=0.25)
    assert standardising.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    standardising.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, *[16] * spatial_dims)
    torch.testing.assert_close(standardising(x), plain((x - 0.5) / 0.25))
    assert not torch.allclose(standardising(x), plain(x), atol=1e-3)


def test_pixel_statistics_per_channel_and_bad_ones_refused():
    model = ViT(2, in_channels=3, patch_size=4, size="micro", pixel_mean=(0.1, 0.2, 0.3), pixel_std=0.5)
    assert model.pixel_mean == (0.1, 0.2, 0.3) and model.pixel_std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="pixel_std must be positive"):
        ViT(2, patch_size=4, size="micro", pixel_std=0.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("pixels", [dict(), dict(pixel_mean=0.5, pixel_std=0.25)])
def test_export_to_monai_vit_gives_the_same_outputs(spatial_dims, pixels):
    pytest.importorskip("einops")  # MONAI's ViT needs it
    model = _vit(spatial_dims, **pixels)
    x = torch.randn(2, 1, *[16] * spatial_dims)
    monai_vit = to_monai_vit(model, 16).eval()
    _, hidden = monai_vit(x)
    torch.testing.assert_close(monai_vit.norm(hidden[-1]), model(x), atol=1e-5, rtol=1e-5)


def test_windowed_encoder_does_not_export():
    with pytest.raises(ValueError, match="global-attention"):
        to_monai_vit(_vit(2, window_size=2), 16)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("window_size", [None, 2])
def test_a_monai_metatensor_input_gives_the_plain_tensor_outputs(spatial_dims, window_size):
    from monai.data import MetaTensor

    model = _vit(spatial_dims, window_size=window_size)
    x = torch.rand(2, 1, *[16] * spatial_dims)
    torch.testing.assert_close(torch.as_tensor(model(MetaTensor(x))), model(x))
