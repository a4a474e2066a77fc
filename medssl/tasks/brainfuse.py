"""BrainFuse (second source document, Simionescu): train on new scans fused from several patients.

Each step fuses ``n_patients`` (2..8) different patients of the batch region by region
(:mod:`medssl.tasks.fusion`), in one of two spaces:

- ``space="raw"`` (RawBrainFuse): the voxels themselves are mixed; the fused scan has seams where
  regions meet (softened by ``smoothness``).
- ``space="latent"`` (BrainFuse): the patients' encoder tokens are mixed with the same partition
  read on the token grid, and a generator (:class:`~medssl.tasks.heads.PixelDecoder`) decodes the
  fused tokens back into a scan; its attention over the whole grid smooths the seams. With
  ``detail_transfer`` the fused scan keeps the patients' own fine detail: it is the decoded mix
  plus the raw fusion of what the generator misses in each source,
  ``G(mix(z)) + mix(x - G(z))`` (= raw fusion + ``G(mix(z)) - mix(G(z))``, the generator's
  correction of the seams; multi-band blending with a learned low band). A generator that decodes
  every scan to one mean image gives raw fusion exactly; a perfect one gives ``G(mix(z))``.

The generator is trained inside this task, by reconstructing every source scan from its full
token grid (an autoencoder on the encoder's tokens), not by reusing the MAE task's decoder: the
MAE decoder predicts hidden patches from visible ones and never learns to decode a complete token
grid, and this way the task works in any mix, with or without MAE. By default the reconstruction
trains the encoder too (``generator_trains_encoder=True``): tokens trained only by classification
and Barlow Twins keep too little of the image to be decoded (measured on PneumoniaMNIST with 1 %
of the labels: the generator on detached tokens ends below R² 0, a mean image), and latent fusion
needs a latent space that can be decoded, which is the source's "generative model training" half
of the method. ``False`` trains the generator alone on detached tokens.

What a fused scan is used for (each optional, all summed into the task's loss):

- ``barlow``: a Barlow Twins task (usually the same object as the mix's ``barlow`` task, so they
  share a projector) is given two augmented views of every fused scan (``views``: a view pipeline
  such as :func:`medssl.data.views.two_views`) as extra samples;
- ``classify``: a classification task is given the fused scans with soft labels, the sources'
  labels weighted by their share of the partition (items labelled ``-1`` are unlabelled; fused
  scans with an unlabelled source get no label);
- consistency regularisation (``consistency_weight`` > 0): the fused scan's embedding is pulled
  towards the share-weighted mix of its sources' embeddings (stop-gradient on the mix),
  ``1 - cos``.

The fused scan itself is data: no gradient flows through it into the generator or the sources.

A generator that has not learned yet decodes noise, and noise with soft labels harms more than it
helps. Latent fused scans are therefore used only once the generator reconstructs the sources
well: ``generator_quality``, a running mean of its R² (1 - error / variance of the pixels), must
have reached ``min_generator_quality`` (default 0.5); until then the step trains the generator
alone and logs ``latent_used`` 0 (with ``detail_transfer``, whose limit for a generator that
decodes nothing is raw fusion, the step uses the raw fusion instead: the generator's correction is
added only once it decodes). The gate reads the running mean from before the step, which DDP
broadcasts from rank 0, so every rank takes the same branch; the running mean is a buffer, saved
in checkpoints, so a resumed run gates exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import CONTEXT_KEYS
from ..models.pooling import pool_tokens
from .base import Task, register_task
from .fusion import Partition, fuse, fusion_groups, random_partition, shares, soft_labels
from .heads import PixelDecoder
from .patchify import patchify, unpatchify

__all__ = ["BrainFuseTask", "RawBrainFuseTask", "consistency_loss"]

SPACES = ("latent", "raw")


def consistency_loss(fused: torch.Tensor, sources: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between fused embeddings ``(G, D)`` and the share-weighted mix of their sources'
    embeddings ``sources`` ``(G, K, D)`` with shares ``(G, K)``; 0 when they are aligned."""
    mix = (sources.float() * share.unsqueeze(-1).to(sources.device)).sum(1)
    return (1 - F.cosine_similarity(fused.float(), mix.detach(), dim=-1)).mean()


def _rows(value, index: torch.Tensor):
    if isinstance(value, torch.Tensor) and value.ndim:
        return value[index.to(value.device)]
    if isinstance(value, (list, tuple)):
        return [value[i] for i in index.tolist()]
    return value


@register_task("brainfuse")
class BrainFuseTask(Task):
    """Patient fusion on ``backbone`` (see the module docstring).

    Args:
        space: ``"latent"`` (fuse tokens, decode with the generator; needs a grid encoder such as
            the ViT) or ``"raw"`` (fuse voxels).
        n_patients: patients per fused scan, 2..8.
        n_regions: regions of the partition (default ``2 * n_patients``); smoothness: border width
            as a fraction of the image edge (0: hard borders).
        n_fused: fused scans per step (default: as many as the batch has items).
        views: the view pipeline that makes two augmented views of a fused scan (for ``barlow``).
        barlow: a two-view task (Barlow Twins) given the fused scans' views.
        classify: a classification task given the fused scans with soft labels.
        consistency_weight: weight of the consistency term (0: off).
        pooling: embedding for the consistency term (default: ``classify``'s, else ``cls``/``mean``).
        generator_dim, generator_depth: the latent generator's width and depth.
        generator_trains_encoder: let the generator's reconstruction loss reach the encoder (default).
        min_generator_quality: running R² the generator needs before latent fused scans are used.
        barlow_weight: scale of the Barlow Twins loss on fused scans (give it the mix's ``barlow``
            loss weight, so real and fused samples weigh alike).
        detail_transfer: latent fused scans keep the sources' detail the generator misses (see the
            module docstring; the default, measured better on PneumoniaMNIST); off: the decoded mix alone.
        generative: a latent :class:`BrainFuseTask` trained beforehand (the source's "generative model
            training"; e.g. on all unlabelled scans) whose encoder and generator make the latent fused
            scans instead of this task's own: frozen, kept in eval mode, saved with the task. This task
            then trains no generator and needs no gate; ``backbone`` is only the encoder being trained.
    """

    required_keys = ("image", "patient")

    def __init__(self, backbone: nn.Module, space: str = "latent", n_patients: int = 2, n_regions: int | None = None,
                 smoothness: float = 0.05, n_fused: int | None = None, views=None, barlow: Task | None = None,
                 classify: Task | None = None, consistency_weight: float = 0.0, pooling: str | None = None,
                 generator_dim: int | None = None, generator_depth: int = 2, generator_trains_encoder: bool = True,
                 min_generator_quality: float = 0.5, barlow_weight: float = 1.0, detail_transfer: bool = True,
                 generative: "BrainFuseTask | None" = None, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__(backbone)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if not isinstance(n_patients, int) or not 2 <= n_patients <= 8:
            raise ValueError(f"n_patients must be a whole number in 2..8, got {n_patients!r}")
        if barlow is not None and views is None:
            raise ValueError("giving fused scans to a Barlow Twins task needs views (medssl.data.views.two_views)")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        if space == "raw" and barlow is None and classify is None and not consistency_weight:
            raise ValueError("raw fusion with nothing to train: give it barlow, classify or consistency_weight > 0")
        self.space, self.n_patients, self.n_regions, self.smoothness = space, n_patients, n_regions, float(smoothness)
        self.n_fused, self.views, self.consistency_weight = n_fused, views, float(consistency_weight)
        self.barlow, self.classify, self.barlow_weight = barlow, classify, float(barlow_weight)
        self.image_key, self.label_key, self.detail_transfer = image_key, label_key, bool(detail_transfer)
        self.required_keys = (image_key, "patient") + ((label_key,) if classify is not None else ())
        self.pooling = pooling or getattr(classify, "pooling", None) or ("cls" if backbone.num_prefix_tokens else "mean")
        self.generator, self.generator_trains_encoder = None, bool(generator_trains_encoder)
        self.min_generator_quality = float(min_generator_quality)
        self.register_buffer("generator_quality", torch.zeros(()))
        self.generative = None
        if generative is not None:
            if space != "latent" or generative.generator is None:
                raise ValueError("generative is a trained latent BrainFuseTask, for space='latent'")
            if generative.backbone is backbone:
                raise ValueError("generative needs an encoder of its own: freezing it would freeze the backbone being trained")
            self.generative = generative.requires_grad_(False).eval()
        elif space == "latent":
            if not hasattr(backbone, "patch_size"):
                raise ValueError("latent fusion decodes the token grid: it needs a grid encoder (the ViT); use space='raw'")
            pixels = int(torch.Size(backbone.patch_size).numel()) * backbone.in_channels
            self.generator = PixelDecoder(backbone.embed_dim, pixels, generator_dim, generator_depth)

    def train(self, mode: bool = True) -> "BrainFuseTask":
        super().train(mode)
        if self.generative is not None:
            self.generative.eval()  # a fixed generative model: no dropout, no running statistics move
        return self

    # -- making fused scans ---------------------------------------------------------------
    def plan(self, batch: dict, generator: torch.Generator | None = None, n_fused: int | None = None) -> tuple[torch.Tensor, Partition]:
        """Which items to fuse ``(G, K)`` and the partition for each fused scan (``n_fused`` of them:
        default the task's setting, else one per batch item)."""
        img = batch[self.image_key]
        n = n_fused or self.n_fused or img.shape[0]
        groups = fusion_groups(batch["patient"], self.n_patients, n, generator)
        part = random_partition(n, self.n_patients, img.ndim - 2, self.n_regions, self.smoothness, generator, img.device)
        return groups, part

    def decode(self, patch_tokens: torch.Tensor, grid: tuple[int, ...], channels: int) -> torch.Tensor:
        """Generator: patch tokens ``(B, N, D)`` -> scans ``(B, C, *S)``."""
        return unpatchify(self.generator(patch_tokens, grid).float(), self.backbone.patch_size, grid, channels)

    def make(self, batch: dict, groups: torch.Tensor, part: Partition, tokens: torch.Tensor | None = None,
             space: str | None = None, detail: bool | None = None,
             decoded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused scans ``(G, C, *S)`` (in the images' dtype and range) and the voxel weights ``(G, K, *S)``;
        ``space`` and ``detail`` (transfer) default to the task's settings. ``decoded``: the generator's
        decodings of ``tokens`` ``(B, C, *S)`` where the caller has them (detail transfer needs them)."""
        img = batch[self.image_key]
        space = space or self.space
        detail = self.detail_transfer if detail is None else detail
        weights = part.weights(img.shape[2:])
        if space == "raw":
            return fuse(img, groups, weights), weights
        if self.generative is not None:  # fused in the pretrained generative model's latent space
            return self.generative.make(batch, groups, part, space="latent", detail=detail)
        grid = self.backbone.grid_size(img.shape[2:])
        p = self.backbone.num_prefix_tokens
        with torch.no_grad():
            if tokens is None:
                tokens = self.encode(batch, img)
            patches = tokens[:, p:].detach()
            grid_tokens = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
            mixed = fuse(grid_tokens, groups, part.weights(grid)).flatten(2).transpose(1, 2)  # (G, N, D)
            fused = self.decode(mixed, grid, img.shape[1])
            if detail:  # + the raw fusion of what the generator misses in each source
                decoded = self.decode(patches, grid, img.shape[1]) if decoded is None else decoded.detach()
                fused = fused + fuse(img.float() - decoded, groups, weights)
        lo, hi = img.detach().amin(), img.detach().amax()
        return fused.clamp(lo, hi).to(img.dtype), weights

    def fused_batch(self, batch: dict, groups: torch.Tensor, fused: torch.Tensor) -> dict:
        """A batch of fused scans; their context (modality, ...) is their first source's."""
        out = {k: _rows(batch[k], groups[:, 0]) for k in CONTEXT_KEYS if k in batch}
        out[self.image_key] = fused
        return out

    def _views(self, fused_batch: dict) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the trainer's per-step seed: replays on resume
        if hasattr(self.views, "set_random_state"):
            self.views.set_random_state(seed=seed)
        images = fused_batch[self.image_key]
        modality = fused_batch.get("modality")
        views = []
        for i in range(images.shape[0]):
            item = {"image": images[i]}
            if isinstance(modality, list):
                item["modality"] = modality[i]
            views.append(torch.as_tensor(self.views(item)["views"]))
        return torch.stack(views).to(images.device)

    # -- the task -------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        img = batch[self.image_key]
        rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        groups, part = self.plan(batch, rng)
        out: dict[str, torch.Tensor] = {}
        total = img.new_zeros((), dtype=torch.float32)
        tokens = decoded = None
        if self.generator is not None or self.consistency_weight:
            with torch.set_grad_enabled(self.generator is not None and self.generator_trains_encoder):
                tokens = self.encode(batch, img)  # the generator's input and the consistency target
        if self.generator is not None:
            grid = self.backbone.grid_size(img.shape[2:])
            source = tokens[:, self.backbone.num_prefix_tokens:]
            recon = self.generator(source if self.generator_trains_encoder else source.detach(), grid).float()
            pixels = patchify(img, self.backbone.patch_size).float()
            out["generator"] = F.mse_loss(recon, pixels)
            decoded = unpatchify(recon, self.backbone.patch_size, grid, img.shape[1])  # reused by detail transfer
            total = total + out["generator"]
            ready = bool(self.generator_quality >= self.min_generator_quality)  # before this step: the same on every rank
            if self.training:
                with torch.no_grad():
                    r2 = 1 - out["generator"].detach() / pixels.var().clamp(min=1e-8)
                    self.generator_quality.mul_(0.9).add_(0.1 * r2.clamp(min=-1.0))
            out["generator_quality"] = self.generator_quality.clone()
            out["latent_used"] = torch.tensor(float(ready))
            if not ready and not self.detail_transfer:
                out["loss"] = total
                return out
        elif self.generative is not None:
            out["latent_used"] = torch.tensor(1.0)
        # with detail transfer a generator that does not decode yet adds no correction: raw fusion until then
        fused, weights = self.make(batch, groups, part, tokens, space=None if self.generator is None or ready else "raw",
                                   decoded=decoded)
        share = shares(weights)
        fb = self.fused_batch(batch, groups, fused)
        embedding = None
        if self.classify is not None:
            labels = torch.as_tensor(batch[self.label_key], device=img.device).long().view(-1)
            labelled = (labels[groups.to(img.device)] >= 0).all(1)
            if bool(labelled.any()):
                soft = soft_labels(labels.clamp(min=0), groups, share, self.classify.num_classes)
                embedding = self.embed(fb, fused, self.pooling)
                logits = self.classify.head(embedding).float() if self.classify.pooling == self.pooling else \
                    self.classify.logits(fused, fb).float()
                ce = -(soft * logits.log_softmax(-1)).sum(-1)
                out["soft_ce"] = ce[labelled].mean()
                total = total + out["soft_ce"]
        if self.barlow is not None:
            out["barlow"] = self.barlow({**fb, "views": self._views(fb)})["loss"]
            total = total + self.barlow_weight * out["barlow"]
        if self.consistency_weight:
            if embedding is None:
                embedding = self.embed(fb, fused, self.pooling)
            sources = pool_tokens(tokens, self.pooling, self.backbone.num_prefix_tokens)[groups.to(img.device)]
            out["consistency"] = consistency_loss(embedding, sources, share)
            total = total + self.consistency_weight * out["consistency"]
        if not out:  # a batch without fully labelled groups, and nothing else to learn from it
            total = total + sum(p.sum() for p in self.classify.head.parameters()) * 0.0
        out["loss"] = total
        out["largest_share"] = share.max(1).values.mean().detach()
        return out

    @property
    def picture_items(self) -> int:
        """Items the pictures need (each fused scan draws ``n_patients`` different ones)."""
        return 2 * self.n_patients

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """:meth:`panels` of a fixed plan: the source document's figures."""
        return self.panels(batch, *self.plan(batch, torch.Generator().manual_seed(0)))[0]

    @torch.no_grad()
    def panels(self, batch: dict, groups: torch.Tensor, part: Partition) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Up to four sources, the partition (one colour per source), the raw fusion and, in latent
        space, the latent fusion of the same partition, decoded alone and with detail transfer; and the
        voxel weights ``(G, K, *S)``."""
        from ..viz.panels import region_colours

        img = batch[self.image_key].float()
        raw, weights = self.make(batch, groups, part, space="raw")
        panels = {f"patient {k + 1}": img[groups[:, k].to(img.device)] for k in range(min(4, self.n_patients))}
        panels["partition"] = region_colours(weights.argmax(1, keepdim=True))  # patient k in colour k
        panels["raw fusion"] = raw.float()
        if self.generator is not None or self.generative is not None:
            panels["latent fusion"] = self.make(batch, groups, part, space="latent", detail=False)[0].float()
            panels["latent + detail"] = self.make(batch, groups, part, space="latent", detail=True)[0].float()
        return panels, weights


@register_task("raw_brainfuse")
class RawBrainFuseTask(BrainFuseTask):
    """:class:`BrainFuseTask` in voxel space (RawBrainFuse); a name of its own so a mix can hold both."""

    def __init__(self, backbone: nn.Module, **kwargs) -> None:
        kwargs.setdefault("space", "raw")
        super().__init__(backbone, **kwargs)
