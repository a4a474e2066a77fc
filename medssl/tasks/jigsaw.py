"""Jigsaw puzzles (Noroozi & Favaro, 2016, arXiv:1603.09246) in 2D and 3D: the "predictive" family.

Each image is cut into a ``grid`` of cells (3 x 3 in 2D, 2 x 2 x 2 in 3D by default); from each
cell a ``tile`` is taken at a random offset, so neighbouring tiles never share an edge (the gap
and the jitter take away the shortcut of matching edges and leave the anatomy to reason about).
The tiles are shuffled with one permutation of a fixed set of ``n_permutations`` chosen to be as
far apart as possible (greedy maximal minimum Hamming distance, the paper's recipe), and the
network predicts which permutation it was:

``tiles -> shared encoder, one tile at a time (pooled) -> per-tile projection -> concatenated in
shuffled order -> MLP -> permutation index``

The encoder sees each tile on its own (the paper's "context-free network"), so any
:class:`~medssl.models.base.Encoder` works; tiles are multiples of the encoder's patch when it
has one. The permutation set is a buffer: it travels with the checkpoint.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep
from torch import nn

from .base import Task, register_task

__all__ = ["JigsawTask", "maximal_hamming_permutations"]

MAX_ENUMERATED = 400_000  # 9! = 362880 permutations are enumerated; larger puzzles draw candidates


@lru_cache(maxsize=8)
def _permutations(n_tiles: int, n_permutations: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if math.factorial(n_tiles) <= MAX_ENUMERATED:
        candidates = np.array(list(itertools.permutations(range(n_tiles))), dtype=np.int8)
    else:
        candidates = np.array([rng.permutation(n_tiles) for _ in range(50_000)], dtype=np.int16)
    if n_permutations > len(candidates):
        raise ValueError(f"{n_tiles} tiles have only {len(candidates)} permutations, {n_permutations} asked for")
    chosen = [int(rng.integers(len(candidates)))]
    nearest = (candidates != candidates[chosen[0]]).sum(1)  # each candidate's distance to the chosen set
    for _ in range(n_permutations - 1):
        nearest[chosen] = -1
        best = int(nearest.argmax())
        chosen.append(best)
        nearest = np.minimum(nearest, (candidates != candidates[best]).sum(1))
    return candidates[chosen].astype(np.int64)


def maximal_hamming_permutations(n_tiles: int, n_permutations: int = 100, seed: int = 0) -> torch.Tensor:
    """``(n_permutations, n_tiles)`` permutations chosen greedily so that the closest two differ in as
    many places as possible (Noroozi & Favaro's Algorithm 1); the same for the same arguments."""
    return torch.from_numpy(_permutations(int(n_tiles), int(n_permutations), int(seed)).copy())


@register_task("jigsaw")
class JigsawTask(Task):
    """Solve jigsaw puzzles of the images with ``backbone`` (any :class:`~medssl.models.base.Encoder`).

    Args:
        grid: cells per axis (default 3 in 2D, 2 in 3D: 9 or 8 tiles).
        n_permutations: size of the permutation set (the classes; 100 as in the paper's ablation).
        tile_size: tile edge in pixels (default: the largest multiple of the encoder's patch that
            leaves a gap of at least an eighth of the cell).
        tile_dim, hidden_dim: per-tile projection width and the classifier's hidden width.
        pooling: how a tile's tokens become one vector (default ``cls`` with a CLS token, else ``mean``).
        seed: seed of the permutation set (fixed: it is the task's definition, not training noise).
    """

    def __init__(self, backbone: nn.Module, grid: int | None = None, n_permutations: int = 100, tile_size: int | None = None,
                 tile_dim: int = 256, hidden_dim: int = 512, pooling: str | None = None, seed: int = 0,
                 image_key: str = "image") -> None:
        super().__init__(backbone)
        dims = backbone.spatial_dims
        self.grid = ensure_tuple_rep(grid or (3 if dims == 2 else 2), dims)
        if min(self.grid) < 1 or math.prod(self.grid) < 2:
            raise ValueError(f"a jigsaw grid needs at least 2 cells, got {self.grid}")
        self.n_tiles = math.prod(self.grid)
        self.tile_size, self.image_key = tile_size, image_key
        self.required_keys = (image_key,)
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.register_buffer("permutations", maximal_hamming_permutations(self.n_tiles, n_permutations, seed))
        self.tile_head = nn.Sequential(nn.Linear(backbone.embed_dim, tile_dim), nn.GELU())
        self.classifier = nn.Sequential(nn.Linear(self.n_tiles * tile_dim, hidden_dim), nn.GELU(),
                                        nn.Linear(hidden_dim, n_permutations))

    # -- puzzles --------------------------------------------------------------------------
    def _tile_edges(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cells = tuple(s // g for s, g in zip(spatial, self.grid))
        patch = ensure_tuple_rep(getattr(self.backbone, "patch_size", 1), len(spatial))
        if self.tile_size:
            tile = ensure_tuple_rep(self.tile_size, len(spatial))
        else:
            tile = tuple(max(p, (c - max(1, c // 8)) // p * p) for c, p in zip(cells, patch))
        if any(t > c for t, c in zip(tile, cells)) or any(t % p for t, p in zip(tile, patch)):
            raise ValueError(f"jigsaw tiles {tile} do not fit cells {cells} of an image {spatial} with a {self.grid} grid "
                             f"(tiles must be multiples of the patch {patch}); use a larger image or a smaller grid")
        return cells, tile

    def cut(self, img: torch.Tensor, jitter: bool = True) -> torch.Tensor:
        """``(B, C, *S)`` -> tiles ``(B, T, C, *tile)`` in raster order of the cells, each at a random
        offset inside its cell (``jitter``) or centred."""
        b, spatial = img.shape[0], tuple(img.shape[2:])
        cells, tile = self._tile_edges(spatial)
        corners = torch.stack(torch.meshgrid(*[torch.arange(g) * c for g, c in zip(self.grid, cells)], indexing="ij"), -1)
        corners = corners.reshape(1, self.n_tiles, -1).to(img.device)  # (1, T, dims) cell corners
        slack = torch.tensor([c - t for c, t in zip(cells, tile)], device=img.device)
        if jitter:
            offset = (torch.rand(b, self.n_tiles, len(spatial), device=img.device) * (slack + 1)).floor().long()
        else:
            offset = (slack // 2).expand(b, self.n_tiles, -1)
        start = corners + offset  # (B, T, dims)
        nd = len(spatial)
        index = [torch.arange(b, device=img.device).view(b, 1, *[1] * nd)]
        for axis, t in enumerate(tile):
            shape = [b, self.n_tiles] + [1] * nd
            shape[2 + axis] = t
            index.append((start[..., axis].view(b, self.n_tiles, *[1] * nd) + torch.arange(t, device=img.device).view(
                [1, 1] + [t if i == axis else 1 for i in range(nd)])).expand(shape))
        return img.movedim(1, -1)[tuple(index)].movedim(-1, 2)  # (B, T, C, *tile)

    def shuffle(self, tiles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Slot ``j`` of image ``b`` gets tile ``permutations[labels[b], j]``."""
        order = self.permutations[labels]  # (B, T)
        return tiles.gather(1, order.view(*order.shape, *[1] * (tiles.ndim - 2)).expand_as(tiles))

    def logits(self, batch: dict | None, shuffled: torch.Tensor) -> torch.Tensor:
        """Permutation scores ``(B, n_permutations)`` of shuffled tiles ``(B, T, C, *tile)``."""
        b, t = shuffled.shape[:2]
        tiles = shuffled.transpose(0, 1).flatten(0, 1)  # (T * B, C, *tile), tile-major: the context repeats per tile
        z = self.tile_head(self.embed(batch, tiles, self.pooling))  # (T * B, tile_dim)
        return self.classifier(z.view(t, b, -1).transpose(0, 1).flatten(1))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        img = batch[self.image_key]
        labels = torch.randint(len(self.permutations), (img.shape[0],), device=img.device)
        logits = self.logits(batch, self.shuffle(self.cut(img), labels)).float()
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy, "chance": torch.tensor(1.0 / len(self.permutations))}

    # -- pictures -------------------------------------------------------------------------
    def _place(self, tiles: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tiles ``(B, T, C, *tile)`` packed edge to edge in slot order, centred in an image shaped
        ``like`` (the margin NaN): the middle slices of a 3D picture cut through tiles, not gaps."""
        _, tile = self._tile_edges(tuple(like.shape[2:]))
        origin = [(s - g * t) // 2 for s, g, t in zip(like.shape[2:], self.grid, tile)]
        out = torch.full_like(like, float("nan"), dtype=torch.float32)
        for j, cell in enumerate(itertools.product(*[range(g) for g in self.grid])):
            at = [slice(o + i * t, o + (i + 1) * t) for o, i, t in zip(origin, cell, tile)]
            out[(slice(None), slice(None), *at)] = tiles[:, j].float()
        return out

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """``input``, ``shuffled`` (the puzzle) and ``solved`` (tiles put back by the predicted permutation)."""
        img = batch[self.image_key]
        tiles = self.cut(img, jitter=False)
        labels = torch.randint(len(self.permutations), (img.shape[0],), device=img.device)
        shuffled = self.shuffle(tiles, labels)
        guess = self.logits(batch, shuffled).argmax(-1)
        inverse = self.permutations[guess].argsort(-1)  # slot of each tile under the guessed permutation
        solved = shuffled.gather(1, inverse.view(*inverse.shape, *[1] * (tiles.ndim - 2)).expand_as(tiles))
        return {"input": img.float(), "shuffled": self._place(shuffled, img), "solved": self._place(solved, img)}
