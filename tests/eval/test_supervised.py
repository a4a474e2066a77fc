"""Fine-tuning / from-scratch training on the training engine: it learns, layer-wise LR decay, early stopping restores the best."""

from __future__ import annotations

import pytest
import torch

from medssl.eval.supervised import layer_decay_groups, train_classifier
from medssl.models import ViT
from medssl.tasks import ClassificationTask


def _images(spatial_dims, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, *[8] * spatial_dims, generator=g) * 0.2
    x[y == 1, :, :4] += 0.8  # class 1: a bright half
    return x, y


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fine_tuning_a_vit_learns_an_easy_task(spatial_dims):
    torch.manual_seed(0)
    model = ClassificationTask(ViT(spatial_dims, 1, patch_size=4, size="micro"), num_classes=2, pooling="mean")
    x, y = _images(spatial_dims)
    result = train_classifier(model, x[:48], y[:48], x[48:], y[48:], epochs=15, batch_size=16, lr=3e-3, patience=15)
    assert result["history"][result["best_epoch"]]["auc"] == 1.0
    probs = model.predict(x[48:])  # the restored best weights reproduce the best epoch's AUC
    from medssl.eval import classification_metrics

    assert probs.shape == (16, 2) and classification_metrics(y[48:].numpy(), probs)["auc"] == 1.0


def test_monai_resnet18_baseline_trains_through_the_same_loop():
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    x, y = _images(3, n=24)
    model = ClassificationTask(resnet18(spatial_dims=3, n_input_channels=1, num_classes=2), num_classes=2, pooling=None)
    result = train_classifier(model, x[:16], y[:16], x[16:], y[16:], epochs=2, batch_size=8, layer_decay=None)
    assert result["epochs_run"] == 2


def test_layer_decay_gives_deeper_layers_larger_rates():
    model = ClassificationTask(ViT(2, 1, patch_size=4, size="micro", depth=3), num_classes=2)
    groups = layer_decay_groups(model, lr=1.0, decay=0.5)
    by_name = {id(p): g for g in groups for p in g["params"]}
    lr = {n: by_name[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lr["head.weight"] == 1.0 and lr["backbone.norm.weight"] == 1.0
    assert lr["backbone.blocks.2.mlp.linear1.weight"] == 0.5 and lr["backbone.blocks.0.mlp.linear1.weight"] == 0.125
    assert lr["backbone.patch_embed.weight"] == 0.0625 and lr["backbone.cls_token"] == 0.0625
    assert by_name[id(model.head.bias)]["weight_decay"] == 0.0 and by_name[id(model.head.weight)]["weight_decay"] > 0


def test_early_stopping_stops_and_restores_the_best_weights():
    torch.manual_seed(0)
    model = ClassificationTask(ViT(2, 1, patch_size=4, size="micro"), num_classes=2)
    x, y = _images(2, n=32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_classifier(model, x[:16], y[:16], x[16:], y[16:], epochs=20, lr=0.0, patience=2, warmup_epochs=0)
    assert result["epochs_run"] == 3 and result["best_epoch"] == 0  # lr 0: nothing improves after epoch 0
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_balanced_class_weights_match_inverse_frequency_and_average_one():
    from medssl.tasks.classify import balanced_class_weights

    torch.testing.assert_close(balanced_class_weights([0, 0, 0, 1], 2), torch.tensor([4 / 6, 2.0]))
    w = balanced_class_weights(torch.tensor([0, 0, 1, 1, 2, -1]), 4)  # -1 unlabelled; class 3 absent
    torch.testing.assert_close(w, torch.tensor([5 / 6, 5 / 6, 5 / 3, 1.0]))
    assert w[torch.tensor([0, 0, 1, 1, 2])].mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_class_weights_weight_each_item_in_forward_and_per_sample_loss(spatial_dims):
    torch.manual_seed(0)
    model = ClassificationTask(ViT(spatial_dims, 1, patch_size=4, size="micro"), num_classes=2, pooling="mean")
    x, y = _images(spatial_dims, n=8)
    y[0] = -1  # unlabelled: no loss
    batch = {"image": x, "label": y}
    plain = model.per_sample_loss(batch)
    model.set_class_weights([0.5, 3.0])
    weighted = model.per_sample_loss(batch)
    expected = plain * torch.where(y == 1, 3.0, 0.5)
    expected[0] = 0.0
    torch.testing.assert_close(weighted, expected)
    assert model(batch)["loss"].item() == pytest.approx(weighted[1:].mean().item(), rel=1e-6)
    assert "class_weights" not in model.state_dict()  # not weights: checkpoints keep their keys
    with pytest.raises(ValueError, match="class_weights must be 2 finite numbers"):
        model.set_class_weights([1.0, -1.0])


def test_balanced_fine_tuning_does_not_learn_the_majority_class_alone():
    """Five labels of the minority class among 50: with plain cross-entropy the head predicts the majority class for
    every image although it ranks them perfectly (balanced accuracy 0.5, as 1 % PneumoniaMNIST fine-tuning did, issue
    #18); balanced weights give the minority class its share of the loss, and early stopping on AUC and balanced
    accuracy together keeps an epoch whose decisions follow the ranking."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 8, 8, generator=g) * 0.2
    y = torch.zeros(100, dtype=torch.long)
    y[::10] = 1
    x[y == 1, :, :4] += 0.4
    from medssl.eval import classification_metrics

    scores = {}
    for class_weight in ("none", "balanced"):
        torch.manual_seed(0)
        model = ClassificationTask(ViT(2, 1, patch_size=4, size="micro"), num_classes=2, pooling="mean")
        train_classifier(model, x[:50], y[:50], x[50:], y[50:], epochs=6, batch_size=16, lr=1e-3, patience=6,
                         class_weight=class_weight)
        scores[class_weight] = classification_metrics(y[50:].numpy(), model.predict(x[50:]))["balanced_accuracy"]
    assert scores["none"] == pytest.approx(0.5) and scores["balanced"] > 0.9
    with pytest.raises(ValueError, match="class_weight must be one of balanced, none"):
        train_classifier(model, x[:8], y[:8], x[8:16], y[8:16], epochs=1, class_weight="inverse")


def test_early_stopping_selects_on_auc_and_balanced_accuracy_together():
    from medssl.eval.supervised import selection_score

    ranks_only = {"auc": 1.0, "balanced_accuracy": 0.5, "accuracy": 0.9}
    decides_too = {"auc": 0.98, "balanced_accuracy": 0.9, "accuracy": 0.9}
    assert selection_score(decides_too) > selection_score(ranks_only)
    assert selection_score({"auc": float("nan"), "balanced_accuracy": 0.4, "accuracy": 0.4}) == 0.4  # one class: accuracy
