"""Dynamic Batch Adaptation (Simionescu, Stoica, Herscovici, arXiv 2208.00815; the second source document).

Each step (the source's Algorithm 1): every sample's gradient (:func:`~.per_sample.per_sample_gradients`);
for each layer, its per-sample gradients cut into strides and a strategy
(:func:`~.selection.select_strides`) choosing which to keep; the layer's gradient is the mean of
the kept samples' gradients; then the wrapped optimizer steps. Layers choose independently, so one
layer may follow a few consistent samples while another uses the whole batch. After each epoch
(Algorithm 4) the batch size moves by the source's equation 1
(:func:`~.batch_size.batch_size_rule`) from ``q``, the median of the sizes chosen that epoch (over
layers and steps). No public code exists; what the slides leave open is decided in
:mod:`.selection`.
"""

from __future__ import annotations

import statistics

import torch

from .adaptive import AdaptiveOptimizer
from .batch_size import batch_size_rule
from .per_sample import layer_groups, stride_gradients
from .selection import STRATEGIES, select_strides

__all__ = ["DBA"]


class DBA(AdaptiveOptimizer):
    """DBA around ``optimizer`` (SGD, Adam or AdamW over the task's parameters).

    Args:
        stride_size: samples per stride (the unit of selection).
        strategy: ``variance_norm``, ``gradient_norm`` or ``all`` (every stride: the plain mean gradient).
        batch_size / min_batch_size / max_batch_size / delta: the batch size now, its bounds, and its step.
        chunk_size: samples per ``vmap`` chunk (None: the whole batch at once; smaller uses less memory).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stride_size: int = 4, strategy: str = "variance_norm", batch_size: int = 64,
                 min_batch_size: int = 8, max_batch_size: int = 512, delta: int = 8, chunk_size: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown DBA strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if stride_size < 1:
            raise ValueError(f"stride_size must be >= 1, got {stride_size}")
        super().__init__(optimizer, batch_size, min_batch_size, max_batch_size, delta)
        self.stride_size, self.strategy, self.chunk_size = stride_size, strategy, chunk_size

    def compute_gradients(self, task: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Set every trainable parameter's ``.grad`` to the mean gradient of its layer's chosen strides' samples."""
        losses, grads, counts = stride_gradients(task, batch, self.stride_size, self.chunk_size)
        self.saw_batch(len(losses))
        params = dict(task.named_parameters())
        chosen = []
        for names in layer_groups(grads).values():
            keep = select_strides([grads[n] for n in names], counts, self.strategy)
            n = counts[keep].sum()
            chosen.append(float(n))
            for name in names:
                params[name].grad = (grads[name][keep].sum(0) / n).to(params[name].dtype)
        self.epoch_values.extend(chosen)
        return {"loss": losses.float().mean(), "selected": torch.tensor(sum(chosen) / max(1, len(chosen)))}

    def _decide(self) -> tuple[int, float]:
        q = statistics.median(self.epoch_values)
        return batch_size_rule(self.current, q, self.delta, self.min_batch_size, self.max_batch_size), q
