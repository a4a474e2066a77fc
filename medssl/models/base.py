"""What an encoder is, written down: the interface tasks, evaluation and pictures rely on.

Two levels, as :class:`typing.Protocol` classes (structural: an encoder need not inherit from
them, it only has to look like them; ``isinstance`` checks the names):

- :class:`Encoder`, what every task that pools or reads tokens needs (the contrastive tasks,
  DINO, jigsaw, supervised fine-tuning, the feature extractor):
  ``forward(x, keep=None, context=None) -> (B, P + N, D)`` tokens, ``P = num_prefix_tokens``
  (a CLS token) before the ``N`` content tokens, plus ``embed_dim``, ``spatial_dims`` and
  ``in_channels``. ``context`` is the batch's conditioning (:func:`batch_context`: modality,
  spatial dims, source / organ ids); an unconditioned encoder ignores it.
- :class:`GridEncoder`, what masked-image tasks and attention pictures need on top: a regular
  token grid (``grid_size``, ``patch_size``), where token ``i`` of the ``N`` is grid cell ``i`` in
  raster order, ``keep`` (indices of the tokens to encode) and the attention window layout
  (``layout``, None for global attention). :class:`~medssl.models.ViT` is one.

A network whose ``forward`` serves another caller (:class:`~medssl.models.ViTFeatureMap` returns
a feature map for MONAI's tools) offers the token interface as ``tokens(x, keep, context)``.

:func:`encode` and :func:`embed` are the only places that call an encoder; :meth:`Task.encode
<medssl.tasks.base.Task.encode>` is how tasks reach them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .pooling import pool_tokens

__all__ = ["Encoder", "GridEncoder", "encode", "embed", "batch_context", "repeat_context", "CONTEXT_KEYS"]

# Batch fields that describe an image rather than being it: what a conditioned encoder may read.
CONTEXT_KEYS = ("modality", "spatial_dims", "source", "organ")


@runtime_checkable
class Encoder(Protocol):
    """Images ``(B, C, *spatial)`` -> tokens ``(B, P + N, D)``."""

    embed_dim: int
    num_prefix_tokens: int
    spatial_dims: int
    in_channels: int

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                context: Mapping[str, Any] | None = None) -> torch.Tensor: ...


@runtime_checkable
class GridEncoder(Encoder, Protocol):
    """An :class:`Encoder` whose content tokens are the cells of a regular grid of patches."""

    patch_size: tuple[int, ...]

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]: ...

    def layout(self, grid: Sequence[int], device: torch.device | str = "cpu"): ...


def batch_context(batch: Mapping[str, Any] | None) -> dict[str, Any]:
    """The conditioning fields of ``batch`` that are present (see :data:`CONTEXT_KEYS`)."""
    if not batch:
        return {}
    return {k: batch[k] for k in CONTEXT_KEYS if k in batch}


def repeat_context(context: Mapping[str, Any], times: int) -> dict[str, Any]:
    """``context`` of ``B`` images for ``times * B`` inputs stacked view-major (``(V * B, ...)``: row ``i``
    is image ``i % B``), which is how the multi-view tasks flatten their views."""
    if times == 1:
        return dict(context)
    out = {}
    for k, v in context.items():
        if isinstance(v, torch.Tensor) and v.ndim:
            out[k] = v.repeat(times, *[1] * (v.ndim - 1))
        elif isinstance(v, (list, tuple)):
            out[k] = list(v) * times
        else:
            out[k] = v
    return out


def _batch_size(context: Mapping[str, Any]) -> int | None:
    for v in context.values():
        if isinstance(v, torch.Tensor) and v.ndim:
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


def encode(encoder: Encoder, x: torch.Tensor, keep: torch.Tensor | None = None,
           context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``encoder``'s tokens for ``x``; ``context`` of fewer images than ``x`` has (multi-view
    inputs) is repeated to fit (:func:`repeat_context`)."""
    if context:
        n = _batch_size(context)
        if n and n != x.shape[0]:
            if x.shape[0] % n:
                raise ValueError(f"context describes {n} images, the input has {x.shape[0]}")
            context = repeat_context(context, x.shape[0] // n)
    tokens = getattr(encoder, "tokens", None)  # a network whose forward is for MONAI (ViTFeatureMap) keeps its tokens here
    return (tokens or encoder)(x, keep, context=context or None)


def embed(encoder: Encoder, x: torch.Tensor, pooling: str = "cls", context: Mapping[str, Any] | None = None) -> torch.Tensor:
    """One vector per image: the encoder's tokens pooled (:func:`~medssl.models.pooling.pool_tokens`)."""
    return pool_tokens(encode(encoder, x, context=context), pooling, encoder.num_prefix_tokens)
