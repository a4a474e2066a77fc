"""Dynamic Batch Adaptation and Efficient DBA: per-sample gradients, selection, the batch-size rule, training, resume, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl.eval.supervised import train_classifier
from medssl.models import ViT
from medssl.optim import DBA, EDBA, batch_size_rule, build_optimizer, margin_loss, per_sample_gradients, select_strides
from medssl.optim.per_sample import NotPerSample, linear_per_sample, stride_gradients
from medssl.tasks import ClassificationTask, MAETask

ROOT = Path(__file__).resolve().parents[2]


def _vit_task(spatial_dims: int, num_classes: int = 3) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(ViT(spatial_dims, 1, patch_size=4, size="micro", window_size=0), num_classes)


def _batch(spatial_dims: int, n: int = 10, num_classes: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 1, *[8] * spatial_dims, generator=g), "label": torch.randint(0, num_classes, (n,), generator=g)}


def _plain_gradients(task, batch) -> dict[str, torch.Tensor]:
    """The ordinary backward pass's gradients (of the batch's mean loss); the task's ``.grad`` are cleared after."""
    task.zero_grad()
    task(batch)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters()}
    task.zero_grad()
    return grads


def _loop_gradients(task, batch) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(batch["label"])):
        task.zero_grad()
        task({k: v[i:i + 1] for k, v in batch.items()})["loss"].backward()
        out.append({n: p.grad.clone() for n, p in task.named_parameters()})
    return out


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_sample_gradients_equal_a_loop_of_single_sample_backward_passes(spatial_dims):
    task, batch = _vit_task(spatial_dims), _batch(spatial_dims, n=5)
    losses, grads = per_sample_gradients(task, batch)
    loop = _loop_gradients(task, batch)
    assert losses.shape == (5,)
    for name, param in task.named_parameters():
        assert grads[name].shape == (5, *param.shape)
        for i in range(5):
            torch.testing.assert_close(grads[name][i], loop[i][name], atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_sample_gradients_of_long_token_sequences_stay_exact_and_quiet(spatial_dims):
    """Above CPU_SHORT_TOKENS attention is SDPA, which vmap can only run by a slow fallback loop that warns on every
    call; per-sample gradients use the written-out attention there (AdrenalMNIST3D at 28^3 / patch 4 has 343 tokens)."""
    import warnings

    from medssl.models.blocks import CPU_SHORT_TOKENS

    task = _vit_task(spatial_dims)
    size = 64 if spatial_dims == 2 else 28
    assert (size // 4) ** spatial_dims > CPU_SHORT_TOKENS
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(2, 1, *[size] * spatial_dims, generator=g), "label": torch.tensor([0, 2])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's "There is a performance drop ..." would fail here
        _, grads = per_sample_gradients(task, batch)
    loop = _loop_gradients(task, batch)
    for name, _ in task.named_parameters():
        for i in range(2):
            torch.testing.assert_close(grads[name][i], loop[i][name], atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_stride_gradients_sum_their_samples_and_the_short_last_stride_is_padded_with_nothing(spatial_dims):
    task, batch = _vit_task(spatial_dims), _batch(spatial_dims, n=7)
    _, per_sample = per_sample_gradients(task, batch)
    losses, strides, counts = stride_gradients(task, batch, stride_size=3)
    assert counts.tolist() == [3, 3, 1] and losses.shape == (7,)
    for name, g in strides.items():
        expected = torch.stack([per_sample[name][0:3].sum(0), per_sample[name][3:6].sum(0), per_sample[name][6:7].sum(0)])
        torch.testing.assert_close(g, expected, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_choosing_every_stride_reproduces_the_plain_mean_gradient(spatial_dims):
    task, batch = _vit_task(spatial_dims), _batch(spatial_dims, n=10)
    plain = _plain_gradients(task, batch)
    dba = DBA(torch.optim.SGD(task.parameters(), lr=0.1), stride_size=3, strategy="all", batch_size=10)
    out = dba.compute_gradients(task, batch)
    for name, param in task.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], atol=1e-6, rtol=1e-5)
    assert float(out["selected"]) == 10.0 and dba.epoch_values == [10.0] * len(dba.epoch_values)


def test_selection_keeps_the_consistent_strides_and_drops_the_conflicting_one():
    # strides 0-2 point along +x (with a little noise), stride 3 points the other way
    means = torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.1, 0.0], [-1.0, 0.0]])
    counts = torch.tensor([4.0, 4.0, 4.0, 4.0])
    sums = means * counts[:, None]
    assert select_strides(sums, counts, "variance_norm").tolist() == [0, 1, 2]
    assert select_strides(sums, counts, "all").tolist() == [0, 1, 2, 3]
    assert select_strides(sums, counts, "gradient_norm").tolist() == [0, 1, 2]
    # the batch's noise, not the chosen set's own spread: two strides agreeing by chance do not win over five that agree
    rng = torch.Generator().manual_seed(0)
    noisy = torch.ones(6, 50) + 0.5 * torch.randn(6, 50, generator=rng)
    assert select_strides(noisy, torch.ones(6), "variance_norm").tolist() == [0, 1, 2, 3, 4, 5]
    # equal strides: nothing to gain by dropping any, the variance-norm strategy keeps all of them
    same = torch.ones(5, 3)
    assert select_strides(same * 2, torch.full((5,), 2.0), "variance_norm").tolist() == [0, 1, 2, 3, 4]
    # the parameters of one layer are judged together: a strong conflict in the bias alone drops the stride, a weak one does not
    weight = torch.ones(4, 2, 2)
    strong, weak = torch.tensor([[2.0], [2.0], [2.0], [-2.0]]), torch.tensor([[1.0], [1.0], [1.0], [-1.0]])
    assert select_strides([weight, strong], torch.ones(4), "variance_norm").tolist() == [0, 1, 2]
    assert select_strides([weight, weak], torch.ones(4), "variance_norm").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select_strides(sums, counts, "median")


def test_the_batch_size_rule_of_the_source_on_hand_made_q():
    assert batch_size_rule(64, q=60, delta=8, low=8, high=512) == 72  # q > 0.8 * 64 = 51.2: grow
    assert batch_size_rule(64, q=51, delta=8, low=8, high=512) == 64  # in between: stay
    assert batch_size_rule(64, q=13, delta=8, low=8, high=512) == 64  # 12.8 < 13: stay
    assert batch_size_rule(64, q=12, delta=8, low=8, high=512) == 56  # q < 0.2 * 64: shrink
    assert batch_size_rule(508, q=500, delta=8, low=8, high=512) == 512  # clipped to the bounds
    assert batch_size_rule(10, q=1, delta=8, low=8, high=512) == 8


def test_dba_moves_the_batch_size_by_the_median_of_the_epochs_choices():
    dba = DBA(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), batch_size=64, min_batch_size=8, max_batch_size=128, delta=16)
    dba.epoch_values = [60.0, 64.0, 10.0]  # median 60 > 51.2
    assert dba.next_batch_size() == 80 and dba.history[-1] == {"batch_size": 64, "statistic": 60.0, "next": 80}
    dba.epoch_values = [8.0, 8.0, 80.0]  # median 8 < 16
    assert dba.next_batch_size() == 64
    assert dba.next_batch_size() == 64 and len(dba.history) == 2  # an epoch without steps changes nothing
    # ten images and a batch of 64: the epoch's batch was the ten; choosing all ten grows nothing past the data
    dba.saw_batch(10)
    dba.epoch_values = [10.0, 10.0]
    assert dba.next_batch_size() == 10
    dba.saw_batch(10)
    dba.epoch_values = [1.0, 1.0]  # 1 < 0.2 * 10: shrink from the ten, not from 64
    assert dba.next_batch_size() == 8


def test_margin_loss_on_a_hand_made_case():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    # per sample: max(0, 1 - (2 - 1)) = 0; 1 - (0 - 1) = 2; 1 - (0 - 3) = 4
    assert float(margin_loss(logits, labels)) == pytest.approx(2.0)
    assert float(margin_loss(logits, labels, margin=0.0)) == pytest.approx((0 + 1 + 3) / 3)
    stacked = margin_loss(torch.stack([logits, logits * 0]), labels)  # candidates x samples x classes
    assert stacked.tolist() == pytest.approx([2.0, 1.0])
    # balanced: class 0's mean (0 + 2) / 2 = 1 and class 2's 4 weigh alike: (1 + 4) / 2
    assert float(margin_loss(logits, labels, balanced=True)) == pytest.approx(2.5)
    assert margin_loss(torch.stack([logits, logits * 0]), labels, balanced=True).tolist() == pytest.approx([2.5, 1.0])


def test_linear_per_sample_gradients_equal_the_loop():
    layer = nn.Linear(6, 3)
    x, y = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0])
    seen = {}
    out = layer(x)
    out.register_hook(lambda g: seen.setdefault("g", g))
    nn.functional.cross_entropy(out, y).backward()
    dw, db = linear_per_sample(x, seen["g"], scale=5)
    for i in range(5):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(x[i:i + 1]), y[i:i + 1]).backward()
        torch.testing.assert_close(dw[i], layer.weight.grad)
        torch.testing.assert_close(db[i], layer.bias.grad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_edba_sets_the_last_layer_to_the_candidate_with_the_lowest_look_ahead_margin(spatial_dims):
    task, batch = _vit_task(spatial_dims), _batch(spatial_dims, n=12)
    plain = _plain_gradients(task, batch)
    edba = EDBA(torch.optim.SGD(task.parameters(), lr=0.5), task, candidates=8, batch_size=12)
    assert edba.layer is task.head
    torch.manual_seed(3)
    out = edba.compute_gradients(task, batch)
    for name, param in task.named_parameters():  # every other layer: the ordinary backward pass
        if not name.startswith("head."):
            torch.testing.assert_close(param.grad, plain[name])
    # the reported margin is the look-ahead margin of the gradient it set
    with torch.no_grad():
        feats = task.embed(batch, batch["image"], "cls")
        w = task.head.weight - 0.5 * task.head.weight.grad
        b = task.head.bias - 0.5 * task.head.bias.grad
        assert float(margin_loss(feats @ w.T + b, batch["label"])) == pytest.approx(float(out["margin"]), rel=1e-4)
        whole = margin_loss(feats @ (task.head.weight - 0.5 * plain["head.weight"]).T + task.head.bias - 0.5 * plain["head.bias"],
                            batch["label"])
    assert float(out["margin"]) <= float(whole) + 1e-6  # never worse than the whole batch, which is a candidate
    assert 1 <= float(out["selected"]) <= 12


@pytest.mark.parametrize("optimizer, options", [("dba-sgd", {"strategy": "gradient_norm"}), ("edba-sgd", {})])
def test_a_tiny_training_run_lowers_the_loss_and_adapts_the_batch_size(optimizer, options):
    torch.manual_seed(0)
    x = torch.randn(96, 1, 4, 4)
    y = (x.flatten(1)[:, :8].sum(1) > 0).long()
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    task = ClassificationTask(net, 2, pooling=None)
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(net(x), y))
    result = train_classifier(task, x, y, x[:32], y[:32], epochs=8, batch_size=32, lr=0.05, weight_decay=0.0, layer_decay=None,
                              patience=100, warmup_epochs=0, optimizer=optimizer, optimizer_options={"delta": 8, **options})
    with torch.no_grad():
        after = float(nn.functional.cross_entropy(net(x), y))
    assert after < 0.7 * before
    sizes = result["batch_sizes"]
    assert len(sizes) == 8 and sizes[0] == 32 and all(4 <= s <= 256 for s in sizes)  # the default bounds: [32 // 8, 8 * 32]
    assert len(set(sizes)) > 1  # the batch size moved (by delta) at least once


def test_the_adaptive_schedule_equals_the_per_step_one_while_the_batch_size_stays():
    import medssl.engine.trainer as trainer_module

    lrs: dict[str, list[float]] = {}
    real = trainer_module.PretrainTrainer._iteration

    x, y = torch.randn(200, 1, 8, 8), torch.randint(0, 3, (200,))
    for name, opt, options in [("plain", "sgd", None), ("dba", "dba-sgd", {"delta": 0})]:
        def spy(self, engine, batch, name=name):
            out = real(self, engine, batch)
            lrs.setdefault(name, []).append(out["lr"])
            return out
        trainer_module.PretrainTrainer._iteration = spy
        try:
            train_classifier(ClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 3, pooling=None), x, y, x[:50], y[:50],
                             epochs=4, batch_size=64, layer_decay=None, patience=99, warmup_epochs=1, optimizer=opt,
                             optimizer_options=options)
        finally:
            trainer_module.PretrainTrainer._iteration = real
    assert len(lrs["plain"]) == len(lrs["dba"]) == 16
    assert lrs["dba"] == pytest.approx(lrs["plain"])


def _epochs(task, opt, x, y, epochs: int, start: int = 0) -> None:
    """A plain loop of Algorithm 4: batches of the optimizer's size, a DBA step each, the next size after each epoch."""
    for epoch in range(start, start + epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), opt.batch_size):
            idx = order[i:i + opt.batch_size]
            opt.zero_grad()
            opt.compute_gradients(task, {"image": x[idx], "label": y[idx]})
            opt.step()
        opt.next_batch_size()


def test_a_resumed_dba_run_continues_with_the_same_batch_size_and_state(tmp_path):
    x, y = torch.randn(80, 1, 8, 8), torch.randint(0, 3, (80,))

    def fresh():
        torch.manual_seed(0)
        task = ClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)), 3, pooling=None)
        return task, build_optimizer("dba-adam", task.parameters(), task, lr=0.01, batch_size=32,
                                     strategy="gradient_norm", delta=4, min_batch_size=8)

    task, opt = fresh()
    _epochs(task, opt, x, y, 6)
    uninterrupted = ({n: p.clone() for n, p in task.named_parameters()}, opt.batch_size, list(opt.history))
    task, opt = fresh()
    _epochs(task, opt, x, y, 3)
    torch.save({"network": task.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    del task, opt  # killed
    task, opt = fresh()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    task.load_state_dict(saved["network"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.batch_size == saved["optimizer"]["adaptive"]["batch_size"]
    _epochs(task, opt, x, y, 3, start=3)
    assert opt.batch_size == uninterrupted[1] and opt.history == uninterrupted[2]
    assert uninterrupted[1] != 32  # the run did adapt, so the check above means something
    for name, param in task.named_parameters():
        torch.testing.assert_close(param, uninterrupted[0][name])


def test_dba_is_refused_with_one_line_where_it_cannot_run(monkeypatch):
    from medssl.engine import PretrainTrainer
    from medssl.engine import trainer as trainer_module
    from medssl.optim.names import UnknownOptimizer

    vit = ViT(2, 1, patch_size=4, size="micro", window_size=0)
    mae = MAETask(vit)
    with pytest.raises(NotPerSample, match="MAETask has no per-sample loss"):
        DBA(torch.optim.SGD(mae.parameters(), lr=0.1)).compute_gradients(mae, {"image": torch.randn(4, 1, 16, 16)})
    bn = ClassificationTask(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)), 2, pooling=None)
    with pytest.raises(NotPerSample, match="batch norm"):
        DBA(torch.optim.SGD(bn.parameters(), lr=0.1)).compute_gradients(bn, {"image": torch.randn(4, 1, 8, 8),
                                                                              "label": torch.tensor([0, 1, 0, 1])})
    with pytest.raises(UnknownOptimizer, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", bn.parameters())
    with pytest.raises(UnknownOptimizer, match="no option candidates"):
        build_optimizer("dba", bn.parameters(), candidates=4)
    task = _vit_task(2)
    loader = torch.utils.data.DataLoader([{"image": torch.zeros(1, 8, 8), "label": 0}] * 4, batch_size=2)
    monkeypatch.setattr(trainer_module, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="does not run under DDP"):
        PretrainTrainer("cpu", 1, loader, task, build_optimizer("dba", task.parameters()))
    monkeypatch.setattr(trainer_module, "world_size", lambda: 1)
    with pytest.raises(ValueError, match="trains one supervised task"):
        PretrainTrainer("cpu", 1, loader, [task, MAETask(task.backbone)], build_optimizer("edba", task.parameters(), task))


def _checkpoint_and_labels(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "model.pt"
    torch.save(ViT(2, 1, patch_size=4, size="micro", window_size=0).state_dict(), ckpt)
    rows = ["image,label,split"]
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        label = i % 2
        img = (torch.rand(16, 16, generator=g) * 80 + 160 * label).clamp(0, 255).byte().numpy()
        Image.fromarray(img).save(tmp_path / f"x{i}.png")
        rows.append(f"{tmp_path / f'x{i}.png'},{label},{'train' if i < 16 else 'val'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return ckpt, tmp_path / "labels.csv"


@pytest.mark.parametrize("optimizer", ["dba", "edba-sgd"])
def test_evaluate_fine_tunes_with_dba_through_monai_bundle_run(optimizer, tmp_path):
    """The user's path: the bundle's evaluate.yaml with `--optimizer` given to MONAI's runner."""
    ckpt, labels = _checkpoint_and_labels(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "bundles" / "mae_xray_2d" / "configs" / "evaluate.yaml"),
           "--bundle_root", str(ROOT / "bundles" / "mae_xray_2d"), "--output_dir", str(out), "--ckpt_path", str(ckpt),
           "--dataset_dir", str(labels), "--vit_size", "micro", "--patch_size", "4", "--image_size", "16", "--window_size", "0",
           "--methods", "['finetune']", "--baselines", "['scratch']", "--poolings", "['cls']", "--fractions", "[1.0]",
           "--seeds", "1", "--epochs", "3", "--optimizer", optimizer, "--dba_strategy", "gradient_norm",
           "--class_weight", "none" if optimizer == "dba" else "balanced"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (out / "evaluation" / "records.jsonl").read_text().splitlines()
    header = json.loads(lines[0])["header"]
    assert header["plan"]["optimizer"] == optimizer and header["plan"]["dba_strategy"] == "gradient_norm"
    assert header["plan"]["class_weight"] == ("none" if optimizer == "dba" else "balanced")
    records = [json.loads(line) for line in lines[1:]]
    assert {r["method"] for r in records} == {"finetune", "scratch"} and {r["optimizer"] for r in records} == {optimizer}
    report = (out / "evaluation" / "results.md").read_text()
    assert f"Fine-tuning and trained baselines: {optimizer}" in report
    assert ("plain cross-entropy" if optimizer == "dba" else "class-balanced cross-entropy") in report


def test_medssl_evaluate_takes_the_optimizer_and_keeps_resnet_on_dbas_inner_optimizer(tmp_path, capsys):
    from medssl.cli import main

    ckpt, labels = _checkpoint_and_labels(tmp_path)
    (ckpt.parent.parent / "run.json").write_text(json.dumps({"bundle": "mae_xray_2d", "overrides": {
        "vit_size": "micro", "patch_size": 4, "image_size": 16, "window_size": 0}}))
    out = tmp_path / "ev"
    assert main(["-q", "evaluate", "--checkpoint", str(ckpt), "--data", str(labels), "--out", str(out), "--methods", "finetune",
                 "--baselines", "scratch,resnet18", "--poolings", "cls", "--fractions", "1", "--seeds", "1", "--epochs", "2",
                 "--optimizer", "dba-sgd"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["plan"]["class_weight"] == "balanced"  # the default
    records = result["records"]
    assert {r["method"]: r["optimizer"] for r in records} == {"finetune": "dba-sgd", "scratch": "dba-sgd", "resnet18": "sgd"}
    assert "dba-sgd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["-q", "evaluate", "--checkpoint", str(ckpt), "--data", str(labels), "--out", str(out), "--optimizer", "dbaa"])
    assert stopped.value.code == 2 and "invalid choice: 'dbaa'" in capsys.readouterr().err
