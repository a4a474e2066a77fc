"""I-JEPA (Assran et al., CVPR 2023, arXiv:2301.08243): predict the representations of hidden blocks.

The first source document's future work. From a large context block of an image, a predictor
must produce what an EMA target encoder makes of several target blocks of the same image: the
prediction happens in representation space, not in pixels, so the encoder is not asked for
pixel-level detail (MAE's reconstruction) nor for invariance to hand-made augmentations
(contrastive views).

- Masks come from the data pipeline (:func:`medssl.data.block_masks.jepa_blocks`): ``jepa_context``
  ``(B, N)`` and ``jepa_targets`` ``(B, M, N)`` over the token grid, targets removed from the context.
- Context encoder = the shared backbone on the context tokens only (slots grouped by attention
  window, :func:`~medssl.tasks.masking.mask_to_keep`, so the ViTDet windows work as for MAE).
- Target encoder = an EMA copy of the backbone (:mod:`medssl.tasks.ema`) on the whole image; its
  tokens are normalised and read at the target positions. ``target_norm="layer"`` is the
  reference's layer norm per token. ``"instance"`` first standardises each feature over the
  image's tokens (data2vec's instance norm), then layer-normalises: a fresh ViT's tokens share
  one dominant direction (mean pairwise cosine 0.97 after layer norm alone, on PneumoniaMNIST,
  ViT-Tiny), so the reference's targets start almost constant and the predictor can match them
  without looking at the context (prediction cosine 0.9995 after 3 epochs); instance norm removes
  the shared part (cosine 0.006). What is left is mostly position: 97 % of the instance-normed
  targets' variance is the per-position mean over images, which the predictor's positional mask
  tokens give away. ``"batch"`` standardises each feature over the batch at each position
  instead, so only what differs between images at a position remains to be predicted.
- Predictor: :class:`~medssl.tasks.heads.JEPAPredictor` (narrow, ``predictor_depth`` blocks).
- Loss: the reference's smooth L1 (``loss="smooth_l1"``) or the squared error (``"mse"``) over the
  valid target slots, averaged over the ``M`` blocks.
- Optional spread terms (C-JEPA, Mo & Tong 2024): VICReg's variance and covariance of the images'
  mean context embeddings (:mod:`medssl.tasks.spread`), weighted ``variance_weight`` and
  ``covariance_weight`` (0: I-JEPA as published). Short budgets need them: without, the encoder's
  embeddings lose dimensions faster than the EMA target's asymmetry can hold them up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import mean_over_ranks, world_size
from ..models.base import GridEncoder
from .base import Task, register_task
from .ema import frozen_copy
from .heads import JEPAPredictor
from .masking import mask_to_keep
from .spread import variance_covariance

__all__ = ["IJEPATask", "jepa_loss"]


LOSSES = ("smooth_l1", "mse")
TARGET_NORMS = ("layer", "instance", "batch")


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"I-JEPA {name} must be one of {', '.join(allowed)}, got {value!r}")


def normalise_targets(h: torch.Tensor, kind: str = "layer") -> torch.Tensor:
    """Target tokens ``(B, N, D)``, layer-normalised per token after (module docstring):

    - ``"layer"``: nothing else (the reference);
    - ``"instance"``: every feature standardised over each image's tokens (data2vec);
    - ``"batch"``: every feature standardised over the batch at each position (all ranks' under
      DDP), so what the position alone predicts is taken out.
    """
    _check_choice(kind, TARGET_NORMS, "target_norm")
    if kind == "instance":
        h = F.instance_norm(h.transpose(1, 2)).transpose(1, 2)
    elif kind == "batch":
        if world_size() * h.shape[0] < 2:
            raise ValueError("target_norm='batch' standardises over the batch: it needs at least 2 images per step")
        mean = mean_over_ranks(h.mean(0, keepdim=True))
        var = mean_over_ranks((h - mean).pow(2).mean(0, keepdim=True))
        h = (h - mean) / (var + 1e-6).sqrt()
    return F.layer_norm(h, h.shape[-1:])


def jepa_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Per-slot ``kind`` error (smooth L1 with beta 1, or squared), mean over the feature dimension,
    averaged over the ``valid`` ``(..., L)`` slots."""
    _check_choice(kind, LOSSES, "loss")
    diff = prediction.float() - target.float().detach()
    err = diff.pow(2) if kind == "mse" else F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none")
    err = err.mean(-1)
    return (err * valid).sum() / valid.sum().clamp_min(1)


@register_task("ijepa")
class IJEPATask(Task):
    """I-JEPA on ``backbone`` (a :class:`~medssl.models.base.GridEncoder`, as masking needs a token grid).

    Args:
        predictor_dim, predictor_depth, predictor_heads: the predictor (default: half the encoder's width, 2 blocks).
        momentum: target EMA momentum at the start, cosine to 1 (the reference's 0.996).
        loss: ``"smooth_l1"`` (the reference's) or ``"mse"``.
        target_norm: ``"layer"`` (the reference's), ``"instance"`` or ``"batch"`` (:func:`normalise_targets`).
        variance_weight, covariance_weight: C-JEPA's spread terms on the images' mean context
            embeddings (module docstring); 0 leaves them out.
    """

    required_keys = ("image", "jepa_context", "jepa_targets")

    def __init__(self, backbone: nn.Module, predictor_dim: int | None = None, predictor_depth: int = 2,
                 predictor_heads: int | None = None, momentum: float = 0.996, loss: str = "smooth_l1",
                 target_norm: str = "layer", variance_weight: float = 0.0, covariance_weight: float = 0.0,
                 context_key: str = "jepa_context", targets_key: str = "jepa_targets") -> None:
        super().__init__(backbone)
        if not isinstance(backbone, GridEncoder):
            raise TypeError(f"I-JEPA masks tokens of a grid: {type(backbone).__name__} is not a GridEncoder")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        _check_choice(loss, LOSSES, "loss")
        _check_choice(target_norm, TARGET_NORMS, "target_norm")
        if variance_weight < 0 or covariance_weight < 0:
            raise ValueError(f"variance_weight and covariance_weight must be >= 0, got {variance_weight}, {covariance_weight}")
        self.predictor = JEPAPredictor(backbone.embed_dim, predictor_dim, predictor_depth, predictor_heads)
        self.target = frozen_copy(backbone)
        self.momentum, self.context_key, self.targets_key = momentum, context_key, targets_key
        self.loss, self.target_norm = loss, target_norm
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight
        self.required_keys = ("image", context_key, targets_key)

    def train(self, mode: bool = True):
        super().train(mode)
        self.target.eval()
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"]
        grid = tuple(self.backbone.grid_size(x.shape[2:]))
        context = batch[self.context_key].to(x.device).bool()  # (B, N)
        targets = batch[self.targets_key].to(x.device).bool()  # (B, M, N)
        n = int(torch.tensor(grid).prod())
        if context.shape[-1] != n or targets.shape[-1] != n:
            raise ValueError(f"block masks over {context.shape[-1]} tokens for a {'x'.join(map(str, grid))} grid; "
                             "make them with medssl.data.block_masks.jepa_blocks(patch_size=...) of this encoder")
        p = self.backbone.num_prefix_tokens
        keep = mask_to_keep(context, self.backbone.layout(grid, x.device))  # (B, Lc), window-grouped, -1 pad
        z = self.encode(batch, x, keep)[:, p:]
        with torch.no_grad():
            h = self.encode(batch, x, encoder=self.target)[:, p:].float()  # (B, N, D) raster
            h = normalise_targets(h, self.target_norm)
        b, m = targets.shape[:2]
        index = mask_to_keep(targets.reshape(b * m, n)).reshape(b, m, -1)  # (B, M, Lt) raster, -1 padded
        lt = index.shape[-1]
        target = h.gather(1, index.reshape(b, m * lt).clamp(min=0).unsqueeze(-1).expand(-1, -1, h.shape[-1])).reshape(b, m, lt, -1)
        prediction = self.predictor(z, keep, index, grid)
        prediction_loss = jepa_loss(prediction, target, (index >= 0).float(), self.loss)
        out = {"loss": prediction_loss}
        if self.variance_weight or self.covariance_weight:
            seen = (keep >= 0).unsqueeze(-1).to(z.dtype)
            pooled = (z * seen).sum(1) / seen.sum(1).clamp_min(1)  # (B, D): each image's mean context embedding
            variance, covariance = variance_covariance(pooled)
            out.update(loss=prediction_loss + self.variance_weight * variance + self.covariance_weight * covariance,
                       prediction_loss=prediction_loss.detach(), variance=variance.detach(), covariance=covariance.detach())
        with torch.no_grad():
            valid = index >= 0
            cosine = F.cosine_similarity(prediction.float(), target, dim=-1)[valid].mean()
        return {**out, "prediction_cosine": cosine, "context_share": context.float().mean()}

    def teachers(self):
        return [(self.target, self.backbone)]


    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image, what the context encoder sees, and the target blocks it must predict."""
        x = batch["image"]
        grid = tuple(self.backbone.grid_size(x.shape[2:]))
        patch = [s // g for s, g in zip(x.shape[2:], grid)]

        def upsample(mask: torch.Tensor) -> torch.Tensor:
            m = mask.reshape(mask.shape[0], 1, *grid).float()
            for axis, p in enumerate(patch):
                m = m.repeat_interleave(p, dim=2 + axis)
            return m.to(x.device)

        context = upsample(batch[self.context_key].bool())
        targets = upsample(batch[self.targets_key].bool().any(1))
        return {"image": x, "context": x * context, "targets": x * targets}
