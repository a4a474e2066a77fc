"""Jigsaw puzzles: the permutation set, tiles cut and shuffled exactly, and a tiny model that learns to solve them."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.models import ViT
from medssl.tasks import JigsawTask
from medssl.tasks.jigsaw import maximal_hamming_permutations


def test_the_permutation_set_is_fixed_distinct_and_far_apart():
    perms = maximal_hamming_permutations(9, 100)
    assert perms.shape == (100, 9) and torch.equal(perms, maximal_hamming_permutations(9, 100))
    assert all(sorted(p.tolist()) == list(range(9)) for p in perms)
    distance = (perms[:, None] != perms[None]).sum(-1) + 9 * torch.eye(100, dtype=torch.long)
    assert len({tuple(p.tolist()) for p in perms}) == 100 and int(distance.min()) >= 6  # random sets get pairs at 2
    big = maximal_hamming_permutations(27, 20)  # 27! candidates cannot be listed: drawn
    assert big.shape == (20, 27) and all(sorted(p.tolist()) == list(range(27)) for p in big)
    with pytest.raises(ValueError, match="only 2 permutations"):
        maximal_hamming_permutations(2, 3)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tiles_come_from_their_cells_and_shuffle_by_the_permutation(spatial_dims):
    task = JigsawTask(ViT(spatial_dims, 1, patch_size=2, size="micro"), grid=2, n_permutations=5)
    img = torch.arange(2 * 12**spatial_dims, dtype=torch.float32).view(2, 1, *[12] * spatial_dims)
    tiles = task.cut(img)  # cells of 6, tiles of 4 (a multiple of the patch, gap >= 1)
    assert tiles.shape == (2, 2**spatial_dims, 1, *[4] * spatial_dims)
    for j in range(2**spatial_dims):  # every tile lies inside its own cell of its own image, contiguous
        cell = [(j >> (spatial_dims - 1 - a)) & 1 for a in range(spatial_dims)]
        first = tiles[1, j, 0][(0,) * spatial_dims].long().item() - 12**spatial_dims
        coords = [(first // 12 ** (spatial_dims - 1 - a)) % 12 for a in range(spatial_dims)]
        assert all(c * 6 <= x <= c * 6 + 2 for c, x in zip(cell, coords))
        step = tuple(slice(None) if a == 0 else 0 for a in range(spatial_dims))
        assert torch.equal(tiles[1, j, 0][step].diff(), torch.full((3,), 12.0 ** (spatial_dims - 1)))
    labels = torch.tensor([3, 1])
    shuffled = task.shuffle(tiles, labels)
    for b in range(2):
        for slot, source in enumerate(task.permutations[labels[b]].tolist()):
            assert torch.equal(shuffled[b, slot], tiles[b, source])


def _structured(n, spatial_dims, seed):
    """Images whose every part shows where it is: ramps along each axis plus noise and a random blob."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0, 1, 16)] * spatial_dims, indexing="ij")
    base = sum((a + 1) * x for a, x in enumerate(axes)) / sum(range(1, spatial_dims + 1))
    x = base.expand(n, 1, *base.shape) * (0.7 + 0.6 * torch.rand(n, 1, *[1] * spatial_dims, generator=g))
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_tiny_model_learns_to_solve_puzzles_of_held_out_images(spatial_dims):
    torch.manual_seed(0)
    task = JigsawTask(ViT(spatial_dims, 1, patch_size=4, size="micro"), grid=2, n_permutations=8, tile_dim=32, hidden_dim=64)
    train, held_out = _structured(64, spatial_dims, 0), _structured(64, spatial_dims, 1)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        batch = {"image": train[(step * 16) % 64:][:16]}
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert sum(losses[-10:]) / 10 < 0.5 * math.log(8)  # from chance (ln 8) to well below it
    task.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        accuracy = sum(float(task({"image": held_out})["accuracy"]) for _ in range(5)) / 5
    assert accuracy > 3 / 8  # chance is 1/8
