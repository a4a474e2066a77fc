"""Classification metrics reported by every evaluation: accuracy, balanced accuracy, AUC.

AUC is one-vs-rest macro-averaged for more than two classes; it is NaN when the evaluated
labels hold a single class (AUC is undefined then), never an exception.
"""

from __future__ import annotations

import numpy as np

__all__ = ["classification_metrics", "METRICS"]

METRICS = ("accuracy", "balanced_accuracy", "auc")


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Metrics of class ``scores`` ``(N, K)`` (probabilities or logits) against integer ``labels`` ``(N,)``."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores must be (N, K) for N={len(labels)} labels, got {scores.shape}")
    pred = scores.argmax(1)
    out = {"accuracy": float((pred == labels).mean()), "balanced_accuracy": float(balanced_accuracy_score(labels, pred))}
    if len(np.unique(labels)) < 2:
        out["auc"] = float("nan")
    elif scores.shape[1] == 2:
        out["auc"] = float(roc_auc_score(labels, scores[:, 1]))
    else:
        prob = np.exp(scores - scores.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        out["auc"] = float(roc_auc_score(labels, prob, multi_class="ovr", labels=np.arange(scores.shape[1])))
    return out
