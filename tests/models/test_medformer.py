"""The Medformer: latents chosen by the batch's context, 2D and 3D through one model, output queries, views."""

from __future__ import annotations

import pytest
import torch

from medssl.models import Medformer
from medssl.models.base import GridEncoder, embed
from medssl.tasks import MAETask


def _model(**kwargs) -> Medformer:
    torch.manual_seed(0)
    return Medformer(patch_size=4, embed_dim=32, num_heads=2, depth=2, num_latents=6, latents_per_entry=3, **kwargs)


def _images(spatial_dims: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, *[16 if spatial_dims == 2 else 8] * spatial_dims, generator=torch.Generator().manual_seed(1))


def test_the_latents_follow_the_context_and_only_the_chosen_entries_learn():
    model = _model()
    x = _images(2)
    ct = model.latent_array({"modality": ["CT", "CT"], "organ": ["chest", "chest"]}, 2, 2, x.device)
    mr = model.latent_array({"modality": ["MR", "MR"], "organ": ["chest", "chest"]}, 2, 2, x.device)
    assert ct.shape == (2, 6 + 4 * 3, 32)
    parts = model.latent_slices()
    assert list(parts) == ["shared", "organ", "modality", "spatial_dims", "task"] and parts["shared"] == slice(0, 6)
    shared, organ, modality = parts["shared"], parts["organ"], parts["modality"]
    assert torch.equal(ct[:, shared], mr[:, shared]) and torch.equal(ct[:, organ], mr[:, organ])
    assert not torch.allclose(ct[:, modality], mr[:, modality])
    assert not torch.allclose(model(x, context={"modality": ["CT", "CT"]}), model(x, context={"modality": ["MR", "MR"]}))

    model.zero_grad()
    model(x, context={"modality": ["CT", "MR"], "organ": ["chest", "abdomen"]}).sum().backward()
    modalities, organs = model.collections["modality"], model.collections["organ"]
    used_modality = {modalities.index("CT"), modalities.index("MR")}
    used_organ = {organs.index("chest"), organs.index("abdomen")}
    for i in range(len(modalities)):
        assert (model.entries["modality"].grad[i].abs().sum() > 0) == (i in used_modality), modalities[i]
    for i in range(len(organs)):
        assert (model.entries["organ"].grad[i].abs().sum() > 0) == (i in used_organ), organs[i]
    assert model.latents.grad.abs().sum() > 0  # the shared latents always learn
    dims = model.collections["spatial_dims"]
    assert [bool(g.abs().sum() > 0) for g in model.entries["spatial_dims"].grad] == [v == "2" for v in dims]
    assert model.patch_embed["3"].weight.grad is None  # a 2D batch leaves the 3D adapter alone


def test_a_value_the_collection_does_not_list_and_a_missing_field_take_the_unknown_entry():
    model = _model()
    unknown = len(model.collections["modality"]) - 1
    assert model.entry_index("modality", {"modality": ["US", "CT"]}, 2, 2, torch.device("cpu")).tolist() == [
        unknown, model.collections["modality"].index("CT")]
    assert model.entry_index("modality", None, 3, 2, torch.device("cpu")).tolist() == [unknown] * 3
    assert model.entry_index("spatial_dims", None, 2, 3, torch.device("cpu")).tolist() == [model.collections["spatial_dims"].index("3")] * 2
    assert model.entry_index("spatial_dims", {"spatial_dims": torch.tensor([2, 2])}, 2, 2, torch.device("cpu")).tolist() == [0, 0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_2d_and_3d_through_one_model_with_the_shapes_tasks_need(spatial_dims):
    model = _model()
    x = _images(spatial_dims, n=3)
    n = 16 if spatial_dims == 2 else 8
    grid = model.grid_size(x.shape[2:])
    assert grid == (n // 4,) * spatial_dims
    tokens = model(x)
    assert tokens.shape == (3, 1 + (n // 4) ** spatial_dims, 32)
    assert embed(model, x, "cls").shape == (3, 32) and embed(model, x, "mean").shape == (3, 32)
    keep = torch.tensor([[0, 2, 5], [1, 3, -1], [4, 6, 7]])
    kept = model(x, keep)
    assert kept.shape == (3, 4, 32)
    assert torch.equal(kept[1, 3], torch.zeros(32))  # the padding slot
    # keeping every token in raster order is the plain forward pass
    full = model(x, torch.arange((n // 4) ** spatial_dims).expand(3, -1))
    torch.testing.assert_close(full, tokens)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model(torch.rand(1, 1, *[6] * spatial_dims))


def test_one_model_trains_mae_in_2d_and_3d_through_its_views():
    model = _model()
    view2, view3 = model.view(2), model.view(3)
    assert isinstance(view2, GridEncoder) and view2.patch_size == (4, 4) and view3.patch_size == (4, 4, 4)
    assert set(view2.parameters()) == set(model.parameters()) == set(view3.parameters())  # no copy
    mae2, mae3 = MAETask(view2, mask_ratio=0.5), MAETask(view3, mask_ratio=0.5)
    shared = model.blocks[0].attn.qkv.weight
    before = shared.detach().clone()
    optimizer = torch.optim.SGD(list({id(p): p for p in [*mae2.parameters(), *mae3.parameters()]}.values()), lr=0.1)
    loss = mae2({"image": _images(2), "modality": ["DX", "CR"]})["loss"] + mae3({"image": _images(3), "modality": ["CT", "MR"]})["loss"]
    loss.backward()
    assert model.patch_embed["2"].weight.grad is not None and model.patch_embed["3"].weight.grad is not None
    optimizer.step()
    assert not torch.equal(shared, before)
    with pytest.raises(ValueError, match="2D view"):
        view2(_images(3))


def test_a_default_context_stands_in_where_the_batch_does_not_say_and_the_feature_map_keeps_the_weights():
    from medssl.models import MedformerFeatureMap

    model = _model(default_context={"organ": "chest", "modality": "DX"})
    organs, cpu = model.collections["organ"], torch.device("cpu")
    assert model.entry_index("organ", None, 2, 2, cpu).tolist() == [organs.index("chest")] * 2
    assert model.entry_index("organ", {"organ": ["knee", "brain"]}, 2, 2, cpu).tolist() == [organs.index("knee"), organs.index("brain")]
    with pytest.raises(ValueError, match="not collections"):
        _model(default_context={"scanner": "GE"})
    torch.manual_seed(0)
    feature_map = MedformerFeatureMap(patch_size=4, embed_dim=32, num_heads=2, depth=2, num_latents=6, latents_per_entry=3)
    feature_map.load_state_dict(_model().state_dict())  # strict: the same keys
    for dims in (2, 3):
        x = _images(dims)
        fmap = feature_map.eval()(x)
        assert fmap.shape == (2, 32, *model.grid_size(x.shape[2:]))
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), _model().eval()(x)[:, 1:])
