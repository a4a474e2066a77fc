"""I-JEPA: block masks (disjoint, within their ranges, 2D and 3D), window-grouped context slots, the loss by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.data.block_masks import RandBlockMasksd, block_edges, jepa_blocks
from medssl.models import ViT
from medssl.tasks import IJEPATask
from medssl.tasks.ijepa import jepa_loss, normalise_targets
from medssl.tasks.masking import mask_to_keep


def _boxes(mask: np.ndarray, grid) -> tuple[int, ...]:
    """Edges of the bounding box of a block mask, checking it is a full box."""
    m = mask.reshape(grid)
    idx = np.argwhere(m)
    edges = tuple(int(e) for e in idx.max(0) - idx.min(0) + 1)
    assert m.sum() == math.prod(edges), "a block is a full box"
    return edges


@pytest.mark.parametrize("grid", [(14, 14), (8, 8, 8), (10, 6)])
def test_blocks_are_disjoint_from_the_context_and_within_their_ranges(grid):
    masker = jepa_blocks(patch_size=1)
    masker.set_random_state(seed=0)
    n = math.prod(grid)
    for _ in range(20):
        context, targets = masker.masks(grid)
        assert context.shape == (n,) and targets.shape == (4, n)
        assert not (context & targets.any(0)).any()  # the context never shows a target token
        assert context.sum() >= 0.1 * n
        for t in targets:
            edges = _boxes(t, grid)
            assert 0.15 * n * 0.5 <= t.sum() <= 0.2 * n * 1.6  # scale, up to rounding of the edges on a small grid
            ratios = [e / edges[-1] for e in edges[:-1]]
            assert all(0.75 / 1.7 <= r <= 1.5 * 1.7 for r in ratios)  # aspect, up to rounding


def test_block_edges_follow_scale_and_aspect():
    assert block_edges((100, 100), 0.16, [1.0]) == (40, 40)
    assert block_edges((100, 100), 0.18, [2.0]) == (60, 30)
    assert block_edges((20, 20, 20), 0.125, [1.0, 1.0]) == (10, 10, 10)
    assert block_edges((4, 4), 1.0, [1.0]) == (3, 3)  # smaller than the grid, so a block can move


def test_impossible_masks_say_what_to_change():
    masker = RandBlockMasksd(patch_size=1, n_targets=8, target_scale=(0.5, 0.5), min_context=0.5)
    masker.set_random_state(seed=0)
    with pytest.raises(ValueError, match="use fewer or smaller target blocks"):
        masker.masks((4, 4))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_context_slots_are_grouped_by_window_and_the_windowed_vit_takes_them(spatial_dims):
    torch.manual_seed(0)
    vit = ViT(spatial_dims, 1, patch_size=4, size="micro", window_size=2, global_every=2)
    grid = (4,) * spatial_dims  # 2^d windows of 2^d tokens
    layout = vit.layout(grid, "cpu")
    mask = torch.rand(3, 4 ** spatial_dims) > 0.4
    keep = mask_to_keep(mask, layout)
    for b in range(3):
        assert sorted(k for k in keep[b].tolist() if k >= 0) == mask[b].nonzero().squeeze(1).tolist()
    tokens = vit(torch.rand(3, 1, *[16] * spatial_dims), keep=keep)  # refuses slots not grouped by window
    assert tokens.shape[1] == 1 + keep.shape[1]
    assert mask_to_keep(mask).tolist()[0][: int(mask[0].sum())] == mask[0].nonzero().squeeze(1).tolist()  # no windows: raster


def test_jepa_loss_by_hand():
    pred = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    target = torch.tensor([[[0.0, 1.0], [5.0, 5.0]]])
    valid = torch.tensor([[1.0, 0.0]])  # the second slot is padding
    assert jepa_loss(pred, target, valid, "mse").item() == pytest.approx(2.5)  # (1^2 + 2^2) / 2 features, one slot
    # smooth L1 (beta 1): 0.5 * 1^2 for |1| <= 1, |2| - 0.5 beyond; the reference's default
    assert jepa_loss(pred, target, valid).item() == pytest.approx((0.5 + 1.5) / 2)
    with pytest.raises(ValueError, match="smooth_l1, mse"):
        jepa_loss(pred, target, valid, "l2")


def test_ijepa_trains_the_context_encoder_and_the_predictor_not_the_target():
    torch.manual_seed(0)
    vit = ViT(2, 1, patch_size=4, size="micro", window_size=2, global_every=2)
    task = IJEPATask(vit, predictor_dim=16, predictor_depth=1)
    masker = jepa_blocks(patch_size=4, n_targets=2, target_scale=(0.1, 0.2))
    masker.set_random_state(seed=1)
    items = [masker({"image": torch.rand(1, 16, 16)}) for _ in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    task.train()
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 < out["context_share"] < 1
    assert all(p.grad is None for p in task.target.parameters())
    assert vit.patch_embed.weight.grad is not None and task.predictor.mask_token.grad is not None
    with pytest.raises(TypeError, match="not a GridEncoder"):
        IJEPATask(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ijepa_spread_terms_join_the_loss_and_reach_the_encoder(spatial_dims):
    torch.manual_seed(0)
    vit = ViT(spatial_dims, 1, patch_size=4, size="micro")
    masker = jepa_blocks(patch_size=4, n_targets=2, target_scale=(0.1, 0.2))
    masker.set_random_state(seed=1)
    items = [masker({"image": torch.rand(1, *[16] * spatial_dims)}) for _ in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    plain = IJEPATask(vit, predictor_dim=16, predictor_depth=1)
    spread = IJEPATask(vit, predictor_dim=16, predictor_depth=1, variance_weight=2.0, covariance_weight=0.5)
    spread.predictor.load_state_dict(plain.predictor.state_dict())
    assert "variance" not in plain(batch)
    out = spread(batch)
    expected = out["prediction_loss"] + 2.0 * out["variance"] + 0.5 * out["covariance"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["prediction_loss"].item() == pytest.approx(plain(batch)["loss"].item(), rel=1e-5)
    assert out["variance"] > 0.5  # a fresh micro ViT's images are all alike
    out["loss"].backward()
    assert vit.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must be >= 0"):
        IJEPATask(vit, variance_weight=-1.0)
    with pytest.raises(ValueError, match="smooth_l1, mse"):
        IJEPATask(vit, loss="l1")


def test_instance_target_norm_removes_what_all_tokens_share():
    torch.manual_seed(0)
    shared = 5 * torch.randn(1, 1, 32)  # one direction every token carries, as in a fresh ViT
    h = shared + 0.3 * torch.randn(2, 20, 32)

    def mean_cosine(t):
        t = torch.nn.functional.normalize(t.reshape(-1, 32), dim=-1)
        c = t @ t.T
        return c[~torch.eye(len(c), dtype=torch.bool)].mean().item()

    layer, instance = normalise_targets(h, "layer"), normalise_targets(h, "instance")
    assert mean_cosine(layer) > 0.9 and abs(mean_cosine(instance)) < 0.1
    assert layer.mean(-1).abs().max() < 1e-5 and instance.mean(-1).abs().max() < 1e-5  # both end layer-normed
    with pytest.raises(ValueError, match="layer, instance, batch"):
        normalise_targets(h, "group")


def test_batch_target_norm_removes_what_the_position_alone_predicts():
    torch.manual_seed(0)
    by_position = 5 * torch.randn(1, 20, 32)  # what every image has at each position (sincos embeddings)
    h = by_position + 0.3 * torch.randn(16, 20, 32)
    instance, batch = normalise_targets(h, "instance"), normalise_targets(h, "batch")

    def position_share(t):  # share of the targets' variance in the per-position mean over images
        return (t.mean(0).var(0).sum() / t.var(dim=(0, 1)).sum()).item()

    assert position_share(instance) > 0.9 and position_share(batch) < 0.1
    with pytest.raises(ValueError, match="at least 2 images"):
        normalise_targets(h[:1], "batch")
