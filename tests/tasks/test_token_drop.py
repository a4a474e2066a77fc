"""FLIP-style token dropping for the view encodings of the two-view tasks, 2D and 3D, global and windowed."""

from __future__ import annotations

import pytest
import torch

from medssl.models import ViT
from medssl.models.base import embed
from medssl.tasks import BYOLTask, SimCLRTask, SwAVTask
from medssl.tasks.token_drop import pool_kept


@pytest.mark.parametrize("dims,window", [(2, 0), (2, 2), (3, 0), (3, 2)])
def test_training_encodes_a_share_of_each_window_and_evaluation_every_token(dims, window):
    torch.manual_seed(0)
    vit = ViT(dims, 1, patch_size=4, size="micro", window_size=window, global_every=2)
    task = SimCLRTask(vit, hidden_dim=16, out_dim=8, token_drop=0.5)
    seen = []
    vit.register_forward_hook(lambda m, args, out: seen.append(out.shape[1] - m.num_prefix_tokens))
    x = torch.rand(3, 1, *[16] * dims)
    n = (16 // 4) ** dims
    task.train()
    z = task.embed(None, x, "mean", drop=task.token_drop)
    assert seen[-1] == n // 2 and z.shape == (3, vit.embed_dim)  # half of each window's tokens
    z.sum().backward()
    assert vit.patch_embed.weight.grad is not None and torch.isfinite(vit.patch_embed.weight.grad).all()
    task.eval()
    with torch.no_grad():
        full = task.embed(None, x, "mean", drop=task.token_drop)
    assert seen[-1] == n
    torch.testing.assert_close(full, embed(vit, x, "mean"))


def test_kept_tokens_pool_without_the_padding_slots():
    tokens = torch.tensor([[[9.0], [1.0], [3.0], [0.0]]])  # CLS, two kept tokens, one padding slot
    keep = torch.tensor([[5, 2, -1]])
    assert pool_kept(tokens, keep, "mean", 1).item() == pytest.approx(2.0)
    assert pool_kept(tokens, keep, "cls", 1).item() == pytest.approx(9.0)
    with pytest.raises(ValueError, match="flattened"):
        pool_kept(tokens, keep, "flatten", 1)


@pytest.mark.parametrize("make", [lambda vit: SimCLRTask(vit, hidden_dim=16, out_dim=8, token_drop=0.75),
                                  lambda vit: SwAVTask(vit, hidden_dim=16, out_dim=8, n_prototypes=4, token_drop=0.75),
                                  lambda vit: BYOLTask(vit, hidden_dim=16, out_dim=8, token_drop=0.75)])
def test_two_view_tasks_train_on_dropped_tokens(make):
    torch.manual_seed(0)
    task = make(ViT(2, 1, patch_size=4, size="micro")).train()
    task.step_start(0.5)
    out = task({"views": torch.rand(4, 2, 1, 16, 16)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert task.backbone.patch_embed.weight.grad.abs().sum() > 0
    task.eval()
    with torch.no_grad():
        assert torch.isfinite(task({"views": torch.rand(4, 2, 1, 16, 16)})["loss"])  # evaluation: every token


@pytest.mark.parametrize("cls", [SimCLRTask, SwAVTask, BYOLTask])
def test_a_token_drop_outside_zero_to_one_is_refused(cls):
    with pytest.raises(ValueError, match="token_drop"):
        cls(ViT(2, 1, patch_size=4, size="micro"), token_drop=1.0)
