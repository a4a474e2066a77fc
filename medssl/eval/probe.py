"""Linear probe: logistic regression on frozen features, its strength chosen without the evaluation split.

Features are standardised on the training subset. The inverse regularisation strength ``C`` is
picked from ``Cs`` by stratified cross-validation on the training subset itself (``LogisticRegressionCV``),
so the split the result is reported on is never used for tuning; when a class has fewer than two
training items there is nothing to cross-validate and ``C = 1`` is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["linear_probe_scores"]


def linear_probe_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray,
                        Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), max_iter: int = 2000,
                        seed: int = 0) -> tuple[np.ndarray, float]:
    """Class probabilities ``(Q, K)`` for ``query_x`` and the chosen ``C``."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    train_y = np.asarray(train_y).reshape(-1)
    scaler = StandardScaler().fit(train_x)
    xs, qs = scaler.transform(train_x), scaler.transform(query_x)
    folds = min(3, int(np.bincount(train_y).min(initial=len(train_y)) if len(train_y) else 0))
    classes = np.unique(train_y)
    with warnings.catch_warnings():  # scikit-learn 1.8 announces parameter renames of LogisticRegressionCV
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        if folds >= 2 and len(classes) > 1:
            model = LogisticRegressionCV(Cs=list(Cs), cv=folds, max_iter=max_iter, random_state=seed, scoring="neg_log_loss")
            model.fit(xs, train_y)
            c = float(np.atleast_1d(model.C_)[0])
        else:
            c = 1.0
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(xs, train_y)
    prob = np.zeros((len(query_x), int(train_y.max()) + 1))
    prob[:, model.classes_] = model.predict_proba(qs)
    return prob, c
