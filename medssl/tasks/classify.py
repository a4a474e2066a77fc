"""Supervised classification as a task: the encoder, a pooling and a linear head, cross-entropy on labels.

Being a task, it trains on the same engine as pretraining (AMP, clipping, non-finite skipping,
checkpoints, resume, DDP in one place): fine-tuning a pretrained encoder, the from-scratch
baselines of the evaluation protocol, and "supervised + SSL auxiliary" training as a task mix
(``task_names: [classify, mae]``) are all this one file.

``pooling=None`` takes a network that already returns logits (MONAI's ResNet-18 baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Task, register_task

__all__ = ["ClassificationTask", "balanced_class_weights", "CLASS_WEIGHTS"]

CLASS_WEIGHTS = ("balanced", "none")  # how train_classifier weights the classes


def balanced_class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` for each class ``c`` with ``n_c`` of the ``n`` labelled items (scikit-learn's
    ``class_weight="balanced"``): every class adds the same total to the loss, and the weights
    average 1 over the items. A class with no item gets 1 (it adds nothing either way)."""
    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    y = y[y >= 0]
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].float()
    present = counts > 0
    weights = torch.ones(num_classes)
    weights[present] = len(y) / (int(present.sum()) * counts[present])
    return weights


@register_task("classify")
class ClassificationTask(Task):
    """Cross-entropy classification of ``batch[image_key]`` into ``num_classes`` (``batch[label_key]``).

    Args:
        num_classes: number of classes.
        pooling: how tokens become one vector (``cls``, ``mean``, ``flatten``; default ``cls``
            with a CLS token, else ``mean``); None when the backbone returns logits itself.
        feature_dim: width of the pooled vector (default the encoder's ``embed_dim``; give it for
            ``flatten``, whose width depends on the grid).
        class_weights: one loss weight per class (:func:`balanced_class_weights` for the inverse
            class frequency); the loss is the batch mean of ``weight[label] * cross-entropy``, so
            weights averaging 1 over the training set keep its scale. None: plain cross-entropy.
            Not part of the weights (:meth:`set_class_weights` sets them for a training run).

    Items labelled ``-1`` are unlabelled and left out of the loss (a batch of them gives 0).
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 2, pooling: str | None = "default", feature_dim: int | None = None,
                 image_key: str = "image", label_key: str = "label", class_weights: Sequence[float] | None = None) -> None:
        super().__init__(backbone)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
        if pooling == "default":
            pooling = "cls" if getattr(backbone, "num_prefix_tokens", 0) else "mean"
        self.num_classes, self.pooling, self.image_key, self.label_key = num_classes, pooling, image_key, label_key
        self.required_keys = (image_key, label_key)
        if pooling is None:
            self.head = nn.Identity()
        else:
            self.head = nn.Linear(feature_dim or backbone.embed_dim, num_classes)
            nn.init.zeros_(self.head.bias)
            nn.init.trunc_normal_(self.head.weight, std=0.01)
        self.register_buffer("class_weights", None, persistent=False)  # not in the state dict: checkpoints stay as they were
        self.set_class_weights(class_weights)

    def set_class_weights(self, weights: Sequence[float] | torch.Tensor | None) -> None:
        """Weight each class's items in the loss (None: plain cross-entropy)."""
        if weights is None:
            self.class_weights = None
            return
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if weights.numel() != self.num_classes or not bool((weights >= 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"class_weights must be {self.num_classes} finite numbers >= 0, got {weights.tolist()}")
        self.class_weights = weights.to(next(self.parameters()).device)

    def _weighted(self, loss: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-item ``loss`` times its class weight (unlabelled items, ``y = -1``, keep their 0)."""
        if self.class_weights is None:
            return loss
        return loss * self.class_weights.to(loss.device)[y.clamp(min=0)]

    def logits(self, x: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """``(B, num_classes)`` class scores of images ``x``."""
        if self.pooling is None:
            return self.backbone(x)
        return self.head(self.embed(batch, x, self.pooling))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x, y = batch[self.image_key], batch[self.label_key]
        logits = self.logits(x, batch).float()
        y = torch.as_tensor(y, device=logits.device).long().view(-1)
        labelled = y >= 0  # -1: an unlabelled item (a semi-supervised mix); it adds nothing to the loss
        if not bool(labelled.any()):
            return {"loss": logits.sum() * 0.0}
        loss = self._weighted(F.cross_entropy(logits[labelled], y[labelled], reduction="none"), y[labelled]).mean()
        with torch.no_grad():
            accuracy = (logits[labelled].argmax(-1) == y[labelled]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        """``(B,)`` (weighted) cross-entropy of each item (0 for unlabelled ones); its mean over labelled items is ``forward``'s loss."""
        logits = self.logits(batch[self.image_key], batch).float()
        y = torch.as_tensor(batch[self.label_key], device=logits.device).long().view(-1)
        return self._weighted(F.cross_entropy(logits, y, reduction="none", ignore_index=-1), y)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities ``(N, num_classes)`` of images ``x`` (any device; computed on the task's)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [self.logits(x[i:i + batch_size].to(device)).float().softmax(-1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy()
