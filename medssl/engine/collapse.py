"""Is the objective learning or collapsing? A per-epoch look at the encoder's embeddings.

Self-supervised objectives fail quietly: an encoder that maps every image to one point (or to a
line) still gives a finite, even falling, loss. :class:`CollapseMonitor` embeds the last batch of
every epoch with the shared backbone (eval mode, no gradient) and reports

- ``embedding_std``: the standard deviation over images of the L2-normalised embeddings,
  averaged over dimensions (0: every image has the same embedding; unit vectors spread evenly
  over all ``D`` dimensions give ``1 / sqrt(D)``; a freshly initialised ViT sits far below that,
  its images all alike, so only a spread at float noise is called collapse);
- ``effective_rank``: ``exp`` of the entropy of the normalised singular values of the centred
  embeddings (Roy & Vetterli, 2007): 1 when the images vary along one direction only, up to
  ``min(batch, dim)``; scale-free, so it also sees dimensional collapse: a fall to a third of
  its first-epoch value is warned about (I-JEPA at a 4-minute budget went from 6.2 to 1.8);
- ``teacher_entropy``: where the task logs one (DINO), the epoch's mean: 1 is the uniform
  plateau, 0 a single prototype for every image;
- ``prediction_cosine``: where the task logs one (I-JEPA), the epoch's mean cosine between
  predicted and target representations: near 1 the targets are so alike that the predictor
  matches them without reading the context (the reference's layer-normed targets reached 0.9995
  by epoch 3 on PneumoniaMNIST), so the encoder gets no signal.

The values go to ``engine.state.metrics`` (MONAI's TensorBoard handler writes them every epoch)
and to the log; a warning names the one at its collapse value.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from ignite.engine import Events

from ..distributed import is_main_process
from ..models.base import embed
from .checkpoint import unwrap

__all__ = ["CollapseMonitor", "embedding_spread"]

logger = logging.getLogger("medssl.train")

COLLAPSED_STD = 1e-6  # spread under which all images share one embedding (float noise); not a scale of healthy
# training: a fresh ViT-Tiny on AdrenalMNIST3D sits at 6e-4 and MAE passes through 6e-5 in its first epochs
RANK_DROP = 3.0  # the effective rank fell to a third of its first-epoch value: dimensions are being lost
COLLAPSED_RANK = 1.5  # the images vary along a single direction
PLATEAU_ENTROPY = 0.995  # a teacher this close to uniform tells the student nothing
ONE_HOT_ENTROPY = 0.005  # every image on one prototype
TRIVIAL_PREDICTION = 0.999  # predictions this close to the targets: the targets carry (almost) nothing to predict
EPOCH_MEANS = ("teacher_entropy", "prediction_cosine")  # logged per step by some tasks, averaged over the epoch


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> dict[str, float]:
    """``embedding_std`` and ``effective_rank`` of embeddings ``(B, D)`` (module docstring)."""
    z = F.normalize(z.float(), dim=-1)
    std = float(z.std(0, unbiased=False).mean())
    centred = z - z.mean(0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    if float(s.sum()) <= 1e-12:
        rank = 0.0
    else:
        p = s / s.sum()
        rank = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
    return {"embedding_std": std, "effective_rank": rank}


class CollapseMonitor:
    """Per-epoch collapse figures of the backbone on the epoch's last batch (``image``), from rank 0.

    Args:
        pooling: how tokens become one vector (``mean``; ``cls`` for DINO-like tasks is also fine).
        max_images: at most this many images of the batch are embedded (they are already in memory).
    """

    def __init__(self, pooling: str = "mean", max_images: int = 64) -> None:
        self.pooling, self.max_images = pooling, max_images
        self._images = None
        self._means: dict[str, list[float]] = {k: [] for k in EPOCH_MEANS}
        self.last: dict[str, float] = {}
        self.first_rank: float | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _keep(self, engine) -> None:
        batch = engine.state.batch
        if isinstance(batch, dict) and torch.is_tensor(batch.get("image")):
            self._images = batch["image"][: self.max_images]
        output = engine.state.output if isinstance(engine.state.output, dict) else {}
        for key, values in self._means.items():
            if output.get(key) is not None:
                values.append(float(output[key]))

    def _report(self, engine) -> None:
        if self._images is None:
            return
        backbone = unwrap(engine.network).backbone
        was_training = backbone.training
        backbone.eval()
        try:
            x = self._images.to(next(backbone.parameters()).device)
            if x.shape[0] < 2:
                return
            figures = embedding_spread(embed(backbone, x, self.pooling))
        finally:
            backbone.train(was_training)
        figures.update({k: sum(v) / len(v) for k, v in self._means.items() if v})
        self._means, self.last = {k: [] for k in EPOCH_MEANS}, figures
        engine.state.metrics.update(figures)
        if not is_main_process():
            return
        problems = []
        if figures["embedding_std"] < COLLAPSED_STD:
            problems.append(f"every image has the same embedding (embedding_std {figures['embedding_std']:.2g})")
        elif len(x) >= 8 and figures["effective_rank"] < COLLAPSED_RANK:  # a few images cannot show more directions
            problems.append(f"the embeddings vary along one direction only (effective_rank {figures['effective_rank']:.2f})")
        elif len(x) >= 8 and self.first_rank and figures["effective_rank"] < self.first_rank / RANK_DROP:
            problems.append(f"the effective rank fell from {self.first_rank:.2f} to {figures['effective_rank']:.2f}: "
                            "the embeddings are losing dimensions (dimensional collapse)")
        if self.first_rank is None and len(x) >= 8:
            self.first_rank = figures["effective_rank"]
        entropy = figures.get("teacher_entropy")
        if entropy is not None and entropy > PLATEAU_ENTROPY:
            problems.append(f"the teacher is uniform (teacher_entropy {entropy:.3f}): the student learns nothing from it")
        elif entropy is not None and entropy < ONE_HOT_ENTROPY:
            problems.append(f"the teacher puts every image on one prototype (teacher_entropy {entropy:.3f})")
        cosine = figures.get("prediction_cosine")
        if cosine is not None and cosine > TRIVIAL_PREDICTION:
            problems.append(f"the targets are almost constant (prediction_cosine {cosine:.4f}): the predictor matches them "
                            "without reading the context (I-JEPA: ijepa_target_norm batch)")
        shown = "  ".join(f"{k} {v:.4g}" for k, v in figures.items())
        logger.info("epoch %d collapse check: %s", engine.state.epoch, shown)
        for p in problems:
            logger.warning("epoch %d: collapse: %s", engine.state.epoch, p)
