"""Evaluation of encoders: frozen features (and, next, probes, kNN, fine-tuning and baselines)."""

from .features import embed_image, extract_embeddings, load_encoder, tiles, write_embeddings

__all__ = ["tiles", "embed_image", "extract_embeddings", "write_embeddings", "load_encoder"]
