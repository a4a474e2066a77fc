"""Patient fusion (BrainFuse): partitions, patient groups, soft labels, consistency, the fused scans,
the summed schedule that trains supervised + Barlow Twins + fusion on every step; 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medssl.data.views import two_views
from medssl.engine import MultiTask
from medssl.engine.determinism import SeededDataset
from medssl.engine.multitask import TaskSchedule
from medssl.models import ViT
from medssl.tasks import BarlowTwinsTask, BrainFuseTask, ClassificationTask, RawBrainFuseTask
from medssl.tasks.brainfuse import consistency_loss
from medssl.tasks.fusion import NotEnoughPatients, fuse, fusion_groups, random_partition, shares, soft_labels

GRIDS = {2: (24, 20), 3: (12, 10, 8)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("smoothness", [0.0, 0.08])
@pytest.mark.parametrize("k", [2, 8])
def test_partition_weights_sum_to_one_and_every_source_owns_a_region(spatial_dims, smoothness, k):
    g = torch.Generator().manual_seed(k)
    part = random_partition(5, k, spatial_dims, n_regions=k + 3, smoothness=smoothness, generator=g)
    w = part.weights(GRIDS[spatial_dims])
    assert w.shape == (5, k, *GRIDS[spatial_dims]) and w.dtype == torch.float32
    assert torch.allclose(w.sum(1), torch.ones(()), atol=1e-5) and (w >= 0).all()
    for row in part.source:  # every one of the k patients fills at least one region
        assert set(row.tolist()) == set(range(k))
    if smoothness == 0:
        assert set(w.unique().tolist()) <= {0.0, 1.0}  # hard borders: one source per voxel


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_each_region_is_filled_by_its_one_source(spatial_dims):
    part = random_partition(3, 4, spatial_dims, n_regions=9, smoothness=0.0, generator=torch.Generator().manual_seed(0))
    grid = GRIDS[spatial_dims]
    w = part.weights(grid)
    axes = [(torch.arange(n) + 0.5) / n for n in grid]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, spatial_dims)
    for i in range(3):
        region = torch.cdist(points, part.centres[i]).argmin(1)  # the region of every voxel
        owner = w[i].reshape(4, -1).argmax(0)
        assert torch.equal(owner, part.source[i][region])


def test_smooth_borders_blend_and_large_grids_are_interpolated_as_partitions_of_unity():
    part = random_partition(2, 3, 3, smoothness=0.1, generator=torch.Generator().manual_seed(1))
    w = part.weights((64, 64, 40))  # more points than the direct grid: computed coarse, interpolated
    assert w.shape == (2, 3, 64, 64, 40) and torch.allclose(w.sum(1), torch.ones(()), atol=1e-5)
    assert ((w > 0.05) & (w < 0.95)).any()  # soft borders exist
    assert (w.amax(1) > 0.99).float().mean() > 0.3  # and region interiors are one patient's


def test_no_patient_is_fused_with_itself_and_eight_patients_are_eight():
    patients = [f"p{i // 3}" for i in range(30)]  # a 3D loader: 3 patches of each of 10 volumes
    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 8):
        groups = fusion_groups(patients, k, 40, g)
        assert groups.shape == (40, k)
        for row in groups.tolist():
            assert len({patients[i] for i in row}) == k
    with pytest.raises(NotEnoughPatients, match="holds 10 distinct patients, fewer than the 11"):
        fusion_groups(patients, 11, 4, g)
    with pytest.raises(ValueError, match="at least 2"):
        fusion_groups(patients, 1, 4, g)


def test_soft_labels_equal_the_partition_shares():
    part = random_partition(6, 3, 2, smoothness=0.05, generator=torch.Generator().manual_seed(2))
    w = part.weights((16, 16))
    share = shares(w)
    assert torch.allclose(share.sum(1), torch.ones(()), atol=1e-5)
    labels = torch.tensor([0, 2, 2, 1, 0, 1])
    groups = fusion_groups(["a", "b", "c", "d", "e", "f"], 3, 6, torch.Generator().manual_seed(3))
    soft = soft_labels(labels, groups, share, 4)
    for i in range(6):
        for c in range(4):
            expected = sum(float(share[i, j]) for j in range(3) if int(labels[groups[i, j]]) == c)
            assert soft[i, c].item() == pytest.approx(expected, abs=1e-6)
    assert torch.all(soft[:, 3] == 0)


def test_consistency_is_zero_when_the_fused_embedding_is_the_weighted_mix():
    sources = torch.randn(4, 3, 16)
    share = torch.softmax(torch.randn(4, 3), 1)
    mix = (sources * share.unsqueeze(-1)).sum(1)
    assert consistency_loss(2.5 * mix, sources, share).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_loss(torch.randn(4, 16), sources, share).item() > 0.2


def _vit(spatial_dims):
    torch.manual_seed(0)
    return ViT(spatial_dims, in_channels=1, patch_size=4, size="micro", window_size=2, global_every=2)


def _batch(spatial_dims, n=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    img = (0.2 + 0.6 * torch.rand(n, 1, *[16] * spatial_dims, generator=g)).to(dtype)
    return {"image": img, "patient": [f"p{i}" for i in range(n)], "label": torch.tensor([0, 1] * (n // 2)),
            "modality": ["MR"] * n}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("space,detail", [("raw", False), ("latent", False), ("latent", True)])
def test_fused_scans_keep_the_inputs_shape_dtype_and_range(spatial_dims, space, detail):
    task = BrainFuseTask(_vit(spatial_dims), space=space, n_patients=3, generator_dim=32, consistency_weight=1.0,
                         detail_transfer=detail)
    batch = _batch(spatial_dims)
    groups, part = task.plan(batch, torch.Generator().manual_seed(0))
    fused, weights = task.make(batch, groups, part)
    img = batch["image"]
    assert fused.shape == img.shape and fused.dtype == img.dtype
    assert fused.min() >= img.min() and fused.max() <= img.max()
    assert torch.allclose(weights.sum(1), torch.ones(()), atol=1e-5)
    if space == "raw":  # a convex combination, voxel by voxel
        expected = sum(weights[:, k:k + 1] * img[groups[:, k]] for k in range(3))
        assert torch.allclose(fused, expected, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_detail_transfer_turns_a_mean_image_generator_into_raw_fusion(spatial_dims):
    """A generator that decodes every scan to one constant image has no seams to correct: the fused
    scan is the raw fusion; without detail transfer it is that constant image."""
    batch = _batch(spatial_dims)
    task = BrainFuseTask(_vit(spatial_dims), n_patients=3, generator_dim=32, detail_transfer=True)
    torch.nn.init.zeros_(task.generator.pred.weight)
    torch.nn.init.constant_(task.generator.pred.bias, 0.5)
    groups, part = task.plan(batch, torch.Generator().manual_seed(0))
    fused, _ = task.make(batch, groups, part)
    raw, _ = task.make(batch, groups, part, space="raw")
    assert torch.allclose(fused, raw, atol=1e-5)
    task.detail_transfer = False
    assert torch.allclose(task.make(batch, groups, part)[0], torch.full_like(raw, 0.5))


def test_raw_fusion_with_hard_borders_copies_each_voxel_from_one_patient():
    batch = _batch(2)
    task = RawBrainFuseTask(_vit(2), n_patients=2, smoothness=0.0, consistency_weight=1.0)
    groups, part = task.plan(batch, torch.Generator().manual_seed(0))
    fused, weights = task.make(batch, groups, part)
    img = batch["image"]
    owner = weights.argmax(1, keepdim=True)  # (G, 1, *S)
    picked = torch.where(owner == 0, img[groups[:, 0]], img[groups[:, 1]])
    assert torch.equal(fused, picked)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_generator_learns_to_decode_tokens(spatial_dims):
    """Its loss falls within a few steps, on detached tokens too (then the encoder is not its to change)."""
    vit = _vit(spatial_dims)
    task = BrainFuseTask(vit, n_patients=2, generator_dim=32, generator_trains_encoder=False)
    opt = torch.optim.Adam(task.generator.parameters(), lr=3e-3)
    batch = _batch(spatial_dims)
    losses = []
    for _ in range(25):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in vit.parameters())
        opt.step()
        losses.append(out["generator"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_fused_scans_with_an_unlabelled_source_get_no_label():
    vit = _vit(2)
    classify = ClassificationTask(vit, 2)
    task = RawBrainFuseTask(vit, n_patients=2, classify=classify)
    batch = _batch(2)
    batch["label"] = torch.tensor([-1] * 6)
    out = task(batch)
    assert "soft_ce" not in out and out["loss"].item() == 0
    out["loss"].backward()  # still a step the engine can take
    with pytest.raises(ValueError, match="nothing to train"):
        RawBrainFuseTask(vit, n_patients=2)
    batch["label"] = torch.tensor([0, 1, -1, -1, -1, -1])
    assert classify(batch)["loss"].item() > 0  # the classifier ignores -1 too
    batch["label"] = torch.tensor([-1] * 6)
    assert classify(batch)["loss"].item() == 0


def test_settings_are_checked():
    vit = _vit(2)
    with pytest.raises(ValueError, match="2..8"):
        BrainFuseTask(vit, n_patients=9)
    with pytest.raises(ValueError, match="space"):
        BrainFuseTask(vit, space="pixel")
    with pytest.raises(ValueError, match="needs views"):
        BrainFuseTask(vit, barlow=BarlowTwinsTask(vit, hidden_dim=16, out_dim=16))
    with pytest.raises(ValueError, match="regions"):
        random_partition(2, 4, 2, n_regions=3)


def test_a_summed_schedule_runs_every_task_on_every_batch_and_adds_their_losses():
    vit = _vit(2)
    barlow = BarlowTwinsTask(vit, hidden_dim=32, out_dim=32)
    classify = ClassificationTask(vit, 2)
    fuse_task = BrainFuseTask(vit, n_patients=2, views=two_views(2, 16), barlow=barlow, classify=classify,
                              consistency_weight=0.5, generator_dim=32, min_generator_quality=-1.0)
    mix = MultiTask({"classify": classify, "barlow": barlow, "brainfuse": fuse_task}, schedule="sum",
                    loss_weights={"barlow": 0.5})
    assert mix.schedule(7) == TaskSchedule.ALL and mix.schedule.tasks_at(7) == [0, 1, 2]
    batch = _batch(2)
    views = two_views(2, 16)
    views.set_random_state(seed=0)
    batch["views"] = torch.stack([views({"image": x})["views"] for x in batch["image"]])
    torch.manual_seed(0)
    out = mix(batch, 3)
    torch.manual_seed(0)
    parts = [classify(batch)["loss"], 0.5 * barlow(batch)["loss"], fuse_task(batch)["loss"]]
    assert out["loss"].item() == pytest.approx(sum(p.item() for p in parts), rel=1e-4)
    assert int(out["task"]) == -1 and {"classify/loss", "barlow/loss", "brainfuse/loss", "brainfuse/consistency"} <= set(out)


def test_a_summed_schedule_makes_every_tasks_views_and_refuses_two_that_clash():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.rand(1, 16, 16), "patient": f"p{i}"}

    schedule = TaskSchedule(3, "sum")
    data = SeededDataset(Items(), views=[None, two_views(2, 16), None], schedule=schedule, batch_size=2, steps_per_epoch=2)
    item = data[(0, 0, 1)]
    assert item["views"].shape == (2, 1, 16, 16) and int(item["view_task"]) == -1
    clash = SeededDataset(Items(), views=[two_views(2, 16), None, two_views(2, 8)], schedule=schedule, batch_size=2,
                          steps_per_epoch=2)
    with pytest.raises(ValueError, match="both make batch key 'views'"):
        clash[(0, 0, 1)]


def test_the_generator_trains_the_encoder_by_default():
    vit = _vit(2)
    task = BrainFuseTask(vit, n_patients=2, generator_dim=32)
    out = task(_batch(2))
    out["loss"].backward()
    assert set(out) >= {"generator"} and "barlow" not in out
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in vit.parameters())


def test_latent_fused_scans_wait_for_a_generator_that_decodes():
    """Until the generator's running R² reaches the gate, a step trains the generator alone; the running
    value is a buffer (checkpointed, so a resumed run gates the same)."""
    vit = _vit(2)
    barlow = BarlowTwinsTask(vit, hidden_dim=16, out_dim=16)
    task = BrainFuseTask(vit, n_patients=2, views=two_views(2, 16), barlow=barlow, generator_dim=32, min_generator_quality=0.3,
                         detail_transfer=False)
    batch = _batch(2)
    out = task(batch)
    assert float(out["latent_used"]) == 0 and "barlow" not in out and set(out) >= {"generator", "generator_quality"}
    assert "generator_quality" in task.state_dict()
    task.generator_quality.fill_(0.31)
    out = task(batch)
    assert float(out["latent_used"]) == 1 and "barlow" in out
    task.eval()
    before = task.generator_quality.clone()
    task(batch)
    assert torch.equal(task.generator_quality, before)  # evaluation does not move the running value


def test_with_detail_transfer_a_generator_below_the_gate_leaves_raw_fusion_in_use():
    """Detail transfer's limit for a generator that decodes nothing is raw fusion: below the gate the
    step trains on raw fused scans (and the generator), above it on the corrected ones."""
    vit = _vit(2)
    barlow = BarlowTwinsTask(vit, hidden_dim=16, out_dim=16)
    task = BrainFuseTask(vit, n_patients=2, views=two_views(2, 16), barlow=barlow, generator_dim=32,
                         min_generator_quality=0.3, detail_transfer=True)
    spaces, make = [], task.make
    task.make = lambda *a, space=None, **k: spaces.append(space) or make(*a, space=space, **k)
    out = task(_batch(2))
    assert float(out["latent_used"]) == 0 and "barlow" in out and "generator" in out and spaces == ["raw"]
    task.generator_quality.fill_(0.31)
    out = task(_batch(2))
    assert float(out["latent_used"]) == 1 and spaces == ["raw", None]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_pretrained_generative_model_makes_the_latent_fusions_frozen(spatial_dims):
    """The source's two stages: a generative model (a latent BrainFuse task on an encoder of its own) trained first,
    then a task whose latent fused scans it makes: the generative model's weights do not move, it stays in eval mode,
    no generator loss or gate, and its fusions are what the task trains on."""
    batch = _batch(spatial_dims)
    generative = BrainFuseTask(_vit(spatial_dims), n_patients=2, generator_dim=32)
    vit = _vit(spatial_dims)
    barlow = BarlowTwinsTask(vit, hidden_dim=16, out_dim=16)
    task = BrainFuseTask(vit, n_patients=2, views=two_views(spatial_dims, 16), barlow=barlow, generative=generative,
                         consistency_weight=1.0).train()
    assert task.generator is None and not generative.training
    assert all(not p.requires_grad for p in generative.parameters())
    assert any(k.startswith("generative.generator.") for k in task.state_dict())
    before = {k: v.clone() for k, v in generative.state_dict().items()}
    opt = torch.optim.AdamW(p for p in task.parameters() if p.requires_grad)
    out = task(batch)
    out["loss"].backward()
    opt.step()
    assert {"barlow", "consistency"} <= set(out) and "generator" not in out and float(out["latent_used"]) == 1
    assert all(torch.equal(before[k], v) for k, v in generative.state_dict().items())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in vit.parameters())
    groups, part = task.plan(batch, torch.Generator().manual_seed(0))
    assert torch.equal(task.make(batch, groups, part)[0], generative.make(batch, groups, part, detail=True)[0])
    with pytest.raises(ValueError, match="encoder of its own"):
        BrainFuseTask(generative.backbone, n_patients=2, generative=generative)
