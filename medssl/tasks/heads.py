"""Projection heads the contrastive tasks put on top of the backbone's pooled embedding.

- :class:`ProjectionMLP`: ``Linear -> [BatchNorm] -> GELU/ReLU`` layers then a final ``Linear``
  (SimCLR's projector is 2 layers, Barlow Twins' 3 layers with BatchNorm).
- :class:`DINOHead`: the DINO head (Caron et al., 2021): an MLP to a bottleneck, L2-normalised,
  then weight-normalised prototypes whose norm is fixed to 1 (``norm_last_layer=True`` in the
  reference), i.e. logits are cosine similarities to learned prototypes.
- :class:`PixelDecoder`: every patch token of an encoder back to its patch's pixels (a few
  transformer blocks over the token grid with sinusoidal positions): the generator that turns
  fused tokens into a fused scan (:mod:`medssl.tasks.brainfuse`).
- :class:`JEPAPredictor`: I-JEPA's predictor, a narrow transformer from context tokens and
  positional mask tokens to the representations of target blocks (:mod:`medssl.tasks.ijepa`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import Block
from ..models.position import sincos_position_embedding

__all__ = ["ProjectionMLP", "DINOHead", "PixelDecoder", "JEPAPredictor"]


class ProjectionMLP(nn.Module):
    """``in_dim -> hidden_dim (x layers-1) -> out_dim``.

    Args:
        layers: number of linear layers (>= 1).
        batch_norm: BatchNorm1d after each hidden linear layer (Barlow Twins, SimCLR v2).
        activation: ``"relu"`` or ``"gelu"``.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 128, layers: int = 2, batch_norm: bool = True,
                 activation: str = "relu") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a projection needs at least 1 layer, got {layers}")
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
            mods += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            mods += [act()]
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """``(B, in_dim) -> (B, out_dim)`` logits over ``out_dim`` prototypes.

    Args:
        out_dim: number of prototypes (65536 in the reference for ImageNet; a few thousand suit a
            small medical set).
        hidden_dim, bottleneck_dim, layers: the MLP (3 layers, GELU, as the reference).
        batch_norm: BatchNorm1d after the hidden layers (the reference's ``use_bn_in_head``). It
            rescales the differences between images to unit variance, which a fresh ViT's
            near-identical embeddings need to give the teacher any signal at all.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256, layers: int = 3,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.mlp = ProjectionMLP(in_dim, hidden_dim, bottleneck_dim, layers=layers, batch_norm=batch_norm, activation="gelu")
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.prototypes, dim=-1)  # weight norm with g = 1
        return F.linear(z, w.detach() if freeze_prototypes else w)


class PixelDecoder(nn.Module):
    """Patch tokens ``(B, N, in_dim)`` on ``grid`` -> pixels ``(B, N, patch_pixels)``.

    Global attention over the whole grid (a fused token's neighbours come from other patients; the
    decoder smooths the seams), sinusoidal positions as the encoder's, zero-initialised biases.
    """

    def __init__(self, in_dim: int, patch_pixels: int, dim: int | None = None, depth: int = 2, heads: int | None = None) -> None:
        super().__init__()
        dim = dim or max(32, in_dim // 2)
        heads = heads or max(1, math.gcd(dim, 8))
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        self._pos: dict = {}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        key = (tuple(grid), str(tokens.device))
        if key not in self._pos:
            self._pos[key] = sincos_position_embedding(grid, self.embed.out_features, device=tokens.device)
        x = self.embed(tokens) + self._pos[key]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class JEPAPredictor(nn.Module):
    """Context features ``(B, Lc, in_dim)`` at raster positions -> predicted features at target positions.

    As I-JEPA's: the context tokens are projected to ``dim`` and given their positions; each
    target block is a set of mask tokens (one learned vector plus the target's positions); a few
    blocks of global attention over context + mask tokens (padding slots masked out); then a
    projection back to ``in_dim``. Each of the ``M`` target blocks of an image is predicted from
    its own copy of the context, so blocks do not see one another.
    """

    def __init__(self, in_dim: int, dim: int | None = None, depth: int = 2, heads: int | None = None) -> None:
        super().__init__()
        dim = dim or max(32, in_dim // 2)
        heads = heads or max(1, math.gcd(dim, 8))
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, in_dim)
        self._pos: dict = {}

    def _positions(self, grid: tuple[int, ...], device) -> torch.Tensor:
        key = (tuple(grid), str(device))
        if key not in self._pos:
            self._pos[key] = sincos_position_embedding(grid, self.embed.out_features, device=device)
        return self._pos[key]

    def forward(self, context: torch.Tensor, context_index: torch.Tensor, target_index: torch.Tensor,
                grid: tuple[int, ...]) -> torch.Tensor:
        """``context`` ``(B, Lc, D)`` at ``context_index`` ``(B, Lc)``; ``target_index`` ``(B, M, Lt)``
        (raster indices, -1 for padding) -> ``(B, M, Lt, D)`` predictions (zeros at padding)."""
        from ..models.blocks import key_padding_mask

        b, m, lt = target_index.shape
        pos = self._positions(grid, context.device)
        c = self.embed(context) + pos[context_index.clamp(min=0)].to(context.dtype)
        c = c.repeat_interleave(m, 0)  # (B * M, Lc, dim): one copy of the context per target block
        q = self.mask_token.to(c.dtype) + pos[target_index.reshape(b * m, lt).clamp(min=0)].to(c.dtype)
        valid = torch.cat([(context_index >= 0).repeat_interleave(m, 0), target_index.reshape(b * m, lt) >= 0], 1)
        mask = None if bool(valid.all()) else key_padding_mask(valid)
        x = torch.cat([c, q], 1)
        for blk in self.blocks:
            x = blk(x, mask)
        out = self.out(self.norm(x[:, c.shape[1]:]))  # (B * M, Lt, D)
        return (out * (target_index.reshape(b * m, lt, 1) >= 0).to(out.dtype)).reshape(b, m, lt, -1)
