"""Masked autoencoder (He et al., 2022, arXiv:2111.06377) in 2D and 3D, background-aware.

``forward`` reads ``mask -> encode visible tokens -> decode -> loss on hidden tokens``:

- the encoder (the shared backbone) sees only the visible tokens (``ViT.forward(x, keep)``);
- a light decoder sees the encoded visible tokens plus a mask token at every target position,
  each with its sinusoidal position embedding, and predicts the target patches' pixels (within
  the backbone's attention windows when it has them);
- the loss is the mean squared error on target patches, optionally against per-patch normalised
  pixels (``norm_pix_loss``, the reference default).

Background-aware masking (the seed toolkit's "masking black borders"): with
``background_threshold`` set, tokens whose every pixel is at or below it (air in windowed CT,
black borders of radiographs and fundus photographs) are dropped from the encoder input, from the
decoder and from the loss, which also saves their compute.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.blocks import Block, key_padding_mask
from ..models.position import sincos_position_embedding
from .base import Task, register_task
from .masking import TokenMask, patch_foreground, sample_mask
from .patchify import patchify, unpatchify

__all__ = ["MAETask"]


@register_task("mae")
class MAETask(Task):
    """Masked-autoencoder pretraining of ``backbone`` (a :class:`~medssl.models.base.GridEncoder` such as the ViT).

    Args:
        mask_ratio: share of (foreground) tokens hidden from the encoder; 0.75 as in He et al.
        decoder_dim, decoder_depth, decoder_heads: the light decoder (default half the encoder
            width, 2 blocks: pixel prediction needs little depth on small images).
        norm_pix_loss: regress per-patch normalised pixels (sharper features in He et al.).
        background_threshold: intensity at or below which a whole patch counts as background;
            None keeps every token.
        window_decoder: with a windowed backbone, decode each window on its own (what makes
            windows pay off at 128^3: a global decoder would attend over every token).
        image_key: batch key of the images ``(B, C, *spatial)``.
    """

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int | None = None, decoder_depth: int = 2,
                 decoder_heads: int | None = None, norm_pix_loss: bool = True, background_threshold: float | None = None,
                 window_decoder: bool = True, image_key: str = "image") -> None:
        super().__init__(backbone)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.background_threshold, self.image_key, self.window_decoder = background_threshold, image_key, window_decoder
        self.required_keys = (image_key,)
        dim = decoder_dim or backbone.embed_dim // 2
        heads = decoder_heads or max(1, math.gcd(dim, backbone.num_heads))
        self.patch_size = backbone.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, math.prod(self.patch_size) * backbone.in_channels)
        self._pos_cache: dict = {}
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _decoder_pos(self, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_position_embedding(grid, self.decoder_embed.out_features, device=device)
        return self._pos_cache[key]

    # -- the method -----------------------------------------------------------------------
    def sample(self, img: torch.Tensor) -> tuple[torch.Tensor, TokenMask, tuple[int, ...]]:
        """Patch pixels ``(B, N, P)``, the token mask and the grid for a batch of images."""
        grid = self.backbone.grid_size(img.shape[2:])
        pixels = patchify(img, self.patch_size)  # (B, N, P), P = prod(patch) * C
        fg = patch_foreground(pixels, self.background_threshold)  # (B, N)
        mask = sample_mask(fg, self.mask_ratio, self.backbone.layout(grid, img.device))
        return pixels, mask, grid

    def decode(self, latent: torch.Tensor, mask: TokenMask, grid: tuple[int, ...]) -> torch.Tensor:
        """Encoder output ``(B, P + Lk, D)`` -> predicted pixels of the targets ``(B, Lt, P)``.

        The decoder attends within the backbone's windows (visible and target slots of a window
        together) when ``window_decoder`` and the backbone has windows, else over all tokens.
        """
        p = self.backbone.num_prefix_tokens
        layout = self.backbone.layout(grid, latent.device) if self.window_decoder else None
        nw = 1 if layout is None else layout.n_windows
        x = self.decoder_embed(latent[:, p:])  # (B, Lk, Dd); the CLS token is not needed to predict pixels
        b, dim = x.shape[0], x.shape[-1]
        k, t = mask.keep.shape[1] // nw, mask.target.shape[1] // nw
        slots = torch.cat([mask.keep.view(b, nw, k), mask.target.view(b, nw, t)], 2)  # (B, nW, k + t), -1 = pad
        tokens = torch.cat([x.view(b, nw, k, dim), self.mask_token.expand(b, nw, t, dim)], 2)  # (B, nW, k + t, Dd)
        tokens = (tokens + self._decoder_pos(grid, x.device)[slots.clamp(min=0)]).view(b * nw, k + t, dim)
        valid = (slots >= 0).view(b * nw, k + t)
        busy = None if bool(valid.any(1).all()) else valid.any(1).nonzero().squeeze(1)  # windows with real tokens
        attn_mask = None if bool(valid.all()) else key_padding_mask(valid if busy is None else valid[busy])
        for blk in self.decoder_blocks:
            tokens = blk.windows(tokens, attn_mask, busy)
        pred = self.decoder_pred(self.decoder_norm(tokens))  # (B * nW, k + t, P)
        return pred.view(b, nw, k + t, -1)[:, :, k:].reshape(b, nw * t, -1)  # (B, Lt, P) in target order

    def targets(self, pixels: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target pixels at ``index`` ``(B, Lt, P)`` (normalised if ``norm_pix_loss``) and their mean and std."""
        target = pixels.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))
        mean = target.mean(-1, keepdim=True)
        std = (target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
        if self.norm_pix_loss:
            target = (target - mean) / std
        return target, mean, std

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        img = batch[self.image_key]  # (B, C, *spatial)
        pixels, mask, grid = self.sample(img)
        latent = self.encode(batch, img, mask.keep)  # (B, P + Lk, D)
        pred = self.decode(latent, mask, grid)  # (B, Lt, P)
        target, _, _ = self.targets(pixels, mask.target)
        valid = (mask.target >= 0).to(pred.dtype)  # (B, Lt)
        per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (B, Lt)
        loss = (per_token * valid).sum() / valid.sum().clamp(min=1)
        n = pixels.shape[1]
        return {"loss": loss,
                "visible": (mask.keep >= 0).sum(1).float().mean() / n,  # share of tokens the encoder saw
                "background": 1 - ((mask.keep >= 0).sum(1) + (mask.target >= 0).sum(1)).float().mean() / n}

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """``input``, ``masked`` (hidden patches NaN, drawn in colour) and ``reconstruction`` (visible + predicted)."""
        img = batch[self.image_key]
        pixels, mask, grid = self.sample(img)
        pred = self.decode(self.encode(batch, img, mask.keep), mask, grid).float()
        _, mean, std = self.targets(pixels, mask.target)
        if self.norm_pix_loss:
            pred = pred * std + mean
        index = mask.target.clamp(min=0).unsqueeze(-1).expand(-1, -1, pixels.shape[-1])
        hidden = (mask.target >= 0).unsqueeze(-1)
        recon = pixels.float().clone()
        recon.scatter_(1, index, torch.where(hidden, pred, recon.gather(1, index)))
        masked = pixels.float().clone()
        masked.scatter_(1, index, torch.where(hidden, torch.full_like(pred, float("nan")), masked.gather(1, index)))
        c = img.shape[1]
        return {"input": img.float(), "masked": unpatchify(masked, self.patch_size, grid, c),
                "reconstruction": unpatchify(recon.clamp(0, 1), self.patch_size, grid, c)}
