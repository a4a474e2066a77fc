"""SwAV (Caron et al., 2020, arXiv:2006.09882): the clustering family of the second source document.

Each view's projection (L2-normalised) is scored against ``n_prototypes`` learned prototypes
(unit vectors). For each global view, Sinkhorn-Knopp turns the scores of the whole global batch
into soft cluster assignments ("codes") that use every prototype equally (an equal partition:
what stops all images from landing in one cluster); every other view must then predict those
codes from its own scores (softmax at ``temperature``): the swapped prediction. Codes get no
gradient.

- Views: two global views (``batch["views"]``, ``(B, 2, C, *S)``) and, optionally, DINO's local
  crops (``batch["local_views"]``; :func:`medssl.data.views.multi_crop`), which are predicted but
  give no codes, as in the paper.
- Distributed: the Sinkhorn sums run over every rank's scores (``all_reduce``), so the equal
  partition holds for the global batch, as in the reference.
- The prototypes are renormalised to unit length before every use and frozen for the first
  ``freeze_prototypes`` of training (the paper freezes them for the first epoch).
- Queue (``queue_length``, the paper's remedy for batches under 256): the global views' last
  ``queue_length`` projections (each rank keeps its share, ``queue_length / world size``) are
  scored against the current prototypes and join the batch in Sinkhorn-Knopp, so the equal
  partition is over batch + queue rather than over a batch that may be smaller than the number
  of prototypes; only the batch's codes are used. It fills from ``queue_start`` (share of
  training; the paper starts it at epoch 15) and is part of the task's ``state_dict`` (as extra
  state, not a buffer, so ``DistributedDataParallel`` does not overwrite each rank's queue with
  rank 0's), so a resumed run continues with the queue it had.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import world_size
from ..models.base import batch_context
from .base import Task, register_task
from .heads import ProjectionMLP
from .token_drop import token_drop_share
from .sinkhorn import sinkhorn

__all__ = ["SwAVTask", "sinkhorn", "swav_loss"]


def swav_loss(codes: torch.Tensor, scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Cross entropy of predicting ``codes`` ``(B, K)`` from ``scores`` ``(B, K)``: ``-sum q log softmax(s / t)``, batch mean."""
    return -(codes * F.log_softmax(scores.float() / temperature, dim=-1)).sum(-1).mean()


@register_task("swav")
class SwAVTask(Task):
    """SwAV on ``backbone``.

    Args:
        hidden_dim, out_dim: the projector (2 layers with BatchNorm, as the paper's 2048 -> 128).
        n_prototypes: number of clusters (3000 in the paper for ImageNet; a few hundred suit a small medical set).
        temperature: softmax temperature of the predictions (0.1).
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp regularisation and steps (0.05, 3).
        freeze_prototypes: share of training during which the prototypes are not trained.
        queue_length: projections of past global views kept for Sinkhorn-Knopp, over all ranks (0: no queue).
        queue_start: share of training after which the queue fills and is used.
        token_drop: share of each view's patch tokens not encoded in training (FLIP, :mod:`medssl.tasks.token_drop`).
    """

    required_keys = ("views",)

    def __init__(self, backbone: nn.Module, hidden_dim: int = 1024, out_dim: int = 128, n_prototypes: int = 300,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 freeze_prototypes: float = 0.01, pooling: str | None = None, views_key: str = "views",
                 local_key: str = "local_views", queue_length: int = 0, queue_start: float = 0.0,
                 token_drop: float = 0.0) -> None:
        super().__init__(backbone)
        self.token_drop = token_drop_share(token_drop)
        if queue_length < 0 or not 0.0 <= queue_start < 1.0:
            raise ValueError(f"SwAV needs queue_length >= 0 and 0 <= queue_start < 1, got {queue_length} and {queue_start}")
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.projector = ProjectionMLP(backbone.embed_dim, hidden_dim, out_dim, layers=2, batch_norm=True)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_prototypes, out_dim), dim=-1))
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes, self.views_key, self.local_key = freeze_prototypes, views_key, local_key
        self.required_keys = (views_key,)
        self.queue_length, self.queue_start = int(queue_length), float(queue_start)
        self.queue: torch.Tensor | None = None  # (global views, this rank's length, out_dim), newest first
        self.queue_filled = 0

    def _prototypes(self) -> torch.Tensor:
        prototypes = F.normalize(self.prototypes.float(), dim=-1)
        return prototypes.detach() if self.progress < self.freeze_prototypes else prototypes

    def _project(self, batch: dict, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.embed(batch, x, self.pooling, drop=self.token_drop)).float(), dim=-1)

    def _codes(self, scores: list[torch.Tensor], z: list[torch.Tensor], prototypes: torch.Tensor) -> list[torch.Tensor]:
        """Sinkhorn codes of each global view's batch, with the queue's projections joining the partition."""
        use_queue = self.queue_length > 0 and self.training and self.progress >= self.queue_start
        if not use_queue:
            return [sinkhorn(s.detach(), self.epsilon, self.iterations) for s in scores]
        length = max(1, self.queue_length // world_size())
        if self.queue is None or self.queue.shape != (len(z), length, z[0].shape[1]) or self.queue.device != z[0].device:
            self.queue, self.queue_filled = z[0].new_zeros(len(z), length, z[0].shape[1]), 0
        codes = []
        with torch.no_grad():
            for i, s in enumerate(scores):
                past = self.queue[i, :self.queue_filled] @ prototypes.detach().T
                codes.append(sinkhorn(torch.cat([s.detach(), past]), self.epsilon, self.iterations)[:len(s)])
            new = torch.stack([zi.detach() for zi in z])[:, :length]
            self.queue = torch.cat([new, self.queue[:, :length - new.shape[1]]], dim=1)
            self.queue_filled = min(length, self.queue_filled + new.shape[1])
        return codes

    def get_extra_state(self) -> dict:
        return {"queue": self.queue, "queue_filled": self.queue_filled} if self.queue is not None else {}

    def set_extra_state(self, state: dict) -> None:
        self.queue, self.queue_filled = state.get("queue"), int(state.get("queue_filled", 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "_extra_state", {})  # a checkpoint from before the queue existed resumes strictly too
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch[self.views_key]
        n_global = views.shape[1]
        if n_global < 2:
            raise ValueError(f"SwAV needs at least 2 global views per image, got {n_global}")
        prototypes = self._prototypes()
        z = list(self._project(batch, views.transpose(0, 1).flatten(0, 1)).chunk(n_global))
        scores = [zi @ prototypes.T for zi in z]
        local = batch.get(self.local_key)
        if local is not None and local.shape[1] > 0:
            scores += list((self._project(batch, local.transpose(0, 1).flatten(0, 1)) @ prototypes.T).chunk(local.shape[1]))
        codes = self._codes(scores[:n_global], z, prototypes)
        loss, terms = scores[0].new_zeros(()), 0
        for i, q in enumerate(codes):
            for j, s in enumerate(scores):
                if j != i:
                    loss = loss + swav_loss(q, s, self.temperature)
                    terms += 1
        with torch.no_grad():  # share of the prototypes a batch can reach that its images' codes pick (1 = all distinct)
            used = codes[0].argmax(-1).unique().numel() / min(codes[0].shape)
        out = {"loss": loss / terms, "prototypes_used": torch.tensor(used)}
        if self.queue_length > 0:
            out["queue_filled"] = torch.tensor(float(self.queue_filled * world_size()))
        return out

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image and the backbone's last-block attention over it."""
        from ..viz.attention import attention_panels

        return attention_panels(self.backbone, batch["image"], batch_context(batch))
