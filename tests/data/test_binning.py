"""Size binning: bin plans, the fit-into-bin transform, and the binned batch sampler over ranks and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.binning import FitToBin, entry_shape, fit_shape, plan_bins
from medssl.data.pipeline import build_transforms
from medssl.engine.determinism import BinnedBatchSampler
from medssl.errors import UserError


def _mixed_shapes(spatial_dims: int, n: int = 150, seed: int = 0) -> list[tuple[int, ...]]:
    """Chest-like (about square), extremity-like (1:2) and landscape detector frames, 600-3000 px."""
    rng = np.random.default_rng(seed)
    shapes = []
    for i in range(n):
        long = int(rng.integers(1500, 3000))
        aspect = [1.0, 0.5, 0.75][i % 3] * rng.uniform(0.9, 1.1)
        shape = (long, int(long * aspect)) if i % 3 != 2 else (int(long * aspect), long)
        shapes.append(shape if spatial_dims == 2 else shape + (int(long * 0.3),))
    return shapes


def _entries(shapes):
    return [{"image": f"img{i}.png", "shape": list(s)} for i, s in enumerate(shapes)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_smart_bins_keep_every_image_and_pad_less_than_a_square(spatial_dims):
    shapes = _mixed_shapes(spatial_dims)
    plan = plan_bins(_entries(shapes), "smart", n_bins=3, size=256, multiple=16, batch_size=8)
    assert len(plan.entries) == len(shapes) and plan.dropped == [] and len(plan.bin_shapes) == 3
    padded_square = padded_binned = 0.0
    for shape, entry in zip(shapes, plan.entries):
        b = tuple(entry["bin_shape"])
        assert b == tuple(plan.keys[plan.entries.index(entry)]) and all(v % 16 == 0 and v <= 256 for v in b)
        fitted = fit_shape(shape, b)
        assert all(f <= v for f, v in zip(fitted, b))  # fits its bin with its aspect kept
        assert np.allclose(np.asarray(fitted) / max(fitted), np.asarray(shape) / max(shape), atol=0.02)
        padded_binned += 1 - np.prod(fitted) / np.prod(b)
        square = fit_shape(shape, (256,) * spatial_dims)
        padded_square += 1 - np.prod(square) / 256 ** spatial_dims
    assert padded_binned * 2 <= padded_square  # the target: at least 2x fewer padding tokens
    assert plan_bins(_entries(shapes), "smart", n_bins=3, size=256, multiple=16, batch_size=8).keys == plan.keys  # deterministic


def test_smart_bins_too_small_for_a_batch_are_merged():
    shapes = [(1000, 1000)] * 40 + [(1000, 500)] * 3  # 3 tall images cannot fill a batch of 8 on their own
    plan = plan_bins(_entries(shapes), "smart", n_bins=4, size=128, multiple=16, batch_size=8)
    assert len(plan.entries) == 43 and min(plan.bin_shapes.values()) >= 8


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_strict_bins_are_native_shapes_and_report_what_they_leave_out(spatial_dims):
    shapes = [(400, 200, 100)[:spatial_dims]] * 10 + [(300, 300, 300)[:spatial_dims]] * 9 + [(512, 256, 64)[:spatial_dims]] * 2
    plan = plan_bins(_entries(shapes), "strict", size=64, multiple=8, batch_size=4)
    assert len(plan.entries) == 19 and plan.n_dropped == 2 and plan.dropped == [((512, 256, 64)[:spatial_dims], 2)]
    assert set(plan.bin_shapes) == {(64, 32, 16)[:spatial_dims], (64,) * spatial_dims}
    assert "2 image(s) of 1 size(s) with fewer images than a batch left out" in plan.report()
    with pytest.raises(UserError, match="no image size has 16 images"):
        plan_bins(_entries(shapes), "strict", size=64, multiple=8, batch_size=16)


def test_plans_need_shapes_and_a_known_mode():
    assert entry_shape({"image": np.zeros((1, 28, 28))}) == (28, 28)  # MedMNIST arrays carry their own
    with pytest.raises(UserError, match="img.png: the entry has no 'shape'"):
        plan_bins([{"image": "img.png"}], "smart")
    with pytest.raises(UserError, match="binning must be one of none, strict, smart"):
        plan_bins([{"image": "img.png", "shape": [9, 9]}], "clever")
    assert plan_bins([{"image": "a"}], "none").keys is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fit_to_bin_keeps_the_aspect_pads_and_never_enlarges_past_the_limit(spatial_dims):
    img = torch.ones((1, 40, 20, 10)[: spatial_dims + 1])
    out = FitToBin()(img, (32,) * spatial_dims)
    assert out.shape == (1,) + (32,) * spatial_dims
    inside = (out[0] > 0.5).nonzero()
    extent = (inside.max(0).values - inside.min(0).values + 1).tolist()
    assert extent == [32, 16, 8][:spatial_dims]  # scaled by 0.8 on every axis, then centred in zeros
    tiny = torch.ones((1, 8, 4, 4)[: spatial_dims + 1])
    out = FitToBin(max_upscale=2.0)(tiny, (64,) * spatial_dims)  # would need 8x to fill the bin: capped at 2x
    assert int((out[0] > 0.5).sum()) == int(np.prod([16, 8, 8][:spatial_dims]))


def test_the_pipeline_puts_each_image_in_its_bin_and_refuses_binning_for_volumes():
    rng = np.random.default_rng(0)
    shapes = [(60, 30), (30, 60), (50, 50)] * 4
    entries = [{"image": rng.random((1, *s), dtype=np.float32), "preset": "none"} for s in shapes]
    plan = plan_bins(entries, "strict", size=32, multiple=8, batch_size=2)
    t = build_transforms(spatial_dims=2, size=32, binning="strict")
    for e in plan.entries:
        assert tuple(t(e)["image"].shape[1:]) == tuple(e["bin_shape"])
    assert {tuple(e["bin_shape"]) for e in plan.entries} == {(32, 16), (16, 32), (32, 32)}
    with pytest.raises(UserError, match="binning 'smart' is for 2D images"):
        build_transforms(spatial_dims=3, size=32, binning="smart")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("mode", ["strict", "smart"])
def test_every_image_once_per_epoch_over_all_ranks(world, mode):
    shapes = _mixed_shapes(2, n=97) if mode == "smart" else [(100, 50)] * 30 + [(80, 80)] * 41 + [(50, 100)] * 26
    plan = plan_bins(_entries(shapes), mode, n_bins=3, size=64, multiple=8, batch_size=8, log=False)
    epochs = []
    for epoch in range(2):
        seen, steps = [], []
        for rank in range(world):
            sampler = BinnedBatchSampler(plan.keys, 8, seed=5, num_replicas=world, rank=rank)
            sampler.set_position(epoch)
            batches = list(sampler)
            steps.append(len(batches))
            assert len(batches) == len(sampler)
            for batch in batches:
                assert 1 <= len(batch) <= 8 and len({plan.keys[i] for _, _, i in batch}) == 1  # one bin per batch
                assert all(e == epoch for e, _, _ in batch)
                seen += [i for _, _, i in batch]
        assert sorted(seen) == list(range(len(plan.entries))) and len(set(steps)) == 1  # once each, equal steps per rank
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_binned_sampler_resumes_mid_epoch_and_positions_map_to_steps():
    keys = [(16, 16)] * 11 + [(16, 24)] * 10
    full = list(BinnedBatchSampler(keys, 4, seed=1))
    assert [len(b) for b in full] and max(len(b) for b in full) <= 4 and min(len(b) for b in full) >= 2
    for step, batch in enumerate(full):
        assert all(pos // 4 == step for _, pos, _ in batch)  # SeededDataset's iteration arithmetic holds
    resumed = BinnedBatchSampler(keys, 4, seed=1)
    resumed.set_position(0, 2 * 4)
    assert list(resumed) == full[2:]
    with pytest.raises(UserError, match="3 images cannot be dealt to 2 ranks"):
        BinnedBatchSampler([(1, 1), (1, 1), (2, 2)], 1, num_replicas=2)
