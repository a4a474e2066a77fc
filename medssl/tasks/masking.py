"""Random token masks for masked pretraining: uniform per attention window, background-aware.

Masks are sampled where the batch lives (after collation, on its device) rather than in the data
workers, because dropping background makes the number of visible tokens differ from image to
image, and only the whole batch knows how far to pad.

Per window (one window of all tokens for a global-attention backbone), with ``F`` foreground
tokens, ``floor(F * (1 - ratio))`` random foreground tokens stay visible and the other foreground
tokens become reconstruction targets. Background tokens are neither shown nor predicted. Every
window gets the same number of visible and of target *slots* (padded with -1), so visible tokens
still group by window for the encoder, and visible plus target tokens for a windowed decoder;
with no background each window has exactly ``floor(T * (1 - ratio))`` visible tokens, as in
uniform masking (Li et al., 2022, arXiv:2205.10063).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.windows import WindowLayout

__all__ = ["TokenMask", "sample_mask", "patch_foreground", "mask_to_keep"]


@dataclass
class TokenMask:
    """``keep``: ``(B, nW * k)`` raster indices shown to the encoder; ``target``: ``(B, nW * t)``
    indices to reconstruct. Both are grouped window by window (``nW = 1`` without windows); -1
    marks a padding slot."""

    keep: torch.Tensor
    target: torch.Tensor


def patch_foreground(patches: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """``(B, N, P)`` patch pixels -> ``(B, N)`` True where some pixel exceeds ``threshold`` (None: all True)."""
    if threshold is None:
        return torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    return patches.amax(-1) > threshold


def sample_mask(foreground: torch.Tensor, ratio: float, layout: WindowLayout | None = None,
                generator: torch.Generator | None = None) -> TokenMask:
    """Sample which tokens the encoder sees.

    Args:
        foreground: ``(B, N)`` bool, tokens that may be shown or predicted.
        ratio: share of each window's foreground tokens to hide (0.75 in He et al.).
        layout: the backbone's window layout for this grid (None: global attention).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    b, n = foreground.shape
    device = foreground.device
    order = torch.arange(n, device=device) if layout is None else layout.order.to(device)  # slot -> raster (-1 pad)
    nw = 1 if layout is None else layout.n_windows
    t_total = order.numel() // nw
    slot_fg = (foreground[:, order.clamp(min=0)] & (order >= 0)).view(b, nw, t_total)  # (B, nW, T)
    noise = torch.rand(b, nw, t_total, device=device, generator=generator).masked_fill(~slot_fg, 2.0)
    rank = noise.argsort(-1)  # (B, nW, T): foreground first, in random order
    n_fg = slot_fg.sum(-1, keepdim=True)  # (B, nW, 1)
    n_keep = torch.floor(n_fg * (1.0 - ratio) + 1e-6).long()  # (B, nW, 1)
    k = max(int(n_keep.max()), 1)  # slots per window: the most any window needs
    raster = order.view(nw, t_total).expand(b, -1, -1).gather(2, rank)  # (B, nW, T) raster index in rank order
    pos = torch.arange(t_total, device=device)
    keep = torch.where(pos[:k] < n_keep, raster[..., :k], -1).reshape(b, nw * k)  # (B, nW * k)
    n_target = n_fg - n_keep  # (B, nW, 1)
    t = max(int(n_target.max()), 1)
    index = (n_keep + pos[:t]).clamp(max=t_total - 1)  # (B, nW, t): rank positions after the visible ones
    target = torch.where(pos[:t] < n_target, raster.gather(2, index), -1).reshape(b, nw * t)
    return TokenMask(keep=keep, target=target)


def mask_to_keep(mask: torch.Tensor, layout: WindowLayout | None = None) -> torch.Tensor:
    """``(B, N)`` bool token mask (raster) -> ``(B, L)`` raster indices for an encoder's ``keep``, -1 for padding.

    With ``layout`` the indices are grouped window by window, every window padded to the same
    number of slots (what a windowed :class:`~medssl.models.vit.ViT` needs, as
    :func:`sample_mask` gives); without, the kept tokens in raster order, padded at the end.
    """
    b, n = mask.shape
    device = mask.device
    order = torch.arange(n, device=device) if layout is None else layout.order.to(device)
    nw = 1 if layout is None else layout.n_windows
    t_total = order.numel() // nw
    slot = (mask[:, order.clamp(min=0)] & (order >= 0)).view(b, nw, t_total)  # (B, nW, T)
    k = max(int(slot.sum(-1).max()), 1)
    first = (~slot).to(torch.int8).argsort(dim=-1, stable=True)[..., :k]  # kept slots first, in window order
    raster = order.view(nw, t_total).expand(b, -1, -1).gather(2, first)
    return torch.where(slot.gather(2, first), raster, -1).reshape(b, nw * k)
