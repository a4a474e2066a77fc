"""Query-box localisation (UP-DETR, Dai et al., CVPR 2021, arXiv:2011.09094) in 2D and 3D.

The first source document's "box" pretext: regions are cut from the image at random boxes and
augmented; given the whole image and the regions, the model says where each region was.

``image -> encoder tokens (memory)``; ``K crops -> encoder (stop-gradient or EMA copy) -> pooled ->
projected -> n queries per crop (+ learned query embeddings)``; a decoder of
:class:`~medssl.models.blocks.CrossBlock` s (queries attend within their own crop's group, then
over the image tokens) predicts per query a normalised box (centre + size) and an objectness
logit; Hungarian matching to the K true boxes (L1 + GIoU + objectness cost), loss L1 + GIoU +
objectness cross-entropy (unmatched queries are "no object").

The crops come from the data pipeline (:class:`~medssl.data.views.RandQueryBoxesd`:
``batch["query_views"]`` ``(B, K, C, *q)``, ``batch["query_boxes"]`` ``(B, K, 2d)`` corners in
voxels). The decoder is a pretraining head: only the encoder is exported.

Crop features: ``crop_encoder="stopgrad"`` encodes the crops with the shared backbone under
``no_grad`` (UP-DETR freezes its CNN's crop features the same way, so the task cannot make the
queries trivially easy by changing how crops are encoded); ``"ema"`` uses an EMA copy of the
backbone (as DINO's teacher), updated after every optimizer step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..models.blocks import CrossBlock
from ..models.position import sincos_position_embedding
from .base import Task, register_task
from .box_matching import box_losses, centre_size_to_corners, corners_to_centre_size, group_mask, match, matched_iou

__all__ = ["QueryBoxTask"]


def _mlp(dim: int, out: int, layers: int = 3) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, dim), nn.GELU()]
    return nn.Sequential(*mods, nn.Linear(dim, out))


@register_task("box")
class QueryBoxTask(Task):
    """Query-box localisation on ``backbone`` (any :class:`~medssl.models.base.Encoder`; a
    :class:`~medssl.models.base.GridEncoder` also gives the decoder the tokens' positions).

    Args:
        queries_per_box: queries built from each crop (UP-DETR: 10 per patch).
        decoder_dim, decoder_depth, decoder_heads: the decoder (default half the encoder width, 2 blocks).
        crop_encoder: ``"stopgrad"`` or ``"ema"`` (see the module docstring).
        momentum: the EMA copy's momentum at the start (cosine to 1).
        query_mask_ratio: share of queries whose crop feature is dropped in training (UP-DETR's 0.1).
        l1_weight, giou_weight, objectness_weight: cost and loss weights (DETR's 5, 2, 1).
        no_object_weight: weight of the "no object" class in the objectness loss (DETR's 0.1).
        pooling: crop tokens -> one vector (default ``cls`` with a CLS token, else ``mean``).
    """

    required_keys = ("image", "query_views", "query_boxes")

    def __init__(self, backbone: nn.Module, queries_per_box: int = 3, max_boxes: int = 32, decoder_dim: int | None = None,
                 decoder_depth: int = 2, decoder_heads: int | None = None, crop_encoder: str = "stopgrad",
                 momentum: float = 0.996, query_mask_ratio: float = 0.1, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 objectness_weight: float = 1.0, no_object_weight: float = 0.1, pooling: str | None = None,
                 image_key: str = "image", views_key: str = "query_views", boxes_key: str = "query_boxes") -> None:
        super().__init__(backbone)
        if crop_encoder not in ("stopgrad", "ema"):
            raise ValueError(f"crop_encoder must be 'stopgrad' or 'ema', got {crop_encoder!r}")
        if queries_per_box < 1:
            raise ValueError(f"queries_per_box must be >= 1, got {queries_per_box}")
        d = backbone.embed_dim
        dim = decoder_dim or max(32, d // 2)
        heads = decoder_heads or max(1, math.gcd(dim, getattr(backbone, "num_heads", 4)))
        self.queries_per_box, self.max_boxes, self.crop_encoder, self.momentum = queries_per_box, max_boxes, crop_encoder, momentum
        self.query_mask_ratio, self.no_object_weight = query_mask_ratio, no_object_weight
        self.weights = {"l1": l1_weight, "giou": giou_weight, "objectness": objectness_weight}
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.image_key, self.views_key, self.boxes_key = image_key, views_key, boxes_key
        self.required_keys = (image_key, views_key, boxes_key)
        self.memory_proj = nn.Linear(d, dim)
        self.crop_proj = nn.Linear(d, dim)
        self.query_embed = nn.Parameter(torch.randn(max_boxes * queries_per_box, dim) * 0.02)
        self.decoder = nn.ModuleList(CrossBlock(dim, heads) for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(dim)
        self.box_head = _mlp(dim, 2 * backbone.spatial_dims)
        self.class_head = nn.Linear(dim, 2)  # object, no object
        self.teacher = None
        if crop_encoder == "ema":
            self.teacher = copy.deepcopy(backbone)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self._pos_cache: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- the model ------------------------------------------------------------------------
    def _memory(self, batch: dict, img: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(batch, img)[:, self.backbone.num_prefix_tokens:]  # (B, N, D)
        memory = self.memory_proj(tokens)
        grid_size = getattr(self.backbone, "grid_size", None)
        if grid_size is not None:  # the decoder needs to know where each token is
            grid = tuple(grid_size(img.shape[2:]))
            key = (grid, str(img.device))
            if key not in self._pos_cache:
                self._pos_cache[key] = sincos_position_embedding(grid, memory.shape[-1], device=img.device)
            memory = memory + self._pos_cache[key].to(memory.dtype)
        return memory

    def _crop_features(self, batch: dict, crops: torch.Tensor) -> torch.Tensor:
        b, k = crops.shape[:2]
        flat = crops.transpose(0, 1).flatten(0, 1)  # (K * B, C, *q), crop-major: the context repeats per crop
        encoder = self.teacher if self.teacher is not None else self.backbone
        with torch.no_grad():
            z = self.embed(batch, flat, self.pooling, encoder=encoder)  # (K * B, D)
        return z.view(k, b, -1).transpose(0, 1)  # (B, K, D)

    def predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``(B, Q, 2d)`` (normalised centre + size) and objectness logits ``(B, Q, 2)``, ``Q = K * queries_per_box``."""
        img, crops = batch[self.image_key], batch[self.views_key]
        b, k = crops.shape[:2]
        if k > self.max_boxes:
            raise ValueError(f"{k} query boxes per image, the task was built for at most max_boxes={self.max_boxes}")
        n = self.queries_per_box
        memory = self._memory(batch, img)
        queries = self.crop_proj(self._crop_features(batch, crops)).repeat_interleave(n, dim=1)  # (B, Q, Dq)
        if self.training and self.query_mask_ratio > 0:
            keep = torch.rand(b, k * n, 1, device=queries.device) > self.query_mask_ratio
            queries = queries * keep.to(queries.dtype)
        x = queries + self.query_embed[: k * n].to(queries.dtype)
        mask = group_mask(k, n, x.device)
        for blk in self.decoder:
            x = blk(x, memory, self_mask=mask)
        x = self.norm(x)
        return self.box_head(x).sigmoid(), self.class_head(x)

    def targets(self, batch: dict) -> torch.Tensor:
        """True boxes ``(B, K, 2d)`` as normalised centre + size."""
        img, boxes = batch[self.image_key], batch[self.boxes_key].float()
        size = torch.tensor(img.shape[2:], dtype=torch.float32, device=boxes.device).repeat(2)
        return corners_to_centre_size(boxes / size)

    def _matched(self, batch: dict):
        """Predictions, objectness logits, true boxes and their Hungarian matches for ``batch``."""
        pred, logits = self.predict(batch)
        target = self.targets(batch)
        return pred, logits, target, match(pred, logits, target, self.weights["l1"], self.weights["giou"],
                                           self.weights["objectness"])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        pred, logits, target, matches = self._matched(batch)
        terms = box_losses(pred, logits, target, matches, self.no_object_weight)
        loss = sum(self.weights[k] * terms[k] for k in ("l1", "giou", "objectness"))
        iou = matched_iou(pred, target, matches)
        return {"loss": loss, "l1": terms["l1"].detach(), "giou_loss": terms["giou"].detach(),
                "objectness": terms["objectness"].detach(), "mean_iou": iou.mean(), "iou_above_half": (iou > 0.5).float().mean()}

    @torch.no_grad()
    def localise(self, batch: dict) -> dict[str, torch.Tensor]:
        """Matched predictions for evaluation: ``iou`` per true box, boxes as corners in voxels."""
        pred, _, target, matches = self._matched(batch)
        iou = matched_iou(pred, target, matches)
        size = torch.tensor(batch[self.image_key].shape[2:], dtype=torch.float32, device=pred.device).repeat(2)
        chosen = torch.stack([pred[i][torch.as_tensor(r)[torch.as_tensor(c).argsort()]] for i, (r, c) in enumerate(matches)])
        return {"iou": iou, "pred_boxes": centre_size_to_corners(chosen.float()) * size, "true_boxes": batch[self.boxes_key].float()}

    @torch.no_grad()
    def validate(self, batch: dict) -> dict[str, torch.Tensor]:
        """Held-out scores: mean IoU of the matched predictions and the share with IoU > 0.5."""
        iou = self.localise(batch)["iou"]
        return {"mean_iou": iou.mean(), "iou_above_half": (iou > 0.5).float().mean()}

    def teachers(self):
        return [] if self.teacher is None else [(self.teacher, self.backbone)]


    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image with the true boxes (red) and the matched predictions (blue), and the query crops."""
        from ..viz.boxes import box_panels

        found = self.localise(batch)
        return box_panels(batch[self.image_key], found["true_boxes"], found["pred_boxes"], batch[self.views_key])
