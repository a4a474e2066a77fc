"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Caron et al. (2021, arXiv:2104.14294): L2-normalised features, cosine similarity, the k nearest
training items vote for their class with weight ``exp(similarity / T)``. Written here rather
than with scikit-learn's ``KNeighborsClassifier`` because that votes uniformly or by distance,
not with the temperature-scaled weights the protocol specifies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_scores"]


@torch.no_grad()
def knn_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int = 20, temperature: float = 0.07,
               num_classes: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Class scores ``(Q, K)`` (normalised votes) of each query from its ``k`` nearest training items."""
    train = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_y).reshape(-1), dtype=torch.long)
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, len(train))
    out = []
    for start in range(0, len(query_x), chunk):
        q = F.normalize(torch.as_tensor(np.asarray(query_x[start:start + chunk]), dtype=torch.float32), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out).numpy()
