"""Where a ViT looks: last-block attention maps and their overlay on the image.

With a CLS token the map is the CLS token's attention over the patch tokens in the last block
(which is always global), as in the DINO paper's pictures; without one it is the attention each
patch receives, averaged over the real queries (not the padding slots of overhanging windows). Maps are averaged over heads (or kept per head),
brought back from window-major to raster order, scaled to [0, 1] per image and upsampled to the
image with nearest-neighbour (one flat value per patch, so nothing is invented).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tiling import most_foreground_block
from ..models.base import GridEncoder, encode

__all__ = ["has_attention", "attention_maps", "overlay", "attention_panels", "write_attention_pictures"]


def has_attention(backbone: nn.Module) -> bool:
    """Whether :func:`attention_maps` can draw ``backbone`` (a grid encoder with transformer blocks)."""
    blocks = getattr(backbone, "blocks", None)
    return isinstance(backbone, GridEncoder) and bool(blocks) and hasattr(blocks[-1], "attn")


@torch.no_grad()
def attention_maps(backbone: GridEncoder, x: torch.Tensor, per_head: bool = False, context: Mapping | None = None) -> torch.Tensor:
    """``(B, C, *S)`` images -> ``(B, 1 or H, *S)`` maps in [0, 1] from ``backbone``'s last block.

    ``backbone`` is a :class:`~medssl.models.base.GridEncoder` whose ``blocks[-1]`` is a
    :class:`~medssl.models.blocks.Block` (the ViT); ``context`` is the batch's conditioning.
    """
    if not has_attention(backbone):
        raise ValueError(f"attention maps need a ViT-like encoder with transformer blocks, not a {type(backbone).__name__}")
    last = backbone.blocks[-1]
    seen: dict = {}
    hook = last.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0], mask=args[1] if len(args) > 1 else None))
    try:
        encode(backbone, x, context=context)
    finally:
        hook.remove()
    tokens = seen["tokens"]
    weights = last.attn.weights(last.norm1(tokens), seen["mask"]).float()  # (B, H, L, L)
    p = backbone.num_prefix_tokens
    grid = backbone.grid_size(x.shape[2:])
    layout = backbone.layout(grid, x.device)
    if p:
        received = weights[:, :, 0, p:]  # (B, H, N) in the blocks' token order
    else:  # mean over the real queries (padding slots of overhanging windows ask too, but are not image)
        queries = slice(None) if layout is None else layout.order >= 0
        received = weights[:, :, queries].mean(2)
    if layout is not None:  # window-major slots (with padding) -> raster order
        received = received[..., layout.slot_of]
    maps = received if per_head else received.mean(1, keepdim=True)
    maps = maps.reshape(*maps.shape[:2], *grid)
    lo = maps.flatten(2).amin(-1).view(*maps.shape[:2], *([1] * len(grid)))
    hi = maps.flatten(2).amax(-1).view(*maps.shape[:2], *([1] * len(grid)))
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    return F.interpolate(maps, size=tuple(x.shape[2:]), mode="nearest")


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6, cmap: str = "inferno") -> torch.Tensor:
    """Blend ``maps`` ``(B, 1, *S)`` in [0, 1], coloured with ``cmap``, over grey ``images`` ``(B, C, *S)``.

    Returns RGB ``(B, 3, *S)``; the colour's weight grows with attention, so unattended regions
    still show the anatomy.
    """
    from matplotlib import colormaps

    grey = images.detach().float().mean(1, keepdim=True).clamp(0, 1).cpu()
    m = maps.detach().float()[:, :1].clamp(0, 1).cpu()
    colour = torch.from_numpy(colormaps[cmap](m[:, 0].numpy())[..., :3]).float().movedim(-1, 1)  # (B, 3, *S)
    weight = alpha * m
    return (1 - weight) * grey + weight * colour


def attention_panels(backbone: GridEncoder, images: torch.Tensor, context: Mapping | None = None) -> dict[str, torch.Tensor]:
    """``{"image": images, "attention": overlay}``: what the contrastive tasks draw during training
    (nothing for an encoder :func:`has_attention` cannot draw)."""
    if not has_attention(backbone):
        return {}
    return {"image": images, "attention": overlay(images, attention_maps(backbone, images, context=context))}


def write_attention_pictures(backbone: nn.Module, images: list[torch.Tensor], out_dir, size: int, per_page: int = 4,
                             title: str = "") -> list:
    """PNG pages of image | attention overlay (2D) or their three orthogonal slices (3D), ``per_page`` rows each."""
    from pathlib import Path

    from .panels import write_panels

    out_dir = Path(out_dir)
    device = next(backbone.parameters()).device
    written = []
    for page, start in enumerate(range(0, len(images), per_page)):
        batch = torch.stack([most_foreground_block(img.float(), size) for img in images[start:start + per_page]]).to(device)
        written.append(write_panels(attention_panels(backbone, batch), out_dir / f"attention_{page:03d}.png",
                                    title=title, max_rows=per_page))
    return written
