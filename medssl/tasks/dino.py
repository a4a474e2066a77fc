"""DINO: self-distillation with no labels (Caron et al., 2021, arXiv:2104.14294), 2D and 3D.

A student (the shared backbone plus a :class:`~medssl.tasks.heads.DINOHead`) learns to match, on
every view, the output distribution a teacher gives on the *other* global views:

- views come from the data pipeline (:class:`medssl.data.views.MultiViewd`): ``batch["views"]``
  ``(B, G, C, *S)`` global crops (the teacher sees only these) and ``batch["local_views"]``
  ``(B, L, C, *s)`` smaller local crops (student only; optional);
- the teacher is an exponential moving average of the student, momentum rising from ``momentum``
  to 1 on a cosine over training, updated in :meth:`step_end` after every optimizer step (also
  after another task's step in multi-task runs, so it follows the shared backbone);
- collapse is avoided by centring and sharpening (teacher temperature, warmed up from
  ``warmup_teacher_temp``). ``centering="ema"`` is the paper's: subtract an EMA of the teacher's
  batch-mean output (all-reduced over DDP ranks). ``centering="sinkhorn"`` is DINOv2's:
  Sinkhorn-Knopp over the batch's teacher outputs (:func:`~medssl.tasks.sinkhorn.sinkhorn`, the
  temperature as its epsilon), which spreads the batch over the prototypes however alike its
  images score;
- the prototypes get no gradient for the first ``freeze_prototypes`` share of training.

The teacher never receives gradients (``requires_grad=False``); its backbone always runs in eval
mode. A fresh ViT gives almost the same embedding for every image (cosine similarity above 0.99
on PneumoniaMNIST), so the centred teacher carries almost no signal and DINO can sit at the
uniform solution (loss ``ln out_dim``) for a long time; ``head_batch_norm`` and ``koleo_weight``
are the two levers against that (see docs/pretraining.md).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import mean_over_ranks
from ..models.base import batch_context
from .base import Task, register_task
from .ema import ema_momentum, ema_update  # noqa: F401  (re-exported: the EMA lives in ema.py)
from .heads import DINOHead
from .sinkhorn import sinkhorn

CENTERINGS = ("ema", "sinkhorn")

__all__ = ["DINOTask", "CENTERINGS", "koleo_loss", "normalised_entropy", "teacher_temperature", "ema_momentum", "ema_update"]


def teacher_temperature(progress: float, warmup_temp: float, temp: float, warmup: float) -> float:
    """Linear warm-up from ``warmup_temp`` to ``temp`` over the first ``warmup`` share of training."""
    if warmup <= 0 or progress >= warmup:
        return temp
    return warmup_temp + (temp - warmup_temp) * progress / warmup


def normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the distributions ``p`` ``(N, K)`` over ``ln K``: 1 = uniform, 0 = one-hot."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1])


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al., 2019; used by DINOv2): ``-mean log`` of each
    L2-normalised embedding's distance to its nearest neighbour in the batch. It pushes the
    embeddings of different images apart, which DINO's centring alone cannot do when they start
    almost identical (a freshly initialised ViT gives a cosine similarity above 0.99)."""
    z = F.normalize(z, dim=-1, eps=eps)
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(-1)
    return -torch.log((z - z[nearest]).norm(dim=-1) + eps).mean()


def _views_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, V, C, *S) -> (V * B, C, *S)`` with views outermost, so ``chunk(V)`` splits by view."""
    return x.transpose(0, 1).flatten(0, 1)


@register_task("dino")
class DINOTask(Task):
    """DINO on ``backbone`` (any :class:`~medssl.models.base.Encoder`).

    Args:
        out_dim, hidden_dim, bottleneck_dim, head_batch_norm: the :class:`DINOHead`. With
            ``head_batch_norm`` the teacher's head normalises with its own batch statistics, as the
            reference's teacher does (it is never put in eval mode there).
        pooling: backbone output fed to the head (default ``"cls"`` with a CLS token, else ``"mean"``).
        student_temp: student softmax temperature (0.1).
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup: teacher temperature, warmed up
            linearly from ``warmup_teacher_temp`` over the first ``teacher_temp_warmup`` of training.
        momentum: teacher EMA momentum at the start (cosine to 1).
        center_momentum: EMA momentum of the centre.
        freeze_prototypes: share of training during which the prototypes are not trained.
        koleo_weight: weight of the :func:`koleo_loss` on the student's pooled global-view
            embeddings (DINOv2 uses 0.1; 0 turns it off).
        centering: ``"ema"`` (DINO's centre) or ``"sinkhorn"`` (DINOv2's Sinkhorn-Knopp teacher,
            ``sinkhorn_iterations`` steps over all global views of the batch; no centre kept).
    """

    required_keys = ("views",)

    def __init__(self, backbone: nn.Module, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256,
                 pooling: str | None = None, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup: float = 0.3, momentum: float = 0.996,
                 center_momentum: float = 0.9, freeze_prototypes: float = 0.01, views_key: str = "views",
                 local_key: str = "local_views", koleo_weight: float = 0.0,
                 head_batch_norm: bool = False, centering: str = "ema", sinkhorn_iterations: int = 3) -> None:
        super().__init__(backbone)
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"momentum and center_momentum must lie in [0, 1], got {momentum}, {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.pooling = pooling or ("cls" if backbone.num_prefix_tokens else "mean")
        self.head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, batch_norm=head_batch_norm)
        self.teacher = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup, self.momentum, self.center_momentum = teacher_temp_warmup, momentum, center_momentum
        self.freeze_prototypes, self.views_key, self.local_key = freeze_prototypes, views_key, local_key
        self.required_keys = (views_key,)
        self.koleo_weight = koleo_weight

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        self.teacher_head.train(mode)  # batch statistics in a BatchNorm head, like the student's
        return self

    def _student(self, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding, prototype logits) of the student on ``x``."""
        z = self.embed(batch, x, self.pooling)
        return z, self.head(z, freeze_prototypes=self.progress < self.freeze_prototypes)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch[self.views_key]  # (B, G, C, *S)
        n_global = views.shape[1]
        if n_global < 2:
            raise ValueError(f"DINO needs at least 2 global views per image, got {n_global}")
        global_x = _views_first(views)
        with torch.no_grad():
            t_out = self.teacher_head(self.embed(batch, global_x, self.pooling, encoder=self.teacher)).float()  # (G * B, K)
        s_emb, s_global = self._student(batch, global_x)
        s_out = [s_global.float()]
        local = batch.get(self.local_key)
        if local is not None and local.shape[1] > 0:
            s_out.append(self._student(batch, _views_first(local))[1].float())
        s_out = torch.cat(s_out).div(self.student_temp).log_softmax(-1).chunk(n_global + (0 if local is None else local.shape[1]))

        temp = teacher_temperature(self.progress, self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp_warmup)
        if self.centering == "sinkhorn":
            t_prob = sinkhorn(t_out, epsilon=temp, iterations=self.sinkhorn_iterations).chunk(n_global)
        else:
            t_prob = ((t_out - self.center) / temp).softmax(-1).chunk(n_global)
        loss, terms = t_out.new_zeros(()), 0
        for i, q in enumerate(t_prob):
            for j, log_p in enumerate(s_out):
                if j != i:  # a view is never its own target
                    loss = loss + (-q * log_p).sum(-1).mean()
                    terms += 1
        loss = loss / terms
        out = {"dino_loss": loss.detach()}
        if self.koleo_weight:
            koleo = sum(koleo_loss(e) for e in s_emb.float().chunk(n_global)) / n_global
            loss = loss + self.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        if self.centering == "ema":
            self._update_center(t_out)
        return {"loss": loss, **out, "teacher_entropy": normalised_entropy(t_prob[0]).detach(), "teacher_temp": torch.tensor(temp)}

    @torch.no_grad()
    def _update_center(self, t_out: torch.Tensor) -> None:
        batch_center = mean_over_ranks(t_out.mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def teachers(self):
        return [(self.teacher, self.backbone), (self.teacher_head, self.head)]


    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """The image and the backbone's last-block attention over it."""
        from ..viz.attention import attention_panels

        return attention_panels(self.backbone, batch["image"], batch_context(batch))
