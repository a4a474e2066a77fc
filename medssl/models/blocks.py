"""Pre-norm transformer block with fused-kernel attention and an optional attention mask.

Parameter names follow MONAI's ``TransformerBlock`` (``attn.qkv``, ``attn.out_proj``,
``mlp.linear1``...) so an encoder converts to ``monai.networks.nets.ViT`` by renaming only the
patch embedding. Unlike MONAI's ``SABlock`` (einsum attention unless ``use_flash_attention``),
attention always goes through ``torch.nn.functional.scaled_dot_product_attention``, which picks a
fused kernel on CPU and GPU and never materialises the attention matrix when it can avoid it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import nn

__all__ = ["Attention", "Block", "key_padding_mask"]


def key_padding_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA key-padding mask ``(B, 1, 1, L)`` from slot validity ``(B, L)`` (None: every slot valid).

    Padding slots are hidden as keys, so no real token ever attends to one. A sequence with no
    valid slot at all (a window of pure background) lets its slots attend to slot 0, so softmax
    never sees an all ``-inf`` row; those outputs are padding and unused.
    """
    if valid is None:
        return None
    keys = valid.clone()
    keys[:, 0] |= ~valid.any(1)
    return keys[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention: ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # rows: (q|k|v, head, head_dim) as in MONAI
        self.out_proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    @torch.no_grad()
    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention matrix ``(B, H, L, L)`` (for pictures; training never builds it)."""
        q, k, _ = self._qkv(x)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1)


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with optional stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=0.0, act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))
