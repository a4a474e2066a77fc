"""Evaluation of encoders: frozen features, probes, kNN and the metrics they report.

Embeddings (``features``), the linear probe, weighted kNN, stratified label fractions, the
metrics, supervised training (fine-tuning and the from-scratch baselines), labelled data, and
the protocol that runs them all on the same subsets (``protocol``; ``medssl evaluate``).
"""

from .embedder import EmbeddingInferer, EmbeddingWriter, embedding_evaluator, write_embeddings
from .features import embed_image, load_encoder
from .fractions import stratified_subset
from .knn import knn_scores
from .metrics import METRICS, classification_metrics
from .probe import linear_probe_scores
from .supervised import layer_decay_groups, train_classifier

__all__ = ["embed_image", "EmbeddingInferer", "EmbeddingWriter", "embedding_evaluator", "write_embeddings", "load_encoder", "stratified_subset",
           "knn_scores", "linear_probe_scores", "classification_metrics", "METRICS", "layer_decay_groups",
           "train_classifier"]
