"""Supervised training for evaluation: fine-tuning a pretrained encoder and the from-scratch baselines.

One loop serves both (same splits, seeds and schedule, so the comparison is fair):

- :class:`Classifier`: an encoder, a pooling, a linear head. For a medssl ViT the pooling is
  ``cls``/``mean``/``flatten``; any other network (MONAI's ResNet-18 baseline) is used as is
  with ``pooling=None`` and must return logits itself.
- :func:`layer_decay_groups`: layer-wise learning-rate decay for ViTs (BEiT / MAE fine-tuning):
  block ``i`` of ``L`` trains at ``lr * decay ** (L - i)``, the head at ``lr``.
- :func:`train_classifier`: AdamW, warm-up + cosine, cross-entropy, early stopping on the
  ``stop`` split's AUC with a patience; the best weights are restored at the end.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..models.pooling import pool_tokens
from .metrics import classification_metrics

__all__ = ["Classifier", "layer_decay_groups", "train_classifier", "predict_scores"]


class Classifier(nn.Module):
    """``encoder`` -> pooled features -> linear head ``(B, num_classes)`` (or ``encoder`` alone if ``pooling`` is None)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str | None = "cls", feature_dim: int | None = None) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        width = feature_dim or getattr(encoder, "embed_dim", None)
        self.head = nn.Linear(width, num_classes) if pooling is not None else nn.Identity()
        if pooling is not None:
            nn.init.zeros_(self.head.bias)
            nn.init.trunc_normal_(self.head.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling is None:
            return self.encoder(x)
        return self.head(pool_tokens(self.encoder(x), self.pooling, self.encoder.num_prefix_tokens))


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float = 0.05, decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay (ViT encoders) and no weight decay on norms/biases."""
    depth = len(getattr(model.encoder, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder.") and depth and not name.startswith("encoder.norm"):
            layer = 0  # patch embedding, CLS token
        else:
            layer = depth + 1  # final norm, head, or a whole non-ViT network
        no_decay = param.ndim <= 1 or name.endswith("cls_token")
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * decay ** (depth + 1 - layer), "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
    return list(groups.values())


@torch.no_grad()
def predict_scores(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities ``(N, K)``."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).float().softmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def train_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, stop_x: torch.Tensor, stop_y: torch.Tensor,
                     epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
                     layer_decay: float | None = 0.75, patience: int = 5, warmup_epochs: int = 2, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict:
    """Train ``model`` on ``(train_x, train_y)``; stop when AUC on ``(stop_x, stop_y)`` has not improved for ``patience`` epochs.

    Returns ``{"best_epoch", "epochs_run", "history": [stop-split metrics per epoch]}``; ``model`` ends with its best weights.
    """
    from ..engine.lr_schedule import WarmupCosine
    from ..engine.trainer import autocast_dtype

    torch.manual_seed(seed)
    device = torch.device(device)
    model.to(device)
    groups = layer_decay_groups(model, lr, weight_decay, layer_decay) if layer_decay else [{"params": list(model.parameters())}]
    for g in groups:
        g["base_lr"] = g.get("lr", lr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    dtype = autocast_dtype(device, "auto")
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    schedule = WarmupCosine(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    best, best_score, best_epoch, history, step = None, -math.inf, -1, [], 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * schedule(step)
            idx = order[i:i + batch_size]
            if len(idx) < 2 < len(order):
                continue  # a last batch of one would break batch norm (ResNet baseline)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(train_x[idx].to(device)).float(), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)):
                opt.step()  # a non-finite gradient (bf16 overflow) skips the update instead of poisoning the weights
            step += 1
        metrics = classification_metrics(stop_y.numpy(), predict_scores(model, stop_x))
        history.append(metrics)
        score = metrics["auc"] if not math.isnan(metrics["auc"]) else metrics["accuracy"]
        if score > best_score:
            best, best_score, best_epoch = copy.deepcopy(model.state_dict()), score, epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best)
    return {"best_epoch": best_epoch, "epochs_run": len(history), "history": history}
