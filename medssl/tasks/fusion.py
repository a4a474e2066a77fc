"""Patient fusion (BrainFuse, second source document): new scans composed region by region from
K different patients, in voxel space or in an encoder's token space.

Three pure pieces, one code path for 2D and 3D:

- :func:`fusion_groups` picks, for each fused scan, K batch items of K *different* patients
  (hashed ``patient`` ids; a 3D loader yields several patches of one volume per batch, and a
  patient fused with itself is no new scan).
- :func:`random_partition` draws a smooth random partition of space: ``n_regions`` random seed
  points (a Voronoi tessellation of the normalised image box), each region given to one of the K
  patients (every patient gets at least one), borders softened by ``smoothness`` (a fraction of
  the image edge; 0 gives hard borders). It returns the per-voxel weight of every source, which
  sums to 1 at every voxel. It is evaluated at normalised coordinates, so the same partition can
  be read on the image grid (raw fusion) and on the token grid (latent fusion).
- :func:`fuse` mixes ``(B, ...)`` rows (images or tokens) with those weights; :func:`shares` and
  :func:`soft_labels` turn a partition into each source's share and the fused scan's label.

Related published methods: MIS-FM's Volume Fusion (a foreground sub-volume from a second scan,
discrete fusion weights), CutMix / MixUp (one box / one global weight, two images), i-Mix.
BrainFuse differs by K up to 8 and by region-wise composition of whole patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["NotEnoughPatients", "Partition", "fusion_groups", "random_partition", "fuse", "shares", "soft_labels"]

_MAX_POINTS = 32 ** 3  # partitions of larger grids are computed on a coarser one and interpolated


class NotEnoughPatients(UserError, ValueError):
    """A batch holds fewer distinct patients than a fused scan needs."""


@dataclass
class Partition:
    """A random partition for ``G`` fused scans of ``K`` sources each.

    ``centres`` ``(G, R, d)`` region seeds in ``[0, 1]^d``; ``source`` ``(G, R)`` which of the K
    sources fills each region; ``smoothness`` the border width (fraction of the image edge).
    """

    centres: torch.Tensor
    source: torch.Tensor
    k: int
    smoothness: float

    @property
    def spatial_dims(self) -> int:
        return self.centres.shape[-1]

    def weights(self, grid: Sequence[int]) -> torch.Tensor:
        """``(G, K, *grid)`` float32 weights of each source at each point of ``grid``; they sum to 1 over K."""
        grid = tuple(int(g) for g in grid)
        if len(grid) != self.spatial_dims:
            raise ValueError(f"partition is {self.spatial_dims}D, grid {grid} is not")
        coarse = tuple(min(g, round(_MAX_POINTS ** (1 / len(grid)))) for g in grid)
        w = self._weights_at(coarse)
        if coarse != grid:  # linear interpolation keeps a partition of unity (nearest keeps hard borders hard)
            mode = "nearest" if self.smoothness == 0 else ("bilinear" if len(grid) == 2 else "trilinear")
            w = F.interpolate(w, size=grid, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        return w

    def _weights_at(self, grid: tuple[int, ...]) -> torch.Tensor:
        device = self.centres.device
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in grid]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))  # (N, d)
        dist = torch.cdist(points.unsqueeze(0).expand(self.centres.shape[0], -1, -1), self.centres.float())  # (G, N, R)
        if self.smoothness > 0:  # a linear ramp across a border of that width; one region alone inside
            gap = dist - dist.amin(-1, keepdim=True)
            region = (1 - gap / self.smoothness).clamp(min=0)
            region = region / region.sum(-1, keepdim=True)
        else:
            region = F.one_hot(dist.argmin(-1), dist.shape[-1]).float()
        to_source = F.one_hot(self.source, self.k).float()  # (G, R, K)
        w = torch.bmm(region, to_source)  # (G, N, K)
        return w.transpose(1, 2).reshape(w.shape[0], self.k, *grid)


def fusion_groups(patients: Sequence, k: int, n_fused: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n_fused, k)`` batch indices; each row names ``k`` items of ``k`` different patients.

    Raises :class:`NotEnoughPatients` when the batch holds fewer than ``k`` distinct patients
    (raise the batch size or lower the number of fused patients).
    """
    if not 2 <= k:
        raise ValueError(f"fusing needs at least 2 patients, got {k}")
    keys = [str(p) for p in patients]
    distinct = len(set(keys))
    if distinct < k:
        raise NotEnoughPatients(f"a batch of {len(keys)} items holds {distinct} distinct patients, fewer than the "
                                f"{k} each fused scan needs: raise batch_size or lower the number of fused patients")
    rows = []
    for _ in range(n_fused):
        row, seen = [], set()
        for i in torch.randperm(len(keys), generator=generator).tolist():
            if keys[i] not in seen:
                row.append(i)
                seen.add(keys[i])
                if len(row) == k:
                    break
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def random_partition(n_fused: int, k: int, spatial_dims: int, n_regions: int | None = None, smoothness: float = 0.05,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Partition:
    """A random :class:`Partition` of space into ``n_regions`` (default ``2 * k``) regions among ``k`` sources."""
    n_regions = 2 * k if n_regions is None else int(n_regions)
    if n_regions < k:
        raise ValueError(f"need at least as many regions as fused patients, got {n_regions} regions for {k} patients")
    if smoothness < 0:
        raise ValueError(f"smoothness must be >= 0, got {smoothness}")
    centres = torch.rand(n_fused, n_regions, spatial_dims, generator=generator)
    source = torch.cat([torch.arange(k).expand(n_fused, k), torch.randint(k, (n_fused, n_regions - k), generator=generator)], 1)
    order = torch.rand(n_fused, n_regions, generator=generator).argsort(1)  # which regions get the guaranteed sources
    source = source.gather(1, order)
    return Partition(centres.to(device), source.to(device), k, float(smoothness))


def fuse(rows: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mix ``rows`` ``(B, C, *grid)`` by ``weights`` ``(G, K, *grid)`` over the sources ``groups`` ``(G, K)``.

    Images fuse as ``(B, C, *S)``; tokens as ``(B, D, *grid)`` (channels first). Returns ``(G, C, *grid)``
    in ``rows``' dtype: a convex combination, so its values stay within the sources' range.
    """
    sources = rows[groups.to(rows.device)]  # (G, K, C, *grid)
    return (sources.float() * weights.unsqueeze(2).to(sources.device)).sum(1).to(rows.dtype)


def shares(weights: torch.Tensor) -> torch.Tensor:
    """``(G, K)``: each source's share of the fused scan (its mean weight over the grid)."""
    return weights.flatten(2).mean(-1)


def soft_labels(labels: torch.Tensor, groups: torch.Tensor, share: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(G, num_classes)``: the sources' one-hot labels weighted by their shares (rows sum to 1)."""
    onehot = F.one_hot(labels.long().view(-1), num_classes).float()  # (B, C)
    return (onehot[groups.to(onehot.device)] * share.unsqueeze(-1).to(onehot.device)).sum(1)
