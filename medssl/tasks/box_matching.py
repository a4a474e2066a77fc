"""Boxes for set prediction in 2D and 3D: conversions, Hungarian matching (DETR), and the losses.

Boxes are normalised to the image (``[0, 1]`` per axis). Predictions are ``(centre, size)``
(``cx, cy, [cz,] w, h, [d]``: what a sigmoid head gives); GIoU is computed on corners in MONAI's
StandardMode (``x1, y1, [z1,] x2, y2, [z2]``) with :func:`monai.data.box_utils.box_giou`, which
handles both dimensionalities.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data.box_utils import box_giou, box_iou, box_pair_giou

__all__ = ["centre_size_to_corners", "corners_to_centre_size", "match", "group_mask", "box_losses", "matched_iou"]


def centre_size_to_corners(box: torch.Tensor) -> torch.Tensor:
    """``(..., 2d)`` centre + size -> corners (StandardMode)."""
    d = box.shape[-1] // 2
    c, s = box[..., :d], box[..., d:]
    return torch.cat([c - s / 2, c + s / 2], -1)


def corners_to_centre_size(box: torch.Tensor) -> torch.Tensor:
    """``(..., 2d)`` corners -> centre + size."""
    d = box.shape[-1] // 2
    lo, hi = box[..., :d], box[..., d:]
    return torch.cat([(lo + hi) / 2, hi - lo], -1)


@torch.no_grad()
def match(pred_boxes: torch.Tensor, pred_logits: torch.Tensor, target_boxes: torch.Tensor, l1: float = 5.0, giou: float = 2.0,
          objectness: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hungarian matching per image, DETR's cost: ``l1 * L1 - giou * GIoU - objectness * p(object)``.

    Args:
        pred_boxes: ``(B, Q, 2d)`` centre + size; pred_logits: ``(B, Q, 2)`` (object, no object);
        target_boxes: ``(B, K, 2d)`` centre + size, ``K <= Q``.

    Returns:
        Per image ``(query indices, target indices)``, ``K`` pairs each.
    """
    from scipy.optimize import linear_sum_assignment

    prob = pred_logits.float().softmax(-1)[..., 0]  # (B, Q)
    out = []
    for b in range(pred_boxes.shape[0]):
        p, t = pred_boxes[b].float(), target_boxes[b].float()
        cost = l1 * torch.cdist(p, t, p=1) - giou * box_giou(centre_size_to_corners(p), centre_size_to_corners(t)) \
            - objectness * prob[b][:, None]
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((rows, cols))
    return out


def group_mask(groups: int, per_group: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Self-attention mask ``(1, 1, G * n, G * n)``: a query attends only to the queries of its own
    group (the ``n`` queries built from one crop), for any number of groups.

    UP-DETR's loop ``for i in range(query_per_patch)`` fills ``query_per_patch`` diagonal blocks
    of that size: that covers all ``num_patches`` groups only when the two numbers are equal
    (``num_queries = num_patches ** 2``, its default 100 = 10 x 10); otherwise queries of some
    groups see nobody (rows of ``-inf``) or the blocks run past their group. Here the mask comes
    from the group index of each query, which is right for any ``G`` and ``n``.
    """
    group = torch.arange(groups, device=device).repeat_interleave(per_group)
    return (group[:, None] == group[None, :])[None, None]


def box_losses(pred_boxes: torch.Tensor, pred_logits: torch.Tensor, target_boxes: torch.Tensor,
               matches: list[tuple[np.ndarray, np.ndarray]], no_object_weight: float = 0.1) -> dict[str, torch.Tensor]:
    """L1 and GIoU losses on matched pairs, and objectness cross-entropy on every query (unmatched
    queries are "no object", weighted ``no_object_weight`` as in DETR)."""
    b, q, _ = pred_boxes.shape
    qi = torch.cat([torch.as_tensor(r, dtype=torch.long) + i * q for i, (r, _) in enumerate(matches)]).to(pred_boxes.device)
    k = target_boxes.shape[1]
    ti = torch.cat([torch.as_tensor(c, dtype=torch.long) + i * k for i, (_, c) in enumerate(matches)]).to(pred_boxes.device)
    pred = pred_boxes.reshape(b * q, -1)[qi].float()
    target = target_boxes.reshape(b * k, -1)[ti].float()
    l1 = (pred - target).abs().sum(-1).mean()
    giou = box_pair_giou(centre_size_to_corners(target), centre_size_to_corners(pred))
    classes = torch.ones(b * q, dtype=torch.long, device=pred_boxes.device)  # 1 = no object
    classes[qi] = 0
    weight = torch.tensor([1.0, no_object_weight], device=pred_boxes.device)
    ce = torch.nn.functional.cross_entropy(pred_logits.reshape(b * q, -1).float(), classes, weight=weight)
    return {"l1": l1, "giou": (1 - giou).mean(), "objectness": ce, "matched_giou": giou.detach().mean()}


@torch.no_grad()
def matched_iou(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, matches: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """IoU of each matched pair, ``(B * K,)`` (centre + size inputs)."""
    ious = []
    for b, (r, c) in enumerate(matches):
        p = centre_size_to_corners(pred_boxes[b][torch.as_tensor(r, dtype=torch.long)].float())
        t = centre_size_to_corners(target_boxes[b][torch.as_tensor(c, dtype=torch.long)].float())
        ious.append(box_iou(p, t).diagonal())
    return torch.cat(ious)
