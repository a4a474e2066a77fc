"""Pre-norm transformer blocks with fused-kernel attention and an optional attention mask:
self-attention (:class:`Attention`, :class:`Block`) and cross-attention of queries over a
context sequence (:class:`CrossAttention`, :class:`CrossBlock`: a detection decoder's object
queries over image tokens, a Perceiver's latents over inputs). Sequences are ``(B, L, D)``, so
the same blocks serve 2D and 3D.

Parameter names follow MONAI's ``TransformerBlock`` (``attn.qkv``, ``attn.out_proj``,
``mlp.linear1``...) so an encoder converts to ``monai.networks.nets.ViT`` by renaming only the
patch embedding. Unlike MONAI's ``SABlock`` (einsum attention unless ``use_flash_attention``),
attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels that
never materialise the attention matrix) except for short sequences on CPU, where the written-out
form is measurably faster (see ``CPU_SHORT_TOKENS``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import nn

__all__ = ["Attention", "Block", "CrossAttention", "CrossBlock", "key_padding_mask", "written_out_attention"]


# On CPU, both of PyTorch's SDPA kernels are slow for short sequences: the fused (flash) kernel
# pays a large fixed cost per (batch, head), and the math kernel upcasts bf16 inputs to fp32.
# Measured fwd+bwd in bf16 on a 2-core AVX512-BF16 machine, flash vs math: 13 tokens 5.3x slower,
# 129 tokens 1.9x slower, 256 tokens 1.3x faster, 1025 tokens 4x faster. Windows (16-64 tokens)
# and small-image MAE encoders live in the short regime, so there attention is written out
# (two matmuls in the autocast dtype and a softmax); everywhere else, and always on GPU, it is SDPA.
CPU_SHORT_TOKENS = 192
_WRITTEN_OUT = [False]  # set by written_out_attention()


@contextmanager
def written_out_attention():
    """Inside, attention is always the written-out form: ``torch.func.vmap`` (per-sample gradients)
    has no batching rule for SDPA's fused CPU kernel and falls back to a slow loop over the batch,
    with a warning each call."""
    before, _WRITTEN_OUT[0] = _WRITTEN_OUT[0], True
    try:
        yield
    finally:
        _WRITTEN_OUT[0] = before


def _short_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, L)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1).to(v.dtype) @ v


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
        q, k, v = self._qkv(x).unbind(0)
        return self.out_proj(_attend(q, k, v, mask).transpose(1, 2).reshape(b, n, d))  # _attend: (B, H, L, hd)

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

    def windows(self, windows: torch.Tensor, mask: torch.Tensor | None = None, busy: torch.Tensor | None = None) -> torch.Tensor:
        """This block on windows ``(W, T, D)``; with ``busy`` (indices of windows holding any real
        token) only those run and the others (all padding) pass through untouched, which is where
        dropping background saves compute in windowed blocks. ``mask`` is for the busy windows."""
        if busy is None:
            return self.forward(windows, mask)
        return windows.index_copy(0, busy, self.forward(windows.index_select(0, busy), mask))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if torch.jit.is_scripting():
        short, written_out = 192, False  # CPU_SHORT_TOKENS: TorchScript cannot read a module global (this branch exists only there)
    else:
        short, written_out = CPU_SHORT_TOKENS, _WRITTEN_OUT[0]
    if written_out or (q.device.type == "cpu" and max(q.shape[-2], k.shape[-2]) <= short):
        return _short_cpu_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CrossAttention(nn.Module):
    """Multi-head attention of ``queries`` ``(B, Lq, Dq)`` over ``context`` ``(B, Lc, Dc)`` -> ``(B, Lq, Dq)``.

    ``mask``: a key-padding mask ``(B, 1, 1, Lc)`` (:func:`key_padding_mask`) or a boolean
    ``(B, 1 or H, Lq, Lc)``, True where a query may look.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (parts, B, H, L, hd)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = queries.shape
        q = self._heads(self.q(queries), 1)[0]
        k, v = self._heads(self.kv(context), 2).unbind(0)
        return self.out_proj(_attend(q, k, v, mask).transpose(1, 2).reshape(b, n, d))

    @torch.no_grad()
    def weights(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention ``(B, H, Lq, Lc)`` of each query over the context (for pictures)."""
        q = self._heads(self.q(queries), 1)[0]
        k, _ = self._heads(self.kv(context), 2)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1)


class CrossBlock(nn.Module):
    """A decoder block: ``x + self_attn(norm(x))`` (optional), ``x + cross_attn(norm(x), norm(context))``,
    ``x + mlp(norm(x))``, with optional stochastic depth (DETR's decoder layer, pre-norm)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, self_attention: bool = True, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, qkv_bias) if self_attention else None
        self.norm_self = norm_layer(dim) if self_attention else None
        self.norm_q = norm_layer(dim)
        self.norm_context = norm_layer(context_dim or dim)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim, qkv_bias)
        self.norm_mlp = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=0.0, act="GELU")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                self_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.drop_path(self.self_attn(self.norm_self(x), self_mask))
        x = x + self.drop_path(self.cross_attn(self.norm_q(x), self.norm_context(context), context_mask))
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))
