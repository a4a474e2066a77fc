"""Several data sets in one run: one source per batch, the rules that pick sources, tasks per source, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events

from medssl.data.views import two_views
from medssl.engine import MultiTask, PretrainTrainer, SourceBatchSampler, SourcePlan, SourceSchedule, multi_source_loader
from medssl.errors import UserError
from medssl.models import Medformer
from medssl.tasks import MAETask, SimCLRTask


def test_proportional_batches_hold_one_source_each_and_every_item_at_most_once():
    plan = SourcePlan([100, 30], [8, 4], "proportional", seed=0)
    assert plan.steps_of == [12, 7] and plan.steps_per_epoch == 19
    batches = plan.batches(0)
    assert [s for s, _ in batches].count(0) == 12 and [s for s, _ in batches].count(1) == 7
    for source, items in batches:
        low, high = (0, 100) if source == 0 else (100, 130)
        assert len(items) == (8 if source == 0 else 4) and all(low <= i < high for i in items)
    flat = [i for _, items in batches for i in items]
    assert len(flat) == len(set(flat)) == 12 * 8 + 7 * 4
    assert plan.batches(0) == SourcePlan([100, 30], [8, 4], "proportional", seed=0).batches(0)  # (seed, epoch) decide
    assert plan.batches(1) != plan.batches(0)


@pytest.mark.parametrize("rule, expected", [("uniform", [0.5, 0.5]), ("temperature", None), ("proportional", [12 / 19, 7 / 19])])
def test_the_rules_draw_sources_in_their_proportions(rule, expected):
    plan = SourcePlan([100, 30], [8, 4], rule, temperature=2.0, seed=0)
    if expected is None:  # n ** (1 / T), normalised
        w = np.array([100, 30]) ** 0.5
        expected = w / w.sum()
    np.testing.assert_allclose(plan.weights(), expected)
    drawn = np.concatenate([plan.sources(e) for e in range(200)])
    assert len(drawn) == 200 * plan.steps_per_epoch  # the same number of steps per epoch under every rule
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), expected, atol=0.02)
    for source, items in plan.batches(3):  # a source drawn more often than it has batches reshuffles: still its own items
        assert all((i < 100) == (source == 0) for i in items)


def test_ranks_draw_the_same_source_at_each_step_and_different_items():
    plans = [SourcePlan([100, 30], [8, 4], "temperature", seed=5, num_replicas=2) for _ in range(2)]
    r0, r1 = plans[0].batches(2, rank=0), plans[1].batches(2, rank=1)
    assert [s for s, _ in r0] == [s for s, _ in r1]
    for (_, a), (_, b) in zip(r0, r1):
        assert not set(a) & set(b)


def test_the_schedule_gives_each_step_a_task_of_its_source_in_turn():
    plan = SourcePlan([40, 20], [4, 4], seed=1)
    schedule = SourceSchedule(plan, task_sources=[0, 1, 1])  # one task on source 0, two taking turns on source 1
    sources = plan.sources(0) + plan.sources(1)
    tasks = [schedule(i) for i in range(1, 2 * plan.steps_per_epoch + 1)]
    for s, t in zip(sources, tasks):
        assert (t == 0) == (s == 0)
    first_epoch = [t for s, t in zip(sources[:plan.steps_per_epoch], tasks) if s == 1]
    assert first_epoch[:4] == [1, 2, 1, 2]
    with pytest.raises(UserError, match="have no task"):
        SourceSchedule(plan, task_sources=[0, 0])


def test_a_resumed_sampler_continues_mid_epoch_exactly():
    plan = SourcePlan([50, 26], [5, 3], "uniform", seed=2)
    straight = SourceBatchSampler(plan)
    list(straight)  # epoch 0
    epoch1 = list(straight)
    resumed = SourceBatchSampler(plan)
    resumed.set_position(1, 4 * resumed.batch_size)  # killed after 4 steps of epoch 1
    assert list(resumed) == epoch1[4:]


def _source(spatial_dims: int, n: int, modality: str) -> list[dict]:
    g = torch.Generator().manual_seed(spatial_dims)
    shape = (1, 16, 16) if spatial_dims == 2 else (1, 8, 8, 8)
    return [{"image": torch.rand(shape, generator=g), "modality": modality} for _ in range(n)]


def test_one_medformer_pretrains_on_a_2d_and_a_3d_source_with_a_task_per_source():
    torch.manual_seed(0)
    model = Medformer(patch_size=4, embed_dim=32, num_heads=2, depth=1, num_latents=4, latents_per_entry=2)
    tasks = {"mae_xray": MAETask(model.view(2), mask_ratio=0.5), "simclr_xray": SimCLRTask(model.view(2), hidden_dim=32, out_dim=16),
             "mae_ct": MAETask(model.view(3), mask_ratio=0.5)}
    views = [None, two_views(spatial_dims=2, size=16, modality="DX"), None]
    loader, schedule = multi_source_loader([_source(2, 24, "DX"), _source(3, 12, "CT")], [4, 2], task_sources=[0, 0, 1],
                                           views=views, seed=0)
    multitask = MultiTask(tasks, schedule=schedule)
    assert multitask.backbone is model  # what is saved as the encoder
    optimizer = torch.optim.AdamW(multitask.parameters(), lr=1e-3)
    trainer = PretrainTrainer("cpu", 2, loader, multitask, optimizer, amp=False)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((multitask.names[int(e.state.output["task"])],
                                                                                 tuple(e.state.batch["image"].shape))))
    before = model.latents.detach().clone()
    trainer.run()
    assert len(seen) == 2 * len(loader)
    for name, shape in seen:  # the batch's dimensionality always matches the task's
        assert len(shape) == (5 if name == "mae_ct" else 4)
    assert {name for name, _ in seen} == set(tasks)
    assert not torch.equal(model.latents, before)


def test_phantom_radiographs_and_ct_volumes_pretrain_one_medformer_with_per_source_losses(phantoms):
    from medssl.data.sources import source_datasets
    from medssl.engine import source_tasks

    sources = [{"data": str(phantoms / "xray"), "spatial_dims": 2, "image_size": 32, "organ": "abdomen", "name": "xray"},
               {"data": str(phantoms / "ct_dicom"), "spatial_dims": 3, "image_size": 16, "organ": "abdomen", "name": "ct"}]
    datasets = source_datasets(sources, cache=None, progress=False)
    torch.manual_seed(0)
    model = Medformer(patch_size=4, embed_dim=32, num_heads=2, depth=1, num_latents=4, latents_per_entry=2)
    tasks, task_sources, views = source_tasks(model, sources, ["mae", "simclr"], {"simclr": {"hidden_dim": 32, "out_dim": 16}})
    assert list(tasks) == ["mae_xray", "simclr_xray", "mae_ct", "simclr_ct"] and task_sources == [0, 0, 1, 1]
    loader, schedule = multi_source_loader(datasets, [2, 2], task_sources, views=views, seed=0)
    multitask = MultiTask(tasks, schedule=schedule)
    trainer = PretrainTrainer("cpu", 2, loader, multitask, torch.optim.AdamW(multitask.parameters(), lr=1e-3), amp=False)
    logged = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(e.state.output))
    trainer.run()
    names = {k.split("/")[0] for out in logged for k in out if "/" in k}
    assert names == set(tasks)  # every task ran, and its loss is logged under its source's name
    assert all(np.isfinite(out["loss"]) for out in logged)
    with pytest.raises(UserError, match="not built per source yet"):
        source_tasks(model, sources, ["dino"])
    with pytest.raises(UserError, match="missing"):
        source_datasets([{"data": str(phantoms / "xray"), "spatial_dims": 2}])


def test_each_labelled_source_gets_a_classification_head_of_its_own(phantoms):
    from medssl.data.sources import source_datasets
    from medssl.engine import source_tasks

    sources = [{"data": str(phantoms / "labels_xray.csv"), "spatial_dims": 2, "image_size": 32, "name": "xray", "num_classes": 2},
               {"data": str(phantoms / "labels_ct.csv"), "spatial_dims": 3, "image_size": 16, "name": "ct", "num_classes": 2}]
    torch.manual_seed(0)
    model = Medformer(patch_size=4, embed_dim=32, num_heads=2, depth=1, num_latents=4, latents_per_entry=2)
    tasks, task_sources, views = source_tasks(model, sources, ["classify", "mae"])
    assert tasks["classify_xray"].head is not tasks["classify_ct"].head and views[0] is None
    loader, schedule = multi_source_loader(source_datasets(sources, cache=None, progress=False), 2, task_sources, views=views)
    multitask = MultiTask(tasks, schedule=schedule)
    trainer = PretrainTrainer("cpu", 2, loader, multitask, torch.optim.AdamW(multitask.parameters(), lr=1e-3), amp=False)
    seen = set()
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.update(k.split("/")[0] for k in e.state.output if "/" in k))
    trainer.run()
    assert {"classify_xray", "classify_ct"} <= seen


def test_a_sources_modality_replaces_the_other_that_medmnist_files_say(tmp_path):
    from medssl.data.sources import source_datasets

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", train_images=rng.integers(0, 255, (4, 16, 16), dtype=np.uint8), train_labels=np.zeros((4, 1)),
             val_images=rng.integers(0, 255, (2, 16, 16), dtype=np.uint8), val_labels=np.zeros((2, 1)))
    (plain,) = source_datasets([{"data": str(tmp_path / "tiny.npz"), "spatial_dims": 2, "image_size": 16}], cache=None, progress=False)
    (said,) = source_datasets([{"data": str(tmp_path / "tiny.npz"), "spatial_dims": 2, "image_size": 16, "modality": "DX",
                                "organ": "chest"}], cache=None, progress=False)
    assert plain[0]["modality"] == "OT"  # what the file says: "other"
    assert (said[0]["modality"], said[0]["organ"]) == ("DX", "chest")  # the source's own words, as evaluation assumes them
