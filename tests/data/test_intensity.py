"""Intensity presets: exact values at the window edges, channels, dispatch by modality."""

from __future__ import annotations

import pytest
import torch

from medssl.data.intensity import CT_WINDOWS, HUWindow, HUWindowd, ModalityIntensity, ToChannels, preset_for


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hu_window_maps_edges_to_0_half_1(spatial_dims):
    level, width = CT_WINDOWS["abdomen"]
    values = torch.tensor([-1000.0, level - width / 2, level, level + width / 2, 3000.0])
    img = values.reshape(1, 5, *([1] * (spatial_dims - 1)))
    out = HUWindow("abdomen")(img).flatten()
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_several_windows_stack_as_channels():
    img = torch.tensor([[[40.0, -600.0]]])  # (1, 1, 2)
    out = HUWindowd(keys="image", windows=["brain", "lung", (40, 80)])({"image": img})["image"]
    assert out.shape == (3, 1, 2)
    assert torch.allclose(out[0], torch.tensor([[0.5, 0.0]])) and torch.allclose(out[1, 0, 1], torch.tensor(0.5))
    assert torch.equal(out[0], out[2])


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match="unknown CT window 'abdomn'"):
        HUWindow("abdomn")
    with pytest.raises(ValueError, match="width must be positive"):
        HUWindow((40, 0))


def test_modality_dispatch():
    assert [preset_for(m) for m in ("CT", "MR", "PT", "CR", "FUNDUS", "OT")] == ["ct", "mr", "mr", "minmax", "minmax", "minmax"]
    img = torch.linspace(-1000, 1000, 1001).reshape(1, 1001, 1)
    t = ModalityIntensity(ct_windows="bone")
    assert torch.allclose(t(img, "CT"), ((img + 500) / 1800).clamp(0, 1))  # bone: level 400, width 1800
    mr = t(img, "MR")
    assert mr.min() == 0 and mr.max() == 1 and (mr == 1).sum() >= 5  # top 0.5 % clipped
    assert torch.allclose(t(img, "XR"), (img + 1000) / 2000)
    assert torch.equal(t(img, "CT", preset="none"), img)
    with pytest.raises(ValueError, match="unknown intensity preset"):
        t(img, "CT", preset="hdr")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_to_channels(spatial_dims):
    grey = torch.rand(1, *([4] * spatial_dims))
    rgb = ToChannels(3)(grey)
    assert rgb.shape[0] == 3 and torch.equal(rgb[2], grey[0])
    assert torch.allclose(ToChannels(1)(rgb), grey)
    with pytest.raises(ValueError, match="2 channels into 3"):
        ToChannels(3)(torch.rand(2, *([4] * spatial_dims)))
