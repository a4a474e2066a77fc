"""Supervised training for evaluation: fine-tuning a pretrained encoder and the from-scratch baselines.

Both run on the training engine (:class:`~medssl.engine.PretrainTrainer`) with a
:class:`~medssl.tasks.ClassificationTask`, with the same splits, seeds and schedule, so the
comparison is fair:

- :func:`layer_decay_groups`: layer-wise learning-rate decay for ViTs (BEiT / MAE fine-tuning):
  block ``i`` of ``L`` trains at ``lr * decay ** (L - i)``, the head at ``lr``;
- :func:`train_classifier`: AdamW (or SGD, Adam, DBA, EDBA: ``optimizer``), warm-up + cosine per step, cross-entropy
  (optionally class-balanced: ``class_weight``), early stopping on
  the ``stop`` split's mean of AUC and balanced accuracy (:func:`selection_score`) with a patience;
  the best weights are restored at the end. Each epoch's
  order is the next ``torch.randperm`` of one generator seeded with ``seed`` (what the loop that
  came before the engine drew, so recorded figures reproduce); a last batch of one image is
  dropped (it would break the ResNet baseline's batch norm).

With DBA / EDBA (:mod:`medssl.optim`) the batch size changes between epochs: the loader's batches
come from an :class:`~medssl.engine.determinism.AdaptiveBatchSampler` and the LR schedule follows
the fraction of epochs done instead of a step count fixed in advance. DBA needs per-sample
gradients, which batch norm does not have: the ResNet-18 baseline is refused (one line) under DBA.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from ignite.engine import Events

from ..tasks.classify import ClassificationTask
from .metrics import classification_metrics

__all__ = ["layer_decay_groups", "train_classifier", "selection_score", "ReplayShuffle"]

logger = logging.getLogger(__name__)


def layer_decay_groups(task: ClassificationTask, lr: float, weight_decay: float = 0.05, decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay (ViT encoders) and no weight decay on norms/biases."""
    depth = len(getattr(task.backbone, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("backbone.") and depth and not name.startswith("backbone.norm"):
            layer = 0  # patch embedding, CLS token
        else:
            layer = depth + 1  # final norm, head, or a whole non-ViT network
        no_decay = param.ndim <= 1 or name.endswith("cls_token")
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * decay ** (depth + 1 - layer), "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
    return list(groups.values())


class ReplayShuffle(torch.utils.data.Sampler):
    """Each epoch the next ``torch.randperm(size)`` of one generator seeded with ``seed``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.generator = size, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=self.generator).tolist())


class _Items(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def selection_score(metrics: dict) -> float:
    """What early stopping maximises: the mean of AUC (the ranking) and balanced accuracy (the
    decisions every reported accuracy comes from); accuracy when AUC is undefined (one class).

    AUC alone picked the first epoch that ranked well, whose head still gave every image the
    majority class: 1 % PneumoniaMNIST fine-tuning had AUC 0.82 at balanced accuracy 0.56
    (issue #18), and a 45 : 5 toy set AUC 1.0 at balanced accuracy 0.5.
    """
    if math.isnan(metrics["auc"]):
        return metrics["accuracy"]
    return (metrics["auc"] + metrics["balanced_accuracy"]) / 2


class _EarlyStopping:
    """After each epoch: metrics on the stop split; keep the best weights (by :func:`selection_score`);
    stop after ``patience`` epochs without gain."""

    def __init__(self, task: ClassificationTask, x: torch.Tensor, y: torch.Tensor, patience: int) -> None:
        self.task, self.x, self.y, self.patience = task, x, y, patience
        self.best, self.best_score, self.best_epoch, self.history = None, -math.inf, -1, []

    def __call__(self, engine) -> None:
        metrics = classification_metrics(self.y.numpy(), self.task.predict(self.x))
        self.history.append(metrics)
        epoch = engine.state.epoch - 1
        score = selection_score(metrics)
        if score > self.best_score:
            self.best, self.best_score, self.best_epoch = copy.deepcopy(self.task.state_dict()), score, epoch
        elif epoch - self.best_epoch >= self.patience:
            engine.terminate()


def train_classifier(task: ClassificationTask, train_x: torch.Tensor, train_y: torch.Tensor, stop_x: torch.Tensor,
                     stop_y: torch.Tensor, epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
                     layer_decay: float | None = 0.75, patience: int = 5, warmup_epochs: int = 2, seed: int = 0,
                     device: str | torch.device = "cpu", optimizer: str = "adamw", optimizer_options: dict | None = None,
                     class_weight: str = "none") -> dict:
    """Train ``task`` on ``(train_x, train_y)``; stop when :func:`selection_score` on ``(stop_x, stop_y)`` has not
    improved for ``patience`` epochs.

    ``optimizer``: a name of :data:`medssl.optim.OPTIMIZERS` (``optimizer_options`` go to DBA / EDBA).
    ``class_weight``: ``"balanced"`` weights each class's items by the inverse of its frequency in
    ``train_y`` (:func:`~medssl.tasks.classify.balanced_class_weights`), so a few labels of an
    imbalanced set do not teach the majority class alone; ``"none"``: plain cross-entropy.
    Returns ``{"best_epoch", "epochs_run", "history": [stop-split metrics per epoch], "batch_sizes"}``
    (``batch_sizes``: the batch size of each epoch); ``task`` ends with its best weights.
    """
    from ..engine.determinism import AdaptiveBatchSampler
    from ..engine.lr_schedule import WarmupCosine
    from ..engine.trainer import PretrainTrainer
    from ..optim import build_optimizer
    from ..tasks.classify import CLASS_WEIGHTS, balanced_class_weights

    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got {class_weight!r}")
    torch.manual_seed(seed)
    device = torch.device(device)
    task.to(device)
    task.set_class_weights(balanced_class_weights(train_y, task.num_classes) if class_weight == "balanced" else None)
    groups = layer_decay_groups(task, lr, weight_decay, layer_decay) if layer_decay else [{"params": list(task.parameters())}]
    opt = build_optimizer(optimizer, groups, task, lr=lr, weight_decay=weight_decay, batch_size=batch_size, **(optimizer_options or {}))
    adaptive = callable(getattr(opt, "next_batch_size", None))
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    n = len(train_x)
    if adaptive:
        loader = torch.utils.data.DataLoader(_Items(train_x, train_y), batch_sampler=AdaptiveBatchSampler(ReplayShuffle(n, seed), batch_size))
    else:
        loader = torch.utils.data.DataLoader(_Items(train_x, train_y), batch_size=batch_size, sampler=ReplayShuffle(n, seed),
                                             drop_last=n > 2 and n % batch_size == 1)
    stopping = _EarlyStopping(task, stop_x, stop_y, patience)
    trainer = PretrainTrainer(device, epochs, loader, task, opt, amp="auto", clip_grad_norm=3.0, seed=seed,
                              max_bad_steps=epochs * steps_per_epoch, quiet=True)
    sizes: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sizes.append(getattr(loader.batch_sampler, "batch_size", batch_size)))
    if adaptive:  # steps per epoch vary: the schedule follows the fraction of epochs done (in thousandths)
        shape = WarmupCosine(epochs * 1000, warmup_epochs * 1000)
        trainer.epoch_start_iteration = 0

        def fraction_done(_step: int) -> float:
            """The factor of the next step: as the per-step schedule's ``(i + 1) / warmup`` with epochs of varying length."""
            state = trainer.state
            length = state.epoch_length or len(loader)
            done = 1000 * (max(0, state.epoch - 1) + (state.iteration - trainer.epoch_start_iteration) / length) if state.epoch else 0.0
            if done < shape.warmup_steps:
                return (done + 1000 / length) / shape.warmup_steps
            return shape(round(done))

        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(e, "epoch_start_iteration", e.state.iteration))
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, fraction_done)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: schedule.step())
    trainer.add_event_handler(Events.EPOCH_COMPLETED, stopping)
    trainer.run()
    task.load_state_dict(stopping.best)
    if trainer.skipped_steps:
        logger.warning("%d of %d steps skipped (non-finite loss or gradient, e.g. a bf16 overflow)", trainer.skipped_steps,
                       trainer.state.iteration)
    return {"best_epoch": stopping.best_epoch, "epochs_run": len(stopping.history), "history": stopping.history,
            "skipped_steps": trainer.skipped_steps, "batch_sizes": sizes}
