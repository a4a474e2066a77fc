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
