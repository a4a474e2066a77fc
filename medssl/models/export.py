"""Convert a global-attention medssl :class:`~medssl.models.ViT` into ``monai.networks.nets.ViT``.

MONAI's ViT (and UNETR, which builds one inside) stores a position table for a fixed ``img_size``;
ours computes the same kind of sinusoidal table for any grid, so exporting writes our table for
the requested ``img_size`` into MONAI's ``patch_embedding.position_embeddings``. Block parameter
names already match MONAI's ``TransformerBlock``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import ensure_tuple_rep

from .vit import ViT

__all__ = ["monai_vit_state_dict", "to_monai_vit", "monai_vit_kwargs"]


def _check(model: ViT) -> None:
    if model.window_size is not None:
        raise ValueError("only a global-attention encoder (window_size=None) converts to monai.networks.nets.ViT")


def monai_vit_kwargs(model: ViT, img_size: int | Sequence[int]) -> dict:
    """Constructor arguments of the MONAI ViT that matches ``model`` at ``img_size``."""
    _check(model)
    return dict(in_channels=model.in_channels, img_size=ensure_tuple_rep(img_size, model.spatial_dims),
                patch_size=model.patch_size, hidden_size=model.embed_dim, mlp_dim=model.blocks[0].mlp.linear1.out_features,
                num_layers=model.depth, num_heads=model.num_heads, proj_type="conv", pos_embed_type="sincos",
                classification=model.cls_token is not None, spatial_dims=model.spatial_dims,
                qkv_bias=model.blocks[0].attn.qkv.bias is not None)


def monai_vit_state_dict(model: ViT, img_size: int | Sequence[int], cls_token: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s weights under MONAI ViT names, with position embeddings for ``img_size``.

    Args:
        cls_token: keep the CLS token (MONAI's ViT has one only with ``classification=True``;
            pass False for ``UNETR``, which has none).
    """
    _check(model)
    grid = model.grid_size(ensure_tuple_rep(img_size, model.spatial_dims))
    out: dict[str, torch.Tensor] = {}
    for name, value in {**model.state_dict(), **_folded_patch_embed(model)}.items():
        if name.startswith("patch_embed."):
            name = name.replace("patch_embed.", "patch_embedding.patch_embeddings.")
        elif name == "cls_token" and not cls_token:
            continue
        out[name] = value.detach().clone()
    pos = model.pos_embed(grid, torch.device("cpu")).unsqueeze(0)  # (1, N, D)
    out["patch_embedding.position_embeddings"] = pos.clone()
    return out


def _folded_patch_embed(model: ViT) -> dict[str, torch.Tensor]:
    """The patch projection with the input standardisation folded in (MONAI's ViT has none):
    ``W (x - m) / s + b = (W / s) x + (b - sum W m / s)``, exact because patches do not overlap."""
    w, b = model.patch_embed.weight.detach(), model.patch_embed.bias.detach()
    w = w / model._std.to(w)  # the model's own (1, C, 1, ...) buffers broadcast over (D, C, *patch)
    return {"patch_embed.weight": w, "patch_embed.bias": b - (w * model._mean.to(w)).flatten(1).sum(1)}


def to_monai_vit(model: ViT, img_size: int | Sequence[int]):
    """A ``monai.networks.nets.ViT`` carrying ``model``'s weights (its classification head, if any, stays random)."""
    from monai.networks.nets import ViT as MonaiViT

    net = MonaiViT(**monai_vit_kwargs(model, img_size))
    missing, unexpected = net.load_state_dict(monai_vit_state_dict(model, img_size), strict=False)
    missing = [k for k in missing if not k.startswith("classification_head") and "cross_attn" not in k]
    if missing or unexpected:
        raise RuntimeError(f"conversion to MONAI ViT left missing={missing} unexpected={unexpected}")
    return net
