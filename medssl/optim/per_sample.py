"""Exact per-sample gradients, grouped by layer.

:func:`per_sample_gradients` differentiates each sample's loss on its own with ``torch.func``
(``vmap`` over ``grad`` of a ``functional_call``): one batched pass instead of ``B`` backward
passes, exact for any network whose samples do not interact. Batch norm in training mode mixes the
samples of a batch (a sample's gradient is then not defined on its own), so such networks are
refused with a clear message. Memory: ``B`` copies of the trainable parameters' gradients.

:func:`linear_per_sample` is the cheap exact route for one linear layer: the gradient of sample
``i``'s loss with respect to ``W`` is the outer product of the back-propagated output gradient and
the layer's input (summed over tokens for sequences); EDBA uses it for the last layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

__all__ = ["per_sample_gradients", "layer_groups", "linear_per_sample", "NotPerSample"]


class NotPerSample(UserError, ValueError):
    """The network or task has no per-sample gradient (samples interact, or no per-sample loss)."""


def layer_groups(names) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them (``head.weight`` and ``head.bias`` are the layer ``head``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups


def _check_independent(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise NotPerSample(f"per-sample gradients are not defined for a network with batch norm in training mode "
                               f"({name or type(module).__name__}: it mixes the samples of a batch); use adamw or sgd for it")


class _PerSampleLoss(nn.Module):
    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.per_sample_loss(batch)


def per_sample_gradients(task: nn.Module, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(losses (B,), {parameter name: (B, *shape) gradients})`` of ``task.per_sample_loss`` for every trainable parameter.

    The batch's tensors that have the batch dimension are split into samples; everything else
    (lists of strings, scalars) is left out of the per-sample calls.
    """
    if getattr(type(task), "per_sample_loss", None) is None:
        raise NotPerSample(f"{type(task).__name__} has no per-sample loss (its loss couples the samples of a batch); "
                           "dba needs a supervised task")
    _check_independent(task)
    from torch.func import functional_call, grad_and_value, vmap

    wrapper = _PerSampleLoss(task)
    params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in wrapper.named_parameters() if not p.requires_grad}
    buffers = dict(wrapper.named_buffers())
    size = len(batch[getattr(task, "image_key", "image")])
    samples = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 1 and len(v) == size}

    def loss_of_one(p, sample):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        return functional_call(wrapper, (p, frozen, buffers), (one,)).sum()

    grads, losses = vmap(grad_and_value(loss_of_one), in_dims=(None, 0), randomness="different", chunk_size=chunk_size)(params, samples)
    prefix = len("task.")
    return losses.detach(), {n[prefix:]: g for n, g in grads.items()}


def linear_per_sample(inputs: torch.Tensor, grad_output: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(dW (B, out, in), db (B, out))`` of a linear layer from its input ``(B, [T,] in)`` and output gradient.

    ``scale`` undoes the loss's mean (the number of samples it averaged over), so each row is the
    gradient of that sample's own loss.
    """
    if inputs.ndim == 2:
        inputs, grad_output = inputs[:, None], grad_output[:, None]
    inputs, grad_output = inputs.flatten(1, -2).float(), grad_output.flatten(1, -2).float()
    return torch.einsum("bto,bti->boi", grad_output, inputs) * scale, grad_output.sum(1) * scale
