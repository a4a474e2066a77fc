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


def test_a_killed_embedding_run_resumes_from_its_parts_and_writes_the_same_table(tmp_path):
    from medssl.data.dataset import load_source
    from medssl.eval.embedder import EmbeddingWriter, still_to_embed

    rng = np.random.default_rng(0)
    data = tmp_path / "set.npz"
    np.savez(data, train_images=rng.integers(0, 255, (10, 16, 16), dtype=np.uint8), train_labels=rng.integers(0, 2, (10, 1)),
             test_images=rng.integers(0, 255, (5, 16, 16), dtype=np.uint8))  # a test split without labels
    entries = load_source(data, split="all", salt="s")
    assert [e["split"] for e in entries] == ["train"] * 10 + ["test"] * 5
    assert [e["id"] for e in entries] == [e["id"] for e in load_source(data, split="all", salt="s")]  # stable

    def loader(items):
        keys = ("id", "split", "source", "patient")
        return [{"image": torch.stack([torch.as_tensor(e["image"]) for e in items[i:i + 2]]),
                 **{k: [e[k] for e in items[i:i + 2]] for k in keys},
                 **({"label": torch.tensor([e["label"] for e in items[i:i + 2]])} if "label" in items[i] else {})}
                for i in range(0, len(items), 2)]

    enc = ViT(2, 1, patch_size=4, size="micro").eval()
    straight = write_embeddings(enc, loader(entries), tmp_path / "a.npz", progress=False, table="parquet", part_size=4)
    out = tmp_path / "b.npz"

    class Killed(Exception):
        pass

    def killing(items, at):
        for i, batch in enumerate(loader(items)):
            if i == at:
                raise Killed
            yield batch

    from medssl.eval.embedder import embedding_evaluator

    with pytest.raises(Killed):  # killed after 6 images: one part of 4 (and 2 unsaved) on disk
        embedding_evaluator(enc, killing(entries, 3), out, progress=False, part_size=4, table="parquet").run()
    assert len(list((tmp_path / "b.npz.parts").glob("part_*.npz"))) == 1 and not out.exists()
    left = still_to_embed(entries, out)
    assert [e["id"] for e in left] == [e["id"] for e in entries[4:]]
    write_embeddings(enc, loader(left), out, progress=False, table="parquet", part_size=4)
    a, b = np.load(straight), np.load(out)
    assert b["id"].tolist() == [e["id"] for e in entries] and b["label"].tolist() == a["label"].tolist()
    assert b["label"].tolist()[10:] == [-1] * 5 and b["split"].tolist() == a["split"].tolist()
    np.testing.assert_allclose(b["embeddings"], a["embeddings"], atol=1e-6)
    import pandas as pd

    assert pd.read_parquet(tmp_path / "b.parquet").equals(pd.read_parquet(tmp_path / "a.parquet"))
    assert not (tmp_path / "b.npz.parts").exists()

    # killed after the last part was saved but before the merge: that part is embedded again, nothing twice
    c = tmp_path / "c.npz"
    (tmp_path / "c.npz.parts").mkdir()
    np.savez(tmp_path / "c.npz.parts" / "part_000000.npz", **dict(np.load(straight)))  # every row saved, no merge yet
    left = still_to_embed(entries, c)
    assert [e["id"] for e in left] == [e["id"] for e in entries] and not list((tmp_path / "c.npz.parts").glob("*.npz"))
