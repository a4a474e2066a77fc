"""The collapse monitor: what it reports on a constant, a one-direction and a random encoder, through an engine."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from medssl.engine import MultiTask
from medssl.engine.collapse import CollapseMonitor, embedding_spread
from medssl.models import ViT
from medssl.tasks import MAETask


class ConstantEncoder(nn.Module):
    """Every image to the same tokens: the collapsed encoder."""

    num_prefix_tokens, embed_dim = 1, 8

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(1, 5, 8))

    def forward(self, x, keep=None, context=None):
        return self.value.expand(x.shape[0], -1, -1)


class _Holder(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _run(network, images, outputs=None, epochs=1):
    def step(engine, batch):
        return (outputs or {}).copy()

    engine = Engine(step)
    engine.network = network
    monitor = CollapseMonitor()
    monitor.attach(engine)
    engine.run([{"image": images}] * 2, max_epochs=epochs)
    return monitor, engine


def test_spread_of_embeddings_by_construction():
    assert embedding_spread(torch.ones(6, 4))["embedding_std"] == 0.0
    v = torch.randn(4)
    line = torch.stack([v, -v, v, -v])  # two antipodal points: one direction
    assert embedding_spread(line)["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    spread = embedding_spread(torch.eye(4))  # four orthogonal unit vectors, centred: rank 3 of equal weight
    assert spread["effective_rank"] == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_monitor_flags_a_constant_encoder_and_not_a_random_one(spatial_dims, caplog):
    images = torch.rand(6, 1, *[16] * spatial_dims)
    with caplog.at_level(logging.INFO, logger="medssl.train"):
        monitor, engine = _run(_Holder(ConstantEncoder()), images)
    assert monitor.last["embedding_std"] == 0.0 and "collapse: every image has the same embedding" in caplog.text
    caplog.clear()
    torch.manual_seed(0)
    vit = ViT(spatial_dims, 1, patch_size=4, size="micro")
    with caplog.at_level(logging.INFO, logger="medssl.train"):
        monitor, engine = _run(MultiTask([MAETask(vit)]), images)
    assert monitor.last["embedding_std"] > 1e-3 and monitor.last["effective_rank"] > 3
    assert "collapse:" not in caplog.text and "collapse check: embedding_std" in caplog.text
    assert engine.state.metrics["effective_rank"] == monitor.last["effective_rank"]  # TensorBoard writes state.metrics
    assert vit.training  # put back in training mode after the check


def test_a_uniform_teacher_is_called_a_plateau(caplog):
    images = torch.rand(4, 1, 16, 16)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="medssl.train"):
        monitor, _ = _run(_Holder(ViT(2, 1, patch_size=4, size="micro")), images, {"teacher_entropy": torch.tensor(0.999)})
    assert monitor.last["teacher_entropy"] == pytest.approx(0.999) and "the teacher is uniform" in caplog.text


@pytest.mark.parametrize("cosine,warned", [(0.9995, True), (0.8, False)])
def test_targets_predicted_without_context_are_called_trivial(cosine, warned, caplog):
    images = torch.rand(4, 1, 16, 16)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="medssl.train"):
        monitor, _ = _run(_Holder(ViT(2, 1, patch_size=4, size="micro")), images, {"prediction_cosine": torch.tensor(cosine)})
    assert monitor.last["prediction_cosine"] == pytest.approx(cosine)
    assert ("the targets are almost constant" in caplog.text) == warned


def test_a_falling_effective_rank_is_called_dimensional_collapse(caplog):
    """Epoch 1: 16 images spread over 8 directions; epoch 2: the same images squeezed onto 2 of them."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(16, 8, generator=g)
    squeezed = spread.clone()
    squeezed[:, 2:] *= 1e-3

    class Table(nn.Module):
        num_prefix_tokens, embed_dim = 0, 8

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.table = spread

        def forward(self, x, keep=None, context=None):
            return self.table[x.flatten(1)[:, 0].long()].unsqueeze(1)

    encoder = Table()
    images = torch.arange(16.0).reshape(16, 1, 1, 1).expand(16, 1, 4, 4).contiguous()
    monitor = CollapseMonitor()

    def step(engine, batch):
        return {}

    engine = Engine(step)
    engine.network = _Holder(encoder)
    monitor.attach(engine)

    @engine.on(__import__("ignite.engine", fromlist=["Events"]).Events.EPOCH_STARTED)
    def _squeeze(e):
        if e.state.epoch == 2:
            encoder.table = squeezed

    with caplog.at_level(logging.INFO, logger="medssl.train"):
        engine.run([{"image": images}], max_epochs=2)
    assert monitor.first_rank > 6 and monitor.last["effective_rank"] < 2.5
    assert "the embeddings are losing dimensions" in caplog.text
