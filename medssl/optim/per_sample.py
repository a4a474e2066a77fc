"""Exact per-sample (and per-stride) gradients, grouped by layer.

:func:`stride_gradients` differentiates the summed loss of each stride of ``stride_size``
consecutive samples on its own with ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``): one batched pass instead of one backward pass per stride, exact for any
network whose samples do not interact. :func:`per_sample_gradients` is the case of strides of one.
DBA selects whole strides, so it needs only the strides' gradients: ``B / stride_size`` copies of
the trainable parameters' gradients instead of ``B``. Batch norm in training mode mixes the samples
of a batch (a sample's gradient is then not defined on its own), so such networks are refused with
a clear message.

:func:`linear_per_sample` is the cheap exact route for one linear layer: the gradient of sample
``i``'s loss with respect to ``W`` is the outer product of the back-propagated output gradient and
the layer's input (summed over tokens for sequences); EDBA uses it for the last layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

__all__ = ["per_sample_gradients", "stride_gradients", "layer_groups", "linear_per_sample", "NotPerSample"]


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


def stride_gradients(task: nn.Module, batch: dict, stride_size: int = 1, chunk_size: int | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(losses (B,), {parameter name: (S, *shape)}, counts (S,))``: each stride's summed-loss gradient.

    Stride ``k`` holds samples ``k * stride_size`` to ``(k + 1) * stride_size - 1`` (the last may be
    shorter: it is padded with copies whose loss counts zero). The batch's tensors that have the
    batch dimension are split; everything else (lists of strings, scalars) is left out.
    """
    if getattr(type(task), "per_sample_loss", None) is None:
        raise NotPerSample(f"{type(task).__name__} has no per-sample loss (its loss couples the samples of a batch); "
                           "dba needs a supervised task")
    if stride_size < 1:
        raise ValueError(f"stride_size must be >= 1, got {stride_size}")
    _check_independent(task)
    from torch.func import functional_call, grad_and_value, vmap

    wrapper = _PerSampleLoss(task)
    params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in wrapper.named_parameters() if not p.requires_grad}
    buffers = dict(wrapper.named_buffers())
    size = len(batch[getattr(task, "image_key", "image")])
    strides = -(-size // stride_size)
    pad = strides * stride_size - size
    weight = torch.ones(strides * stride_size, device=batch[getattr(task, "image_key", "image")].device)
    if pad:
        weight[size:] = 0

    def split(v: torch.Tensor) -> torch.Tensor:
        if pad:
            v = torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])
        return v.reshape(strides, stride_size, *v.shape[1:])

    samples = {k: split(v) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 1 and len(v) == size}

    def loss_of_stride(p, stride, w):
        losses = functional_call(wrapper, (p, frozen, buffers), (stride,)).float()
        return (losses * w).sum(), losses

    from ..models.blocks import written_out_attention

    with written_out_attention():  # vmap has no batching rule for SDPA's fused CPU kernel (a slow loop, and a warning)
        grads, losses = vmap(grad_and_value(loss_of_stride, has_aux=True), in_dims=(None, 0, 0), randomness="different",
                             chunk_size=chunk_size)(params, samples, weight.view(strides, stride_size))
    counts = weight.view(strides, stride_size).sum(1)
    prefix = len("task.")
    return losses[1].detach().flatten()[:size], {n[prefix:]: g for n, g in grads.items()}, counts


def per_sample_gradients(task: nn.Module, batch: dict, chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(losses (B,), {parameter name: (B, *shape) gradients})`` of ``task.per_sample_loss`` for every trainable parameter."""
    losses, grads, _ = stride_gradients(task, batch, 1, chunk_size)
    return losses, grads


def linear_per_sample(inputs: torch.Tensor, grad_output: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(dW (B, out, in), db (B, out))`` of a linear layer from its input ``(B, [T,] in)`` and output gradient.

    ``scale`` undoes the loss's mean (the number of samples it averaged over), so each row is the
    gradient of that sample's own loss.
    """
    if inputs.ndim == 2:
        inputs, grad_output = inputs[:, None], grad_output[:, None]
    inputs, grad_output = inputs.flatten(1, -2).float(), grad_output.flatten(1, -2).float()
    return torch.einsum("bto,bti->boi", grad_output, inputs) * scale, grad_output.sum(1) * scale
