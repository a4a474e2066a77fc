"""The Medformer: one Perceiver-IO encoder for 2D and 3D images of many modalities and organs.

The second source document (Simionescu) proposes it without code: a Perceiver IO (Jaegle et al.
2021) whose latent array holds collections of learned latents for organ, modality,
dimensionality and task, trained on many data sets at once. Here:

- **input adapters**, one per dimensionality: a patch embedding (``Conv2d`` / ``Conv3d``) plus the
  log-spaced sinusoidal positions the ViT uses, on any grid;
- **the latent array** of each image: ``num_latents`` shared latents, then ``latents_per_entry``
  latents from each collection (``organ``, ``modality``, ``spatial_dims``, ``task``), the entry
  chosen by the batch's ``context`` (:func:`~medssl.models.base.batch_context`). A value the
  collection does not list, or a context without the field, takes the collection's ``unknown``
  entry, so every image has the same number of latents. Only the chosen entries take part in the
  forward pass, so only they (and the shared latents) receive gradients;
- **encoding**: the latents cross-attend to the input tokens (the kept ones under ``keep``), then
  ``depth`` self-attention blocks run on the latents alone (the cost no longer grows with the
  image: ``O(N L)`` for the cross-attention, ``O(L^2)`` per block);
- **output queries**: one query per requested token position (that patch's own embedding, its
  position embedding and a learned offset) and a CLS query cross-attend to the latents, giving
  ``(B, 1 + N, D)`` tokens:
  the token interface every medssl task reads (:class:`~medssl.models.base.GridEncoder`). Under
  ``keep`` the queries are the kept positions, as the ViT returns the kept tokens, so MAE's decoder
  fills the masked ones as it does for the ViT.

One model serves both dimensionalities. A task that needs one patch shape (MAE's pixel decoder)
takes :meth:`Medformer.view` of its dimensionality: a view with that ``spatial_dims`` and
``patch_size`` whose parameters are the Medformer's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from monai.networks.layers import Conv
from monai.utils import ensure_tuple_rep
from torch import nn

from .blocks import Block, CrossBlock, key_padding_mask
from .position import sincos_position_embedding

__all__ = ["Medformer", "MedformerView", "DEFAULT_COLLECTIONS"]

#: The source's collections (organ, modality, dimensionality, task); modality values are DICOM codes.
DEFAULT_COLLECTIONS: dict[str, tuple[str, ...]] = {
    "organ": ("brain", "chest", "knee", "abdomen"),
    "modality": ("MR", "CT", "PT", "DX", "CR"),
    "spatial_dims": ("2", "3"),
    "task": ("segmentation", "classification", "ssl"),
}


class Medformer(nn.Module):
    """Perceiver-IO encoder: ``(B, C, *spatial)`` (2D or 3D) -> ``(B, 1 + N, D)`` tokens (see the module docstring).

    Args:
        in_channels: image channels (both dimensionalities).
        patch_size: patch edge, the same in 2D and 3D, or ``{2: p2, 3: p3}``.
        embed_dim, num_heads: width and heads of every block.
        num_latents: shared latents.
        latents_per_entry: latents of each collection entry.
        depth: latent self-attention blocks.
        collections: name -> the values it has entries for (``unknown`` is added to each); None:
            :data:`DEFAULT_COLLECTIONS`; ``{}``: shared latents only.
        spatial_dims: the dimensionality the plain interface reports (``patch_size``,
            ``grid_size``); a view gives the other.
        default_context: what to assume where a batch's context does not say (``{"organ": "chest",
            "modality": "DX"}`` when embedding or evaluating one data set whose images carry no such
            fields); not part of the weights.
    """

    num_prefix_tokens = 1
    __jit_unused_properties__ = ["patch_size"]  # TorchScript: the forward reads _patch_of
    __constants__ = ["num_prefix_tokens"]

    def __init__(self, in_channels: int = 1, patch_size: int | Mapping[int, int] = 4, embed_dim: int = 192, num_heads: int = 3,
                 num_latents: int = 32, latents_per_entry: int = 4, depth: int = 6, mlp_ratio: float = 4.0,
                 collections: Mapping[str, Sequence[str]] | None = None, spatial_dims: int = 2,
                 pos_temperature: float = 10000.0, default_context: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.in_channels, self.embed_dim, self.num_heads, self.depth = in_channels, embed_dim, num_heads, depth
        self.spatial_dims, self.pos_temperature = spatial_dims, pos_temperature
        edges = patch_size if isinstance(patch_size, Mapping) else {2: patch_size, 3: patch_size}
        self.patch_sizes = {d: ensure_tuple_rep(int(edges[d]), d) for d in (2, 3)}
        self._patch_of = {str(d): list(p) for d, p in self.patch_sizes.items()}  # the form TorchScript reads
        self.patch_embed = nn.ModuleDict({str(d): Conv[Conv.CONV, d](in_channels, embed_dim, kernel_size=p, stride=p)
                                          for d, p in self.patch_sizes.items()})
        collections = DEFAULT_COLLECTIONS if collections is None else collections  # {}: shared latents only (the ablation)
        self.collections = {name: (*map(str, values), "unknown") for name, values in collections.items()}
        self.default_context = {k: v for k, v in (default_context or {}).items() if v not in (None, "")}
        unknown = sorted(set(self.default_context) - set(self.collections))
        if unknown:
            raise ValueError(f"default_context names {unknown}, which are not collections ({', '.join(self.collections)})")
        self.latents = nn.Parameter(torch.randn(num_latents, embed_dim) * 0.02)
        self.entries = nn.ParameterDict({name: nn.Parameter(torch.randn(len(values), latents_per_entry, embed_dim) * 0.02)
                                         for name, values in self.collections.items()})
        self.encoder_cross = CrossBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.latent_norm = nn.LayerNorm(embed_dim)
        self.cls_query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.query_offset = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_cross = CrossBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim)
        self._pos_cache: dict = {}
        self._script_latents = {}  # str(spatial_dims) -> (1, L, D) latents of a scripted model: see __prepare_scriptable__

    # -- the grid interface (for the reported dimensionality; views give the other) -------------
    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.patch_sizes[self.spatial_dims]

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an input of ``spatial_shape`` (2D or 3D by its length; raises if the patch does not divide it)."""
        return tuple(self._grid([int(s) for s in spatial_shape]))

    def _grid(self, shape: list[int]) -> list[int]:
        if len(shape) != 2 and len(shape) != 3:
            raise ValueError(f"the Medformer takes 2D or 3D images, got spatial shape {shape}")
        patch = self._patch_of[str(len(shape))]
        fits = True
        grid: list[int] = []
        for s, p in zip(shape, patch):
            fits = fits and s % p == 0
            grid.append(s // p)
        if not fits:
            raise ValueError(f"input size {shape} is not a multiple of patch_size {patch}")
        return grid

    def layout(self, grid: Sequence[int], device: torch.device | str = "cpu") -> None:
        """No attention windows: the latents see every token."""
        return None

    def view(self, spatial_dims: int) -> MedformerView:
        """This model as a ``spatial_dims``-D encoder (its parameters, not a copy)."""
        return MedformerView(self, spatial_dims)

    def pos_embed(self, grid: list[int], device: torch.device) -> torch.Tensor:
        if torch.jit.is_scripting():
            return sincos_position_embedding(grid, self.embed_dim, self.pos_temperature, device)
        else:
            key = (tuple(grid), str(device))
            if key not in self._pos_cache:
                self._pos_cache[key] = sincos_position_embedding(grid, self.embed_dim, self.pos_temperature, device=device)
            return self._pos_cache[key]

    def __prepare_scriptable__(self) -> Medformer:
        """Called by ``torch.jit.script``: TorchScript cannot choose latents by context (strings, a
        ParameterDict), so a scripted Medformer uses the latents of :attr:`default_context`, taken
        from the weights as they are now (export after loading them, as MONAI's ``ckpt_export``
        does) and on the device the model is on. It ignores ``context``."""
        device = self.latents.device
        with torch.no_grad():
            self._script_latents = {str(d): self.latent_array(None, 1, d, device).detach().clone() for d in (2, 3)}
        return self

    # -- latents ------------------------------------------------------------------------------
    def entry_index(self, name: str, context: Mapping[str, Any] | None, batch: int, spatial_dims: int,
                    device: torch.device) -> torch.Tensor:
        """``(B,)`` the entry of collection ``name`` each image takes (``unknown`` where the context does not say)."""
        values = self.collections[name]
        unknown = len(values) - 1
        given = (context or {}).get(name)
        if given is None:
            given = self.default_context.get(name)
        if name == "spatial_dims" and given is None:
            given = [spatial_dims] * batch
        if given is None:
            return torch.full((batch,), unknown, dtype=torch.long, device=device)
        if isinstance(given, torch.Tensor):
            given = given.reshape(-1).tolist() if given.ndim else [given.item()] * batch
        elif isinstance(given, (str, int)):
            given = [given] * batch
        lookup = {v: i for i, v in enumerate(values)}
        return torch.tensor([lookup.get(str(v), unknown) for v in given], dtype=torch.long, device=device)

    def latent_array(self, context: Mapping[str, Any] | None, batch: int, spatial_dims: int, device: torch.device) -> torch.Tensor:
        """``(B, L, D)``: the shared latents, then each collection's chosen entry."""
        parts = [self.latents.unsqueeze(0).expand(batch, -1, -1)]
        for name in self.collections:  # the order of latent_slices
            parts.append(self.entries[name][self.entry_index(name, context, batch, spatial_dims, device)])  # (B, per_entry, D)
        return torch.cat(parts, 1)

    def latent_slices(self) -> dict[str, slice]:
        """Where each part sits in :meth:`latent_array`: ``shared``, then one slice per collection."""
        out, start = {"shared": slice(0, len(self.latents))}, len(self.latents)
        for name in self.collections:
            width = self.entries[name].shape[1]
            out[name], start = slice(start, start + width), start + width
        return out

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, context: Any = None) -> torch.Tensor:
        """Encode ``x`` ``(B, C, *spatial)``, 2D or 3D.

        Args:
            keep: optional ``(B, K)`` raster indices of the tokens to encode (-1: a padding slot).
            context: the batch's conditioning, a mapping (typed ``Any``: TorchScript has no
                Mapping); chooses the latents. A scripted model ignores it (see
                :meth:`__prepare_scriptable__`).

        Returns:
            ``(B, 1 + N, D)`` (a CLS token, then the grid in raster order), or ``(B, 1 + K, D)`` in
            the order of ``keep`` (padding slots are zeros).
        """
        return self._forward_tokens(x, keep, context)

    def _forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None, context: Any = None) -> torch.Tensor:
        # the forward pass, under a name a subclass's forward can call in TorchScript (which has no super())
        d = x.ndim - 2
        grid = self._grid(x.shape[2:])
        tokens = torch.empty([0], dtype=x.dtype, device=x.device)
        for name, embed in self.patch_embed.items():
            if name == str(d):
                tokens = embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        b = tokens.shape[0]
        pos = self.pos_embed(grid, tokens.device).unsqueeze(0).expand(b, -1, -1)  # (B, N, D)
        valid: Optional[torch.Tensor] = None
        if keep is not None:
            index = keep.clamp(min=0).unsqueeze(-1).expand(-1, -1, self.embed_dim)
            tokens, pos = tokens.gather(1, index), pos.gather(1, index)
            filled = keep >= 0
            if not bool(filled.all()):
                valid = filled
        if torch.jit.is_scripting():
            latents = self._script_latents[str(d)].expand(b, -1, -1)
        else:
            latents = self.latent_array(context, b, d, tokens.device)
        latents = self.encoder_cross(latents, tokens + pos, context_mask=key_padding_mask(valid))
        for block in self.blocks:
            latents = block(latents)
        latents = self.latent_norm(latents)
        # a position's query carries that patch's own embedding: the latents add context to it (without it, MAE
        # training let the outputs forget the image: probe AUC 0.57 on PneumoniaMNIST, below the random init's 0.82)
        queries = torch.cat([self.cls_query.expand(b, -1, -1), tokens + pos + self.query_offset], 1)  # (B, 1 + N, D)
        out = self.norm(self.decoder_cross(queries, latents))
        if valid is not None:
            out = out * torch.cat([valid.new_ones(b, 1), valid], 1).unsqueeze(-1).to(out.dtype)
        return out


class MedformerView(nn.Module):
    """A :class:`Medformer` as a ``spatial_dims``-D encoder: that dimensionality's ``patch_size`` and
    ``grid_size``, the model's own parameters (tasks built on two views train one model)."""

    num_prefix_tokens = 1

    def __init__(self, model: Medformer, spatial_dims: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.model, self.spatial_dims = model, spatial_dims
        self.in_channels, self.embed_dim, self.num_heads = model.in_channels, model.embed_dim, model.num_heads

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.model.patch_sizes[self.spatial_dims]

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        if len(spatial_shape) != self.spatial_dims:
            raise ValueError(f"this is the {self.spatial_dims}D view of the Medformer; got spatial shape {tuple(spatial_shape)}")
        return self.model.grid_size(spatial_shape)

    def layout(self, grid: Sequence[int], device: torch.device | str = "cpu") -> None:
        return None

    def idle_parameters(self) -> set[str]:
        """Names (in this view) of the parameters a task on it never uses: the other dimensionality's input adapter."""
        other = 5 - self.spatial_dims
        return {f"model.patch_embed.{other}.{n}" for n, _ in self.model.patch_embed[str(other)].named_parameters()}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, context: Mapping[str, Any] | None = None) -> torch.Tensor:
        if x.ndim - 2 != self.spatial_dims:
            raise ValueError(f"this is the {self.spatial_dims}D view of the Medformer; got a {x.ndim - 2}D input")
        return self.model(x, keep, context)
