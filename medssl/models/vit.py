"""One Vision Transformer for 2D and 3D images (ViTDet-style, He/Li et al. arXiv:2203.16527).

- convolutional patch embedding (``Conv[Conv.CONV, spatial_dims]``), any input whose size is a
  multiple of the patch;
- log-spaced sinusoidal position embeddings computed for the grid the input gives
  (:mod:`~medssl.models.position`), so no table is learned or interpolated;
- window attention without shift, with global attention every ``global_every``-th block and always
  in the last block (so a CLS token sees the whole image before pooling);
  ``window_size=None`` is a plain global ViT;
- optional CLS token; ``forward(x, keep)`` runs on the visible tokens only (masked pretraining);
- optional input standardisation ``(x - pixel_mean) / pixel_std`` inside the model (as ViTDet's
  detectron2 models do), so a checkpoint carries the convention it was trained with. Images from
  the pipeline are in [0, 1]; their shared offset otherwise dominates a fresh ViT's embeddings
  (``bench/dino_signal.py``).

Windows and masking: tokens are kept in window-major order (:class:`~medssl.models.windows.WindowLayout`).
With windows, ``keep`` must hold the same number of slots for every window, window by window
(``medssl.tasks.masking`` samples it that way); slots of -1 are padding, masked out of attention.

TorchScript: ``torch.jit.script`` compiles the model (and :class:`~medssl.models.ViTFeatureMap`,
what MONAI's ``ckpt_export`` scripts by default). Eager calls cache the position table and window
layout of each grid; a scripted model computes them for the grid of each input (same functions,
same values), so it runs at any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from monai.networks.layers import Conv
from monai.utils import ensure_tuple_rep
from torch import nn

from .blocks import Block, key_padding_mask
from .base import embed
from .position import sincos_position_embedding
from .windows import WindowLayout, window_indices

__all__ = ["ViT", "SIZES"]

# Named sizes. micro is for tests and smoke runs; tiny/small/base are DeiT-Ti, DeiT-S and ViT-B.
SIZES = {
    "micro": dict(embed_dim=48, depth=2, num_heads=2),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


class ViT(nn.Module):
    """ViT encoder: ``(B, C, *spatial) -> (B, P + N, D)`` tokens (P = 1 with a CLS token, else 0).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        patch_size: patch edge, an int or one per axis.
        size: a named size from :data:`SIZES`; ``embed_dim``/``depth``/``num_heads`` override it.
        mlp_ratio: MLP width / embed_dim.
        window_size: tokens per window edge (int or per axis); None or 0 for global attention only
            (0 is the spelling that survives MONAI's runner, which drops ``None`` overrides).
        global_every: with windows, every ``global_every``-th block attends globally.
        cls_token: prepend a learned CLS token.
        drop_path: stochastic depth rate at the last block (linear from 0).
        pixel_mean, pixel_std: the input is standardised as ``(x - pixel_mean) / pixel_std`` first
            (a number, or one per channel); the defaults leave it as it is.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, patch_size: int | Sequence[int] = 16, size: str = "tiny",
                 embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 window_size: int | Sequence[int] | None = None, global_every: int = 4, cls_token: bool = True,
                 qkv_bias: bool = True, drop_path: float = 0.0, pos_temperature: float = 10000.0,
                 pixel_mean: float | Sequence[float] = 0.0, pixel_std: float | Sequence[float] = 1.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        if global_every < 1:
            raise ValueError(f"global_every must be >= 1, got {global_every}")
        dims = {**SIZES[size], **{k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v}}
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.embed_dim, self.depth, self.num_heads = dims["embed_dim"], dims["depth"], dims["num_heads"]
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        if window_size is not None and not isinstance(window_size, (int, Sequence)):
            raise ValueError(f"window_size must be an int, one per axis, 0 or None (global attention), got {window_size!r}")
        if isinstance(window_size, str) or (isinstance(window_size, int) and window_size < 0):
            raise ValueError(f"window_size must be an int >= 0 (0: global attention), got {window_size!r}")
        self.window_size = None if not window_size else ensure_tuple_rep(window_size, spatial_dims)
        self.pos_temperature = pos_temperature
        self.num_prefix_tokens = int(cls_token)
        d = self.embed_dim
        self.patch_embed = Conv[Conv.CONV, spatial_dims](in_channels, d, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cls_token else None
        rates = torch.linspace(0, drop_path, self.depth).tolist()
        self.blocks = nn.ModuleList(Block(d, self.num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.global_blocks = tuple(self.window_size is None or (i + 1) % global_every == 0 or i == self.depth - 1
                                   for i in range(self.depth))
        self.norm = nn.LayerNorm(d)
        self.pixel_mean, self.pixel_std = self._pixel_stats(pixel_mean, pixel_std)
        # the same facts as lists, the form TorchScript reads (it has no variable-length tuples)
        self._patch, self._window, self._global = list(self.patch_size), list(self.window_size or ()), list(self.global_blocks)  # _window: [] is never read
        self._plain_input = all(m == 0 for m in self.pixel_mean) and all(v == 1 for v in self.pixel_std)
        self._pos_cache: dict = {}
        self._layout_cache: dict = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # As the MAE reference: xavier on linear layers and on the flattened patch projection.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pixel_stats(self, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = (tuple(float(v) for v in ensure_tuple_rep(a, self.in_channels)) for a in (mean, std))
        if any(v <= 0 for v in std):
            raise ValueError(f"pixel_std must be positive, got {std}")
        for name, buf in (("_mean", mean), ("_std", std)):  # not in the state dict: old checkpoints still load
            self.register_buffer(name, torch.tensor(buf).view(1, -1, *[1] * self.spatial_dims), persistent=False)
        return mean, std

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - pixel_mean) / pixel_std`` (``x`` itself with the defaults)."""
        if self._plain_input:
            return x
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    # -- geometry -------------------------------------------------------------------------
    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an input of ``spatial_shape`` (raises if not a multiple of the patch)."""
        return tuple(self._grid([int(s) for s in spatial_shape]))

    def _grid(self, shape: list[int]) -> list[int]:
        fits = len(shape) == len(self._patch)
        grid: list[int] = []
        for s, p in zip(shape, self._patch):
            fits = fits and s % p == 0
            grid.append(s // p)
        if not fits:
            raise ValueError(f"input size {shape} is not a {self.spatial_dims}D multiple of patch_size {self._patch}")
        return grid

    def pos_embed(self, grid: list[int], device: torch.device) -> torch.Tensor:
        """Position embeddings ``(N, D)`` of ``grid`` (cached per grid and device in eager calls)."""
        if torch.jit.is_scripting():
            return sincos_position_embedding(grid, self.embed_dim, self.pos_temperature, device)
        else:
            if torch.jit.is_tracing():  # a cache would make the traced graph depend on call history
                return sincos_position_embedding(grid, self.embed_dim, self.pos_temperature, device=device)
            key = (tuple(grid), str(device))
            if key not in self._pos_cache:
                self._pos_cache[key] = sincos_position_embedding(grid, self.embed_dim, self.pos_temperature, device=device)
            return self._pos_cache[key]

    def layout(self, grid: Sequence[int], device: torch.device | str = "cpu") -> WindowLayout | None:
        """The :class:`WindowLayout` of ``grid`` (None for a global-attention model)."""
        if self.window_size is None:
            return None
        key = (tuple(grid), str(device))
        if torch.jit.is_tracing():
            return WindowLayout(grid, self.window_size).to(device)
        if key not in self._layout_cache:
            self._layout_cache[key] = WindowLayout(grid, self.window_size).to(device)
        return self._layout_cache[key]

    def _windows(self, grid: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(order, window_of, slot_of, n_windows)`` of :meth:`layout` (a windowed model only)."""
        if torch.jit.is_scripting():
            order, window_of, slot_of, n_windows = window_indices(grid, self._window)
            return order.to(device), window_of.to(device), slot_of.to(device), n_windows
        else:
            layout = self.layout(grid, device)
            return layout.order, layout.window_of, layout.slot_of, layout.n_windows

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, context: Any = None) -> torch.Tensor:
        """Encode ``x`` ``(B, C, *spatial)`` (the :class:`~medssl.models.base.GridEncoder` interface).

        Args:
            keep: optional ``(B, L)`` raster indices of the tokens to encode (-1 = padding slot).
            context: the batch's conditioning (:func:`~medssl.models.base.batch_context`, a
                mapping; typed ``Any`` because TorchScript has no Mapping); this ViT is
                unconditioned and ignores it.

        Returns:
            ``(B, P + N, D)`` in raster order when ``keep`` is None, else ``(B, P + L, D)`` in the
            order of ``keep`` (padding slots are zeros).
        """
        return self._forward_tokens(x, keep)

    def _forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # the forward pass, under a name a subclass's forward can call in TorchScript (which has no super())
        grid = self._grid(x.shape[2:])  # refuses sizes the patch does not divide (conv would crop silently)
        tokens = self.patch_embed(self.standardise(x))  # (B, D, *grid)
        b, d = tokens.shape[0], tokens.shape[1]
        tokens = tokens.flatten(2).transpose(1, 2) + self.pos_embed(grid, tokens.device)  # (B, N, D)
        p = self.num_prefix_tokens
        n_windows = 0  # 0: global attention
        order = window_of = slot_of = torch.empty([0], dtype=torch.long, device=tokens.device)
        if self.window_size is not None:
            order, window_of, slot_of, n_windows = self._windows(grid, tokens.device)
        slots = keep
        if n_windows:
            if slots is None:
                slots = order.expand(b, -1)  # window-major order, -1 where windows overhang the grid
            else:
                self._check_window_slots(slots, window_of, n_windows)
        valid: Optional[torch.Tensor] = None
        if slots is not None:
            tokens = tokens.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))  # (B, L, D)
            filled = slots >= 0
            if not bool(filled.all()):
                valid = filled
        out = self.norm(self._encode(tokens, valid, n_windows))  # (B, P + L, D)
        if valid is not None:
            out = out * torch.cat([valid.new_ones(b, p), valid], 1).unsqueeze(-1).to(out.dtype)
        if keep is None and n_windows:  # back to raster order
            index = torch.cat([torch.arange(p, device=out.device), slot_of + p])
            out = out[:, index]
        return out

    def _encode(self, tokens: torch.Tensor, valid: torch.Tensor | None, n_windows: int) -> torch.Tensor:
        """The blocks on ``tokens`` ``(B, L, D)`` (window-major when ``n_windows``; 0: global attention)."""
        b, n, d = tokens.shape[0], tokens.shape[1], tokens.shape[2]
        p = self.num_prefix_tokens
        prefix = tokens[:, :0]  # (B, P, D)
        if self.cls_token is not None:
            prefix = self.cls_token.expand(b, -1, -1)
        full_valid: Optional[torch.Tensor] = None
        if valid is not None:
            full_valid = torch.cat([valid.new_ones(b, p), valid], 1)
        global_mask = key_padding_mask(full_valid)
        if n_windows == 0:
            x = torch.cat([prefix, tokens], 1)  # (B, P + N, D)
            for blk in self.blocks:
                x = blk(x, global_mask)
            return x
        if n % n_windows:
            raise ValueError(f"{n} token slots do not split into {n_windows} windows")
        t = n // n_windows
        busy: Optional[torch.Tensor] = None  # non-empty windows
        window_mask: Optional[torch.Tensor] = None
        if valid is not None:
            rows = valid.reshape(b * n_windows, t)
            filled = rows.any(1)
            if not bool(filled.all()):
                busy = filled.nonzero().squeeze(1)
                rows = rows[busy]
            window_mask = key_padding_mask(rows)
        for i, blk in enumerate(self.blocks):
            if self._global[i]:
                x = blk(torch.cat([prefix, tokens], 1), global_mask)
                prefix, tokens = x[:, :p], x[:, p:]
            else:
                tokens = blk.windows(tokens.reshape(b * n_windows, t, d), window_mask, busy).reshape(b, n, d)
                if p:
                    prefix = blk(prefix)  # the CLS token is a window of its own
        return torch.cat([prefix, tokens], 1)

    @staticmethod
    def _check_window_slots(slots: torch.Tensor, window_of: torch.Tensor, n_windows: int) -> None:
        n = slots.shape[1]
        if n % n_windows:
            raise ValueError(f"keep has {n} slots, not a multiple of the {n_windows} attention windows; "
                             "sample it with medssl.tasks.masking.sample_mask")
        expected = torch.arange(n_windows, device=slots.device).repeat_interleave(n // n_windows)
        got = window_of[slots.clamp(min=0)]
        if bool(((got != expected) & (slots >= 0)).any()):
            raise ValueError("keep is not grouped window by window (same number of slots per window, in window order); "
                             "sample it with medssl.tasks.masking.sample_mask")

    # -- features -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """One vector per image: :func:`medssl.models.base.embed` of this encoder."""
        return embed(self, x, pooling)
