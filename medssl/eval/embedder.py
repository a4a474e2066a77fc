"""Embeddings as a MONAI evaluator: an inferer that pools (and tiles 3D volumes), a handler that writes the ``.npz``.

The inference bundles run ``SupervisedEvaluator(network, inferer=EmbeddingInferer, val_handlers=[EmbeddingWriter])``
as model-zoo inference bundles do, so MONAI's workflow checks find the ``evaluator`` and ``inferer``
they expect and users can add their own handlers. :func:`write_embeddings` builds the same evaluator
from Python.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.inferers import Inferer

from ..atomic import atomic_write
from .features import embed_image, load_encoder

__all__ = ["EmbeddingInferer", "EmbeddingWriter", "LoadEncoder", "embedding_evaluator", "write_embeddings"]

logger = logging.getLogger(__name__)


class EmbeddingInferer(Inferer):
    """``(B, C, *spatial)`` images -> ``(B, F)`` embeddings with ``pooling``; 3D images larger than ``tile`` are tiled."""

    def __init__(self, pooling: str = "mean", tile: int | Sequence[int] | None = None) -> None:
        self.pooling, self.tile = pooling, tile

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        tile = self.tile if inputs.ndim == 5 else None  # 2D images are embedded whole
        return torch.stack([embed_image(network, img, self.pooling, tile).float() for img in inputs])


class LoadEncoder:
    """Load encoder weights into ``network`` when the evaluator starts (so building the workflow needs no weights yet)."""

    def __init__(self, checkpoint: str | os.PathLike, network: torch.nn.Module) -> None:
        self.checkpoint, self.network = checkpoint, network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: load_encoder(self.network, self.checkpoint))


class EmbeddingWriter:
    """Collect each iteration's ``pred`` with the batch's ``patient`` and ``label``; write ``out_file`` at the end.

    The file holds ``embeddings`` (N, F), ``patient`` (salted hashes, never names), ``label`` when
    every item has one, and ``pooling``; it is written atomically.
    """

    def __init__(self, out_file: str | os.PathLike, pooling: str = "mean") -> None:
        self.out_file, self.pooling = Path(out_file), pooling
        self._reset()

    def _reset(self, engine=None) -> None:
        self.feats: list[torch.Tensor] = []
        self.patients: list[str] = []
        self.labels: list[int] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine) -> None:
        pred = engine.state.output["pred"].detach().float().cpu()
        batch = engine.state.batch
        self.feats.append(pred)
        self.patients += [str(p) for p in batch.get("patient", [""] * len(pred))]
        if "label" in batch:
            self.labels += [int(v) for v in torch.as_tensor(batch["label"]).reshape(len(pred), -1)[:, 0]]

    def _write(self, engine) -> None:
        if not self.feats:
            raise ValueError("no images to embed")
        result = {"embeddings": torch.cat(self.feats).numpy(), "patient": np.asarray(self.patients)}
        if self.labels and len(self.labels) == len(result["embeddings"]):
            result["label"] = np.asarray(self.labels)
        with atomic_write(self.out_file) as f:
            np.savez(f, pooling=np.asarray(self.pooling), **result)
        logger.info("wrote %s (%d embeddings of size %d)", self.out_file, *result["embeddings"].shape)


def embedding_evaluator(network: torch.nn.Module, dataloader, out_file: str | os.PathLike, pooling: str = "mean",
                        tile: int | Sequence[int] | None = None, device: str | torch.device | None = None,
                        progress: bool = True):
    """The inference bundles' evaluator: ``.run()`` writes ``out_file``."""
    from monai.engines import SupervisedEvaluator

    device = torch.device(device) if device else next(network.parameters()).device
    evaluator = SupervisedEvaluator(device=device, val_data_loader=dataloader, network=network.to(device),
                                    inferer=EmbeddingInferer(pooling, tile), val_handlers=[EmbeddingWriter(out_file, pooling)],
                                    decollate=False)
    if progress and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(desc=f"embedding ({pooling})").attach(evaluator)
    return evaluator


def write_embeddings(network: torch.nn.Module, dataloader, out_file: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                     pooling: str = "mean", tile: int | Sequence[int] | None = None, device: str | torch.device | None = None,
                     progress: bool = True) -> Path:
    """Embed every image of ``dataloader`` (weights from ``checkpoint`` if given) and write an ``.npz``."""
    if checkpoint is not None:
        load_encoder(network, checkpoint)
    embedding_evaluator(network, dataloader, out_file, pooling, tile, device, progress).run()
    return Path(out_file)
