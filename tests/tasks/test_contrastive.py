"""Contrastive and distillation losses against hand-computed values; DINO's teacher and schedules."""

from __future__ import annotations

import math
import sys
from datetime import timedelta

import pytest
import torch
from monai.losses import ContrastiveLoss

from medssl.models import ViT
from medssl.tasks import BarlowTwinsTask, BYOLTask, DINOTask, SwAVTask, nt_xent
from medssl.tasks.byol import byol_loss
from medssl.tasks.sinkhorn import sinkhorn
from medssl.tasks.swav import swav_loss
from medssl.tasks.dino import koleo_loss, teacher_temperature
from medssl.tasks.ema import ema_momentum


def test_nt_xent_by_hand():
    eye = torch.eye(2)
    # each view: positive similarity 1, two negatives with similarity 0 -> -log(e / (e + 2)) at t = 1
    assert nt_xent(eye, eye, temperature=1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # orthogonal partners: every candidate has similarity 0 -> log 3 ; scale does not matter (cosine)
    assert nt_xent(eye, 5 * eye.flip(0), temperature=0.5).item() == pytest.approx(
        -math.log(1 / (1 + 1 + math.exp(2))), abs=1e-5)


def test_nt_xent_equals_monai_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ours = nt_xent(z1, z2, temperature=0.5)
    theirs = ContrastiveLoss(temperature=0.5)(z1, z2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_barlow_twins_loss_by_hand():
    task = BarlowTwinsTask(ViT(2, patch_size=4, size="micro"), hidden_dim=8, out_dim=8, lambd=0.5)
    # two features; standardised over the batch (unbiased std): z1 = [[1, 1], [-1, -1]] -> each column +-1/sqrt(2)
    z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    z2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    # c = z1n^T z2n / 2 = [[0.5, -0.5], [0.5, -0.5]]: diagonal (0.5 - 1)^2 + (-0.5 - 1)^2, off-diagonal 0.5 * 2 * 0.25
    expected = 0.25 + 2.25 + 0.5 * (0.25 + 0.25)
    assert task.loss_fn(z1, z2).item() == pytest.approx(expected, rel=1e-4)
    # identical views: MONAI divides by B but standardises with the unbiased std, so c = (B-1)/B = 0.5 everywhere
    assert task.loss_fn(z1, z1).item() == pytest.approx(2 * 0.25 + 0.5 * 2 * 0.25, rel=1e-4)


def _dino(**kw):
    torch.manual_seed(0)
    return DINOTask(ViT(2, patch_size=4, size="micro", cls_token=True), out_dim=32, hidden_dim=16, bottleneck_dim=8, **kw)


def test_dino_schedules():
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.9, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert ema_momentum(0.0, 0.996) == pytest.approx(0.996) and ema_momentum(1.0, 0.996) == pytest.approx(1.0)
    assert ema_momentum(0.5, 0.99) == pytest.approx(0.995)


def _byol(**kw):
    torch.manual_seed(0)
    return BYOLTask(ViT(2, patch_size=4, size="micro", cls_token=True), hidden_dim=16, out_dim=8, **kw)


# (task, its teacher's parameters, the student parameters they follow): DINO and BYOL share medssl.tasks.ema
_TEACHERS = {
    "dino": (_dino, lambda t: [*t.teacher.parameters(), *t.teacher_head.parameters()],
             lambda t: [*t.backbone.parameters(), *t.head.parameters()]),
    "byol": (_byol, lambda t: [*t.target.parameters(), *t.target_projector.parameters()],
             lambda t: [*t.backbone.parameters(), *t.projector.parameters()]),
}


@pytest.mark.parametrize("name", sorted(_TEACHERS))
def test_ema_update_is_exact(name):
    make, teacher_of, student_of = _TEACHERS[name]
    task = make(momentum=0.9)
    with torch.no_grad():
        for p in student_of(task):
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in teacher_of(task)]
    student = [p.clone() for p in student_of(task)]
    assert len(teacher_before) == len(student) and all(not p.requires_grad for p in teacher_of(task))
    progress = 0.25
    m = ema_momentum(progress, 0.9)
    task.step_end(progress)
    for t_new, t_old, s in zip(teacher_of(task), teacher_before, student):
        assert torch.allclose(t_new, m * t_old + (1 - m) * s, atol=1e-6, rtol=0)


def test_byol_loss_by_hand_and_the_target_gets_no_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[3.0, 0.0], [2.0, 0.0]])  # cos 1 and cos 0: losses 0 and 2
    assert byol_loss(p, z).item() == pytest.approx(1.0)
    assert byol_loss(p, -z).item() == pytest.approx(3.0)  # cos -1 and 0: 4 and 2
    task = _byol()
    task.train()
    out = task({"views": torch.rand(4, 2, 1, 16, 16)})
    out["loss"].backward()
    assert all(p.grad is None for p in [*task.target.parameters(), *task.target_projector.parameters()])
    assert task.predictor.net[0].weight.grad is not None and 0 <= out["loss"].item() <= 4


def test_sinkhorn_gives_equal_partition_marginals():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=-1) @ \
        torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1).T  # (B=12, K=4) cosine scores
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (12, 4) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # each image: one unit of assignment, exactly
    q = sinkhorn(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(q.sum(0), torch.full((4,), 3.0), atol=1e-4, rtol=0)  # each prototype: B / K images
    torch.testing.assert_close(q.sum(1), torch.ones(12))


def test_swav_loss_by_hand():
    codes = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    scores = torch.tensor([[0.0, 0.0], [0.1, -0.1]])
    # row 1: -log(1/2); row 2: -(0.5 log softmax(1, -1)_0 + 0.5 log softmax(1, -1)_1) at t = 0.1
    lse = math.log(math.exp(1) + math.exp(-1))
    expected = (math.log(2) + 0.5 * (lse - 1) + 0.5 * (lse + 1)) / 2
    assert swav_loss(codes, scores, temperature=0.1).item() == pytest.approx(expected, abs=1e-6)


def test_dino_teacher_gets_no_gradient_and_moves_only_by_ema():
    task = _dino()
    task.train()
    assert not task.teacher.training  # the teacher backbone never drops paths
    task.step_start(0.5)
    views = torch.rand(3, 2, 1, 16, 16)
    out = task({"views": views, "local_views": torch.rand(3, 2, 1, 8, 8)})
    out["loss"].backward()
    teacher = [*task.teacher.parameters(), *task.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    before = [p.clone() for p in teacher]
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher))
    task.step_end(0.5)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher))


def test_dino_centre_follows_the_teacher_and_prototypes_freeze_early():
    task = _dino(center_momentum=0.5)
    views = torch.rand(4, 2, 1, 16, 16)
    task.step_start(0.0)  # inside freeze_prototypes: no gradient to the prototypes
    task({"views": views})["loss"].backward()
    assert task.head.prototypes.grad is None
    with torch.no_grad():
        t_out = task.teacher_head(task.teacher.embed(views.transpose(0, 1).flatten(0, 1), "cls"))
    centre = task.center.clone()
    task({"views": views})
    assert torch.allclose(task.center, 0.5 * centre + 0.5 * t_out.mean(0, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 global views"):
        task({"views": views[:, :1]})


def test_koleo_by_hand():
    # three unit vectors at 0, 90 and 180 degrees: every nearest neighbour lies at distance sqrt(2)
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], requires_grad=True)
    loss = koleo_loss(z)
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # embeddings that bunch up cost more than spread ones
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01]])
    assert koleo_loss(close).item() > loss.item() + 3


def test_dino_koleo_adds_to_the_loss():
    task = _dino(koleo_weight=0.5)
    task.step_start(0.5)
    out = task({"views": torch.rand(4, 2, 1, 16, 16)})
    assert out["loss"].item() == pytest.approx(out["dino_loss"].item() + 0.5 * out["koleo"].item(), rel=1e-5)
    assert "koleo" not in _dino()({"views": torch.rand(4, 2, 1, 16, 16)})


def test_dino_head_batch_norm_gives_the_teacher_a_signal_on_near_identical_images():
    # a fresh ViT maps similar images to almost the same embedding; the BatchNorm head rescales
    # their differences, so the teacher's logits differ between images by far more
    torch.manual_seed(0)
    images = 0.5 + 0.01 * torch.randn(8, 1, 16, 16)
    spread = {}
    for bn in (False, True):
        task = _dino(head_batch_norm=bn).train()
        assert task.teacher_head.training  # batch statistics, as the reference teacher
        with torch.no_grad():
            logits = task.teacher_head(task.teacher.embed(images, "cls"))
        spread[bn] = float(logits.std(0).mean())
    assert spread[True] > 10 * spread[False]


def test_dino_sinkhorn_centring_targets_are_the_sinkhorn_codes_of_all_global_views():
    """DINOv2's Sinkhorn-Knopp teacher: the targets are the equal-partition codes of every global view of the batch at
    once (epsilon = the teacher temperature), every prototype gets an equal share, and no centre is kept."""
    torch.manual_seed(0)
    views = torch.rand(8, 2, 1, 16, 16)
    task = _dino(centering="sinkhorn")
    before = task.center.clone()
    task.step_start(0.5)
    with torch.no_grad():
        t_out = task.teacher_head(task.teacher.embed(views.transpose(0, 1).flatten(0, 1), "cls")).float()
    temp = teacher_temperature(0.5, task.warmup_teacher_temp, task.teacher_temp, task.teacher_temp_warmup)
    codes = sinkhorn(t_out, epsilon=temp, iterations=3).chunk(2)
    s_out = (task.head(task.backbone.embed(views.transpose(0, 1).flatten(0, 1), "cls")) / task.student_temp).log_softmax(-1).chunk(2)
    expected = ((-codes[0] * s_out[1]).sum(-1).mean() + (-codes[1] * s_out[0]).sum(-1).mean()) / 2
    torch.testing.assert_close(torch.cat(codes).sum(0), torch.full((32,), 16 / 32), atol=1e-3, rtol=1e-3)  # equal shares
    out = task({"views": views})
    assert out["dino_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert task.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert torch.equal(task.center, before)  # no centre under Sinkhorn
    with pytest.raises(ValueError, match="centering must be one of ema, sinkhorn"):
        _dino(centering="mean")


def test_sinkhorn_takes_scores_whose_exponent_overflows():
    scores = torch.tensor([[10.0, 0.0, -10.0], [0.0, 10.0, 5.0]])
    q = sinkhorn(scores, epsilon=0.01, iterations=3)  # exp(1000) overflows float32 without the shift
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    torch.testing.assert_close(sinkhorn(scores, epsilon=1.0), sinkhorn(scores + 7.0, epsilon=1.0))  # a shift changes nothing


def _leave(rank: int) -> None:
    """End a spawned test rank once both ranks have written their results, without running destructors: freeing a
    DDP Reducer (and the gloo group it holds last) while holding the GIL can deadlock against gloo's worker thread,
    which needs the GIL to free a finished work item (seen as a CI hang in ~ProcessGroupGloo)."""
    import os

    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _two_rank_losses(rank, world, init_file, z1, z2, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=120))  # a lost peer fails the test, not CI
    share = slice(rank * z1.shape[0] // world, (rank + 1) * z1.shape[0] // world)
    barlow = BarlowTwinsTask(ViT(2, patch_size=4, size="micro"), hidden_dim=8, out_dim=8)
    out = {}
    for name, loss_fn in (("nt_xent", nt_xent), ("barlow", barlow.loss)):
        a, b = z1[share].clone().requires_grad_(), z2[share].clone().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        out[name] = (loss.detach(), a.grad, b.grad)
    out["sinkhorn"] = sinkhorn(z1[share] @ z2.T, epsilon=0.05, iterations=3)  # each rank's rows of the global codes
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    _leave(rank)


def test_two_view_losses_under_ddp_are_the_global_batch_losses(tmp_path):
    """Gathered across 2 gloo ranks, each loss (and its DDP-averaged gradient) is the one of the whole batch."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    torch.multiprocessing.spawn(_two_rank_losses, args=(2, tmp_path / "init", z1, z2, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Sinkhorn's sums run over both ranks (log domain: a max and a sum all-reduced), so the codes are the global batch's
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), sinkhorn(z1 @ z2.T, epsilon=0.05, iterations=3),
                               rtol=1e-5, atol=1e-6)
    barlow = BarlowTwinsTask(ViT(2, patch_size=4, size="micro"), hidden_dim=8, out_dim=8)
    for name, loss_fn, rank_loss in (("nt_xent", nt_xent, lambda ls: sum(ls) / 2), ("barlow", barlow.loss, lambda ls: ls[0])):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        full = loss_fn(a, b)
        full.backward()
        assert rank_loss([r[name][0] for r in ranks]).item() == pytest.approx(full.item(), rel=1e-5)
        if name == "barlow":  # every rank sees the global correlation matrix
            assert ranks[1][name][0].item() == pytest.approx(full.item(), rel=1e-5)
        for r, share in enumerate((slice(0, 4), slice(4, 8))):  # DDP divides the summed gradients by the world size
            torch.testing.assert_close(ranks[r][name][1] / 2, a.grad[share], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ranks[r][name][2] / 2, b.grad[share], rtol=1e-4, atol=1e-6)


def _swav(**kwargs):
    torch.manual_seed(0)
    return SwAVTask(ViT(2, patch_size=4, size="micro"), hidden_dim=16, out_dim=8, n_prototypes=6, **kwargs).train()


def test_swav_queue_joins_the_partition_keeps_the_newest_and_waits_for_its_start():
    task = _swav(queue_length=5, queue_start=0.5)
    views = [torch.rand(3, 2, 1, 16, 16) for _ in range(3)]
    task.step_start(0.2)
    out = task({"views": views[0]})
    assert task.queue is None and out["queue_filled"].item() == 0  # before queue_start: no queue, nothing kept
    task.step_start(0.6)
    task({"views": views[0]})
    task({"views": views[1]})
    assert task.queue.shape == (2, 5, 8) and task.queue_filled == 5  # 3 + 3 projections, the newest 5 kept
    with torch.no_grad():  # the first global view's projections, computed as forward does (BatchNorm over both views)
        z1, z0 = (task._project(None, v.transpose(0, 1).flatten(0, 1))[:3] for v in (views[1], views[0]))
    torch.testing.assert_close(task.queue[0], torch.cat([z1, z0[:2]]), atol=1e-5, rtol=0)  # newest first
    # the codes of the next batch are its rows of one Sinkhorn over batch + queue
    queue = task.queue.clone()
    prototypes = torch.nn.functional.normalize(task.prototypes.detach(), dim=-1)
    with torch.no_grad():
        z = list(task._project(None, views[2].transpose(0, 1).flatten(0, 1)).chunk(2))
    scores = [zi @ prototypes.T for zi in z]
    codes = task._codes(scores, z, prototypes)
    for i in range(2):
        expected = sinkhorn(torch.cat([scores[i], queue[i] @ prototypes.T]), task.epsilon, task.iterations)[:3]
        torch.testing.assert_close(codes[i], expected)
        assert not torch.allclose(codes[i], sinkhorn(scores[i], task.epsilon, task.iterations), atol=1e-3)
    with pytest.raises(ValueError, match="queue_length"):
        _swav(queue_length=-1)


def test_swav_queue_is_saved_resumed_and_not_a_buffer():
    task = _swav(queue_length=4)
    task.step_start(0.5)
    task({"views": torch.rand(3, 2, 1, 16, 16)})
    assert "queue" not in dict(task.named_buffers())  # DDP broadcasts buffers from rank 0; each rank keeps its own queue
    state = task.state_dict()
    resumed = _swav(queue_length=4)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.queue, task.queue)
    assert resumed.queue_filled == 3
    views = torch.rand(3, 2, 1, 16, 16)
    resumed.step_start(0.6)
    task.step_start(0.6)
    torch.testing.assert_close(resumed({"views": views})["loss"], task({"views": views})["loss"])
    torch.testing.assert_close(resumed.queue, task.queue)
    older = {k: v for k, v in state.items() if not k.endswith("_extra_state")}  # saved before the queue was built
    fresh = _swav(queue_length=4)
    fresh.load_state_dict(older, strict=True)  # how a resumed run loads (ignite's load_objects)
    assert fresh.queue is None


def _two_rank_swav_queue(rank, world, init_file, views, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=120))  # a lost peer fails the test, not CI
    task = _swav(queue_length=8)  # 4 per rank
    task.step_start(0.5)
    ddp = torch.nn.parallel.DistributedDataParallel(task)  # broadcast_buffers: on, as the bundles run it
    share = slice(rank * 2, rank * 2 + 2)
    for step in range(2):
        ddp({"views": views[step][share]})["loss"].backward()
    torch.save({"queue": task.queue, "filled": task.queue_filled}, f"{out_dir}/rank{rank}.pt")
    _leave(rank)


def test_swav_queue_under_ddp_is_each_ranks_own(tmp_path):
    views = [torch.rand(4, 2, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    torch.multiprocessing.spawn(_two_rank_swav_queue, args=(2, tmp_path / "init", views, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["queue"].shape for r in ranks] == [(2, 4, 8)] * 2 and [r["filled"] for r in ranks] == [4, 4]
    # the older half (step 1's projections) is each rank's own too: a buffer would hold rank 0's, broadcast by DDP at step 2
    assert not torch.allclose(ranks[0]["queue"][:, 2:], ranks[1]["queue"][:, 2:], atol=1e-3)
