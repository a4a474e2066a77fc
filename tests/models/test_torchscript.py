"""TorchScript: ``torch.jit.script`` compiles the encoders (what MONAI's ``ckpt_export`` does by
default), and the scripted model gives the eager outputs at any input size, masked or not, after
a save and load. Until issue #20 the ViT did not script (Python-side caches, a Python window-layout
class) and a traced export ran at its traced size only."""

from __future__ import annotations

import warnings

import pytest
import torch

from medssl.models import Medformer, MedformerFeatureMap, ViT, ViTFeatureMap, sincos_position_embedding
from medssl.models.windows import WindowLayout, window_indices
from medssl.tasks.masking import sample_mask
from medssl.tasks.patchify import patchify


def _script(model: torch.nn.Module, tmp_path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in favour of torch.export
        scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(tmp_path / "model.ts"))
    return torch.jit.load(str(tmp_path / "model.ts"))  # what a user of the exported file gets


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kw", [dict(window_size=None), dict(window_size=2, global_every=2),
                                dict(window_size=3, global_every=2, cls_token=False, pixel_mean=0.5, pixel_std=0.25)],
                         ids=["global", "windows", "windows-nocls-standardised"])
@pytest.mark.parametrize("feature_map", [False, True], ids=["tokens", "feature-map"])
def test_a_scripted_vit_gives_the_eager_outputs_at_any_size(spatial_dims, kw, feature_map, tmp_path):
    torch.manual_seed(0)
    model = (ViTFeatureMap if feature_map else ViT)(spatial_dims, 1, patch_size=4, size="micro", depth=3, **kw).eval()
    scripted = _script(model, tmp_path)
    for size in (8, 20, 24):  # 20: a 5-token grid, so windows of 2 and 3 overhang it and are padded
        x = torch.randn(2, 1, *[size] * spatial_dims)
        got, want = scripted(x), model(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="multiple of patch_size"):
        scripted(torch.randn(1, 1, *[18] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_scripted_vit_runs_masked_forwards_with_padding_slots(spatial_dims, tmp_path):
    torch.manual_seed(0)
    model = ViT(spatial_dims, 1, patch_size=4, size="micro", window_size=2, global_every=2).eval()
    scripted = _script(model, tmp_path)
    x = torch.rand(2, 1, *[16] * spatial_dims)
    x[1, :, :8] = 0  # half of image 1 is background: its windows get padding slots
    mask = sample_mask(patchify(x, model.patch_size).amax(-1) > 0, 0.5, model.layout((4,) * spatial_dims))
    assert (mask.keep < 0).any()
    torch.testing.assert_close(scripted(x, mask.keep), model(x, mask.keep), atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="grouped window by window"):
        scripted(x, torch.arange(4**spatial_dims).flip(0).expand(2, -1))


@pytest.mark.parametrize("kw", [dict(), dict(collections={}), dict(default_context={"organ": "chest", "modality": "DX"})],
                         ids=["collections", "shared-only", "default-context"])
def test_a_scripted_medformer_feature_map_gives_the_eager_outputs_in_2d_and_3d(kw, tmp_path):
    torch.manual_seed(0)
    model = MedformerFeatureMap(patch_size={2: 4, 3: 2}, embed_dim=48, num_heads=2, num_latents=8, depth=2, **kw).eval()
    scripted = _script(model, tmp_path)
    for shape in [(8, 8), (12, 20), (4, 6, 8)]:
        x = torch.randn(2, 1, *shape)
        torch.testing.assert_close(scripted(x), model(x), atol=1e-6, rtol=1e-6)


def test_a_scripted_medformer_takes_the_latents_of_its_weights_at_export_time(tmp_path):
    torch.manual_seed(0)
    model = Medformer(embed_dim=48, num_heads=2, num_latents=8, depth=1, default_context={"organ": "knee"}).eval()
    with torch.no_grad():
        model.entries["organ"][model.collections["organ"].index("knee")].add_(1.0)  # weights loaded before the export
    scripted = _script(model, tmp_path)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(scripted(x), model(x), atol=1e-6, rtol=1e-6)
    assert (scripted(x) - Medformer(embed_dim=48, num_heads=2, num_latents=8, depth=1)(x)).abs().max() > 1e-3


@pytest.mark.parametrize("grid, window", [((5, 4), (2, 2)), ((7,), (3,)), ((3, 5, 6), (2, 2, 4)), ((4, 4), (8, 8))])
def test_the_scripted_window_layout_and_positions_are_the_eager_ones(grid, window):
    layout = WindowLayout(grid, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        order, window_of, slot_of, n_windows = torch.jit.script(window_indices)(list(grid), list(window))
        pos = torch.jit.script(sincos_position_embedding)(list(grid), 24, 10000.0, None, torch.float32)
    assert n_windows == layout.n_windows
    assert torch.equal(order, layout.order) and torch.equal(window_of, layout.window_of) and torch.equal(slot_of, layout.slot_of)
    assert torch.equal(layout.order[layout.slot_of], torch.arange(len(layout.slot_of)))  # slot_of inverts order
    torch.testing.assert_close(pos, sincos_position_embedding(grid, 24), atol=0, rtol=0)
