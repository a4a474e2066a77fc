"""Boxes drawn on images, 2D and 3D: the query-box task's pictures.

Boxes are painted as one-voxel outlines into an RGB copy of the image: in 2D the rectangle, in
3D the box's six faces, so a slice through a box shows where the slice cuts it. A 3D row is
re-centred on its first true box, so the three orthogonal slices the panels show pass through
that box's centre. True boxes are red, predictions blue, where both fall the colour mixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["draw_boxes", "box_panels", "TRUE_COLOUR", "PREDICTED_COLOUR"]

TRUE_COLOUR = (1.0, 0.1, 0.1)
PREDICTED_COLOUR = (0.1, 0.45, 1.0)


def _outline(spatial: tuple[int, ...], box: torch.Tensor) -> torch.Tensor:
    """Boolean ``(*spatial)``: the surface of ``box`` (corners, voxels, end exclusive)."""
    d = len(spatial)
    lo = [max(0, min(s - 1, int(math.floor(float(v))))) for v, s in zip(box[:d], spatial)]
    hi = [max(0, min(s - 1, int(math.ceil(float(v))) - 1)) for v, s in zip(box[d:], spatial)]
    inside = torch.zeros(spatial, dtype=torch.bool)
    inside[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = True
    shell = torch.zeros_like(inside)
    for axis in range(d):
        for at in (lo[axis], hi[axis]):
            index = [slice(None)] * d
            index[axis] = at
            shell[tuple(index)] |= inside[tuple(index)]
    return shell


def draw_boxes(images: torch.Tensor, boxes: dict[tuple[float, float, float], torch.Tensor]) -> torch.Tensor:
    """``images`` ``(B, C, *S)`` in [0, 1] -> RGB ``(B, 3, *S)`` with ``boxes`` (colour -> ``(B, K, 2d)``) outlined."""
    grey = images.detach().float().mean(1, keepdim=True).clamp(0, 1).cpu()
    rgb = grey.repeat(1, 3, *[1] * (images.ndim - 2))
    spatial = tuple(images.shape[2:])
    for colour, per_image in boxes.items():
        c = torch.tensor(colour).view(3, *[1] * len(spatial))
        for b in range(images.shape[0]):
            for box in per_image[b].detach().float().cpu():
                shell = _outline(spatial, box)
                rgb[b] = torch.where(shell, c, rgb[b])
    return rgb


def _centred_on(volume: torch.Tensor, centre: list[float]) -> torch.Tensor:
    """``(C, *S)`` shifted (black-padded, not wrapped) so that ``centre`` is the middle voxel."""
    spatial = volume.shape[1:]
    shift = [int(round(s / 2 - c)) for s, c in zip(spatial, centre)]
    pad = [v for sh in reversed(shift) for v in (max(sh, 0), max(-sh, 0))]
    padded = F.pad(volume, pad, value=0.0)  # not NaN: the panels' colour for NaN is close to the predictions' blue
    start = [max(-sh, 0) for sh in shift]
    return padded[(slice(None), *[slice(a, a + s) for a, s in zip(start, spatial)])]


def _mosaic(crops: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Crops ``(K, C, *q)`` laid side by side in the first two axes of an image-sized canvas (black elsewhere)."""
    k, ch, q = crops.shape[0], crops.shape[1], crops.shape[2:]
    canvas = torch.zeros((ch, *spatial))
    per_row = max(1, spatial[0] // q[0])
    rows = max(1, spatial[1] // q[1])
    offset = [(s - e) // 2 for s, e in zip(spatial[2:], q[2:])]  # 3D: the crops sit at the middle of the third axis
    for i in range(min(k, per_row * rows)):
        at = [slice((i % per_row) * q[0], (i % per_row + 1) * q[0]), slice((i // per_row) * q[1], (i // per_row + 1) * q[1])]
        at += [slice(o, o + e) for o, e in zip(offset, q[2:])]
        region = canvas[(slice(None), *at)]
        canvas[(slice(None), *at)] = crops[i][(slice(None), *[slice(0, r) for r in region.shape[1:]])].float()
    return canvas


def box_panels(images: torch.Tensor, true_boxes: torch.Tensor, pred_boxes: torch.Tensor, crops: torch.Tensor,
               max_boxes: int = 4) -> dict[str, torch.Tensor]:
    """``{"boxes": image with true (red) and predicted (blue) boxes, "queries": the query crops}``,
    both shaped like the images. The first ``max_boxes`` boxes of each image are drawn (ten
    one-pixel outlines would cover a 28-pixel image) and their crops shown."""
    true_boxes, pred_boxes, crops = true_boxes[:, :max_boxes], pred_boxes[:, :max_boxes], crops[:, :max_boxes]
    drawn = draw_boxes(images, {TRUE_COLOUR: true_boxes, PREDICTED_COLOUR: pred_boxes})
    spatial = tuple(images.shape[2:])
    queries = torch.stack([_mosaic(c.cpu(), spatial) for c in crops])
    if len(spatial) == 3:
        d = len(spatial)
        centres = [((true_boxes[b, 0, :d] + true_boxes[b, 0, d:]) / 2).tolist() for b in range(images.shape[0])]
        drawn = torch.stack([_centred_on(v, c) for v, c in zip(drawn, centres)])
    return {"boxes": drawn, "queries": queries}
