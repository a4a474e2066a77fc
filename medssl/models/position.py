"""Log-spaced sinusoidal position embeddings for any 2D or 3D token grid.

The embedding is a function of the grid, not a learned table, so one model takes several input
sizes without interpolating anything (the ViTDet/Waggener backbone; the MAE reference uses the
same 2D formula with a fixed grid). Each spatial axis gets an equal share of the channels: half
sines, half cosines, at frequencies ``1 / temperature ** (i / n)`` for ``i < n`` - geometrically
(log-) spaced from 1 down to ``1 / temperature``. Channels left over when ``dim`` is not a
multiple of ``2 * spatial_dims`` are zero.
"""

from __future__ import annotations

import torch

__all__ = ["sincos_position_embedding"]


def sincos_position_embedding(grid: list[int], dim: int, temperature: float = 10000.0,
                              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Embeddings of every token of ``grid`` in raster (C) order: ``(prod(grid), dim)``.

    TorchScript compiles it (a scripted encoder computes the table of its input's grid).

    >>> sincos_position_embedding((2, 3), 8).shape
    torch.Size([6, 8])
    """
    ndim = len(grid)
    per_axis = (dim // (2 * ndim)) * 2  # even share of channels for each axis
    if per_axis == 0:
        raise ValueError(f"embedding dim {dim} is too small for a {ndim}D grid (needs at least {2 * ndim})")
    half = per_axis // 2
    omega = 1.0 / torch.pow(temperature, torch.arange(half, dtype=torch.float64, device=device) / half)  # (half,)
    axes = torch.meshgrid([torch.arange(g, dtype=torch.float64, device=device) for g in grid], indexing="ij")
    parts: list[torch.Tensor] = []
    for coord in axes:
        angle = coord.reshape(-1, 1) * omega  # (N, half)
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)  # (N, ndim * per_axis)
    if emb.shape[1] < dim:
        emb = torch.nn.functional.pad(emb, [0, dim - emb.shape[1]])
    return emb.to(dtype)
