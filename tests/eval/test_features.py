"""Embeddings: tiling of large volumes, pooling, the npz written, checkpoints that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.tiling import tiles
from medssl.eval import embed_image, load_encoder, write_embeddings
from medssl.models import ViT


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tiles_cover_the_image_and_weigh_foreground(spatial_dims):
    img = torch.zeros(1, *[10] * spatial_dims)
    img[(0,) + (slice(0, 4),) * spatial_dims] = 1
    blocks, share = tiles(img, 4)
    assert blocks.shape == (3**spatial_dims, 1, *[4] * spatial_dims)
    assert share[0] == 1 and (share[1:] == 0).all()
    assert blocks.sum() == img.sum()


def test_embedding_of_a_tiled_volume_is_the_foreground_tile_embedding():
    torch.manual_seed(0)
    enc = ViT(3, 1, patch_size=4, size="micro").eval()
    img = torch.zeros(1, 16, 8, 8)
    img[:, :8] = torch.rand(1, 8, 8, 8) + 0.1  # only the first 8^3 tile has foreground
    got = embed_image(enc, img, "mean", tile=8)
    torch.testing.assert_close(got, enc.embed(img[None, :, :8], "mean")[0])


def test_write_embeddings_npz_and_bad_checkpoint(tmp_path):
    enc = ViT(2, 1, patch_size=4, size="micro")
    torch.save(enc.state_dict(), tmp_path / "model.pt")
    loader = [{"image": torch.rand(3, 1, 16, 16), "patient": ["a", "b", "c"], "label": torch.tensor([0, 1, 0])}]
    out = write_embeddings(ViT(2, 1, patch_size=4, size="micro"), loader, tmp_path / "e.npz", checkpoint=tmp_path / "model.pt",
                           pooling="cls", progress=False)
    data = np.load(out)
    assert data["embeddings"].shape == (3, 48) and list(data["patient"]) == ["a", "b", "c"] and list(data["label"]) == [0, 1, 0]
    torch.testing.assert_close(torch.from_numpy(data["embeddings"]), enc.eval().embed(loader[0]["image"], "cls"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder(ViT(2, 1, patch_size=8, size="micro", depth=3), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError):
        load_encoder(enc, tmp_path / "missing.pt")
