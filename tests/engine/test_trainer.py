"""The pretraining engine: exact resume after a kill, seeded data order, checkpoints, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.handlers import LrScheduleHandler
from monai.transforms import Compose, EnsureTyped, RandSpatialCropd

from medssl.engine import (
    AtomicCheckpointSaver,
    EpochSampler,
    MultiTask,
    PretrainTrainer,
    ResumeFromLatest,
    TaskSchedule,
    WarmupCosine,
    atomic_save,
    latest_checkpoint,
    pretrain_loader,
    warmup_cosine,
)
from medssl.models import ViT
from medssl.data.views import multi_crop
from medssl.tasks import DINOTask, MAETask, Task


def _dataset(n=21):
    rng = np.random.default_rng(0)
    data = [{"image": rng.random((1, 24, 24), dtype=np.float32)} for _ in range(n)]
    return Dataset(data, Compose([RandSpatialCropd(keys="image", roi_size=16, random_size=False),
                                  EnsureTyped(keys="image", track_meta=False)]))


def _binned_dataset(n=21):
    """Images of two shapes (two bins): 11 of 16x16 and 10 of 16x24."""
    rng = np.random.default_rng(0)
    shapes = [(16, 16) if i % 2 == 0 else (16, 24) for i in range(n)]
    return Dataset([{"image": rng.random((1, *s), dtype=np.float32)} for s in shapes], EnsureTyped(keys="image", track_meta=False)), shapes


def _run(folder, resume=False, crash_at=None, workers=0, max_epochs=3, dino=False, binned=False):
    torch.manual_seed(0)
    vit = ViT(2, 1, patch_size=4, size="micro")
    tasks = [MAETask(vit)] + ([DINOTask(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8)] if dino else [])
    net = MultiTask(tasks)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    views = [None, multi_crop(2, 16, 8, n_local=2)] if dino else None
    dataset, bins = _binned_dataset() if binned else (_dataset(), None)
    loader = pretrain_loader(dataset, batch_size=4, seed=1, num_workers=workers, views=views, schedule=net.schedule, bins=bins)
    sched = warmup_cosine(opt, total_steps=5 * max_epochs, warmup_steps=3)
    state = {"network": net, "optimizer": opt, "lr_scheduler": sched}
    trainer = PretrainTrainer("cpu", max_epochs, loader, net, opt, seed=3, amp=False,
                              train_handlers=[LrScheduleHandler(sched, print_lr=False, epoch_level=False),
                                              ResumeFromLatest(folder, state, enabled=resume),
                                              AtomicCheckpointSaver(folder, state, every=3, encoder=vit)])
    trainer.tasks_run = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        engine.tasks_run[engine.state.iteration] = int(engine.state.output["task"])

    if crash_at:
        @trainer.on(Events.ITERATION_STARTED(once=crash_at))
        def _kill(engine):
            raise KeyboardInterrupt("killed")
    try:
        trainer.run()
    except KeyboardInterrupt:
        pass
    return net, trainer


@pytest.mark.parametrize("dino,binned", [(False, False), (True, False), (False, True)], ids=["mae", "mae+dino", "mae-binned"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, dino, binned):
    straight, t1 = _run(tmp_path / "a", dino=dino, binned=binned)
    _run(tmp_path / "b", crash_at=8, dino=dino, binned=binned)  # killed mid-epoch 2; the last checkpoint is at iteration 6
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint_00000006.pt"
    resumed, t2 = _run(tmp_path / "b", resume=True, workers=2, dino=dino, binned=binned)  # worker count may change on resume
    # 21 images at 4 per step: 5 steps per epoch; binned (11 + 10 images): 3 + 3 batches of 3-4 images
    assert t1.state.iteration == t2.state.iteration == (18 if binned else 15)
    if dino:  # cyclic: MAE on odd iterations, DINO on even ones, and the resumed run picks up at iteration 7 (MAE)
        assert list(t1.tasks_run.values()) == [0, 1] * 7 + [0]
        assert t2.tasks_run == {i: t1.tasks_run[i] for i in range(7, 16)}
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "model.pt").is_file()
    encoder = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert torch.equal(encoder["cls_token"], resumed.backbone.cls_token.detach())


def test_checkpoints_keep_the_latest_two_and_load_weights_only(tmp_path):
    _run(tmp_path, max_epochs=2)
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pt"))
    assert names == ["checkpoint_00000009.pt", "checkpoint_00000010.pt"]
    state = torch.load(tmp_path / names[-1], weights_only=True)
    assert state["trainer"]["iteration"] == 10 and {"network", "optimizer", "lr_scheduler"} <= set(state)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_atomic_save_replaces_and_cleans_up(tmp_path):
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    with pytest.raises(Exception):
        atomic_save({"f": lambda: 0}, path)  # cannot pickle: the old file must survive
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_epoch_sampler_orders_shards_and_resumes_mid_epoch():
    s = EpochSampler(10, seed=5)
    e0, e1 = list(s), list(s)
    assert [e for e, _, _ in e0] == [0] * 10 and [e for e, _, _ in e1] == [1] * 10
    assert [p for _, p, _ in e0] == list(range(10))
    assert sorted(i for _, _, i in e0) == list(range(10)) and e0 != e1
    s.set_position(0, start=4)
    assert list(s) == e0[4:]  # same positions and indices as the uninterrupted epoch
    shards = [list(EpochSampler(10, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(x) == 4 for x in shards)
    assert {i for x in shards for _, _, i in x} == set(range(10))


def test_seeded_items_do_not_depend_on_history():
    loader = pretrain_loader(_dataset(), batch_size=4, seed=7)
    ds = loader.dataset
    a = ds[(2, 0, 5)]["image"]
    ds[(0, 0, 1)]
    assert torch.equal(ds[(2, 3, 5)]["image"], a) and not torch.equal(ds[(3, 0, 5)]["image"], a)


def test_warmup_cosine_values():
    f = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_task_schedule_cycles_and_random_is_reproducible():
    cyc = TaskSchedule(3)
    assert [cyc(i) for i in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    rnd = TaskSchedule(2, "random", weights=[3, 1], seed=4)
    draws = [rnd(i) for i in range(1, 2001)]
    assert draws == [TaskSchedule(2, "random", weights=[3, 1], seed=4)(i) for i in range(1, 2001)]
    assert 0.70 < draws.count(0) / 2000 < 0.80
    with pytest.raises(ValueError):
        TaskSchedule(2, "random", weights=[1])


class _Exploding(Task):
    name = "exploding"

    def forward(self, batch):
        return {"loss": self.backbone(batch["image"]).sum() * float("nan")}


class _NanGradient(Task):
    name = "nan_gradient"

    def forward(self, batch):
        z = self.backbone(batch["image"]).sum() * 0
        return {"loss": torch.sqrt(z - z)}  # loss 0, gradient of sqrt at 0 is inf -> NaN


@pytest.mark.parametrize("task", [_Exploding, _NanGradient])
def test_non_finite_losses_and_gradients_are_skipped_then_stop_training(task):
    vit = ViT(2, 1, patch_size=4, size="micro")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    trainer = PretrainTrainer("cpu", 5, pretrain_loader(_dataset(), batch_size=4), task(vit), opt, amp=False, max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.run()
    assert trainer.state.iteration == 4
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # no step was taken


def test_multitask_needs_one_shared_backbone():
    a, b = ViT(2, patch_size=4, size="micro"), ViT(2, patch_size=4, size="micro")
    with pytest.raises(ValueError, match="share one backbone"):
        MultiTask({"one": MAETask(a), "two": MAETask(b)})
    with pytest.raises(ValueError, match="share a name"):
        MultiTask([MAETask(a), MAETask(a)])


def test_progress_is_plain_lines_when_the_output_is_not_a_terminal(capsys):
    from types import SimpleNamespace

    from medssl.engine import ProgressBar

    bar = ProgressBar(lines_per_epoch=4)
    for iteration in range(1, 17):
        bar._line(SimpleNamespace(state=SimpleNamespace(epoch_length=16, iteration=iteration, epoch=1, max_epochs=2,
                                                        output={"loss": 0.5})))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"epoch 1/2: {n}/16 iterations, loss 0.5" for n in (4, 8, 12)]  # the summary line ends the epoch


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_step_fires_monai_iteration_events_and_uses_prepare_batch(spatial_dims):
    """Handlers hook in as in model-zoo bundles: IterationEvents with MONAI's output keys, a custom prepare_batch."""
    from monai.engines.utils import IterationEvents

    from medssl.engine.trainer import prepare_task_batch
    from medssl.tasks import ClassificationTask

    torch.manual_seed(0)
    vit = ViT(spatial_dims, 1, patch_size=4, size="micro")
    tasks = [ClassificationTask(vit, num_classes=2), MAETask(vit)]  # supervised + an SSL auxiliary: a task mix
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, *[16] * spatial_dims, generator=g), "label": i % 2} for i in range(8)]
    prepared = []

    def prepare(batch, device, non_blocking, **kwargs):
        prepared.append(sorted(batch))
        return prepare_task_batch(batch, device, non_blocking, **kwargs)

    net = MultiTask(tasks)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = PretrainTrainer("cpu", 2, pretrain_loader(Dataset(data), batch_size=4, seed=0), net, opt, amp=False,
                              prepare_batch=prepare)
    fired: list = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED, IterationEvents.BACKWARD_COMPLETED,
                  IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda engine, e=event: fired.append((e, sorted(engine.state.output))))
    ran = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: ran.append(int(engine.state.output["task"])))
    before = vit.patch_embed.weight.detach().clone()
    trainer.run()
    assert len(prepared) == 4 and all("label" in keys and "image" in keys for keys in prepared)
    assert [e for e, _ in fired[:4]] == [IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                                         IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED]
    assert len(fired) == 16 and fired[1][1] == ["image", "label", "loss", "pred"]
    assert not torch.equal(before, vit.patch_embed.weight)
    assert ran == [0, 1, 0, 1]  # classify and MAE in turn


def test_each_task_draws_on_the_batch_it_trained_on(tmp_path):
    """A cyclic MAE + DINO run: DINO's pictures come from a batch with DINO's views, MAE's from one without."""
    from medssl.engine import TaskPictures

    torch.manual_seed(0)
    vit = ViT(2, 1, patch_size=4, size="micro")
    net = MultiTask([MAETask(vit), DINOTask(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8)])
    seen = {}
    for name, task in net.tasks.items():
        original = task.visualize
        task.visualize = lambda batch, name=name, original=original: seen.setdefault(name, sorted(batch)) and original(batch)
    loader = pretrain_loader(_dataset(8), batch_size=4, seed=0, views=[None, multi_crop(2, 16, 8, n_local=2)], schedule=net.schedule)
    pictures = TaskPictures(tmp_path, every=1, n=2)
    trainer = PretrainTrainer("cpu", 1, loader, net, torch.optim.AdamW(net.parameters(), lr=1e-3), amp=False,
                              train_handlers=[pictures])
    trainer.run()
    assert "views" in seen["dino"] and "views" not in seen["mae"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["dino_epoch001.png", "dino_final.png", "mae_epoch001.png", "mae_final.png"]
    assert pictures.batches["dino"]["views"].shape[0] == 2  # the first n samples are kept


def test_a_fresh_run_can_start_from_another_encoder_and_its_teacher_starts_equal(tmp_path):
    from medssl.engine import InitialEncoder

    torch.manual_seed(0)
    source = ViT(2, 1, patch_size=4, size="micro")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    vit = ViT(2, 1, patch_size=4, size="micro")
    dino = DINOTask(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    net = MultiTask([dino])
    loader = pretrain_loader(_dataset(8), batch_size=4, seed=1, views=[multi_crop(2, 16, 8, n_local=2)], schedule=net.schedule)
    opt = torch.optim.AdamW(net.parameters(), lr=0.0)  # no step moves the weights: what was loaded stays
    trainer = PretrainTrainer("cpu", 1, loader, net, opt, seed=3, amp=False, quiet=True,
                              train_handlers=[InitialEncoder(tmp_path / "model.pt", net)])
    trainer.run()
    for (name, a), b in zip(source.state_dict().items(), vit.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(dino.teacher.parameters(), vit.parameters()):
        assert torch.equal(a, b)  # the EMA teacher starts from the loaded encoder, not from the old random one
    with pytest.raises(ValueError, match="does not fit this encoder"):
        InitialEncoder(tmp_path / "model.pt", MultiTask([MAETask(ViT(2, 1, patch_size=8, size="micro"))]))._load(
            type("E", (), {"state": type("S", (), {"iteration": 0})()})())
