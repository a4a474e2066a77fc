"""Probes, kNN, label fractions and metrics on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.eval import classification_metrics, knn_scores, linear_probe_scores, stratified_subset


def _separable(n=300, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, 16))
    x[np.arange(n), y] += 6.0  # class c is far along axis c
    return x, y


@pytest.mark.parametrize("method", ["probe", "knn"])
def test_separable_features_give_perfect_scores_and_uninformative_ones_give_chance(method):
    x, y = _separable()
    fit = (lambda a, b, q: linear_probe_scores(a, b, q)[0]) if method == "probe" else knn_scores
    good = classification_metrics(y[200:], fit(x[:200], y[:200], x[200:]))
    assert good["accuracy"] == 1.0 and good["auc"] == 1.0
    noise = np.random.default_rng(1).normal(size=(600, 16))  # features that carry nothing about the labels
    y = np.random.default_rng(2).integers(0, 3, 600)
    bad = classification_metrics(y[300:], fit(noise[:300], y[:300], noise[300:]))
    assert bad["balanced_accuracy"] < 0.45 and 0.4 < bad["auc"] < 0.6  # 3 classes: chance is 1/3 and 0.5


def test_knn_votes_are_temperature_weighted():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    scores = knn_scores(train, np.array([0, 0, 1]), np.array([[1.0, 0.0]]), k=3, temperature=1.0)
    sims = train @ np.array([1.0, 0.0]) / np.linalg.norm(train, axis=1)
    w = np.exp(sims)
    np.testing.assert_allclose(scores[0], [w[:2].sum() / w.sum(), w[2] / w.sum()], rtol=1e-5)


def test_probe_with_one_example_of_a_class_still_runs():
    x, y = _separable(60, 2)
    idx = np.r_[np.flatnonzero(y == 0)[:10], np.flatnonzero(y == 1)[:1]]
    prob, c = linear_probe_scores(x[idx], y[idx], x)
    assert prob.shape == (60, 2) and c == 1.0 and np.allclose(prob.sum(1), 1)


def test_stratified_fraction_keeps_every_class_and_is_seeded():
    labels = np.r_[np.zeros(990, int), np.ones(8, int), np.full(2, 2)]
    idx = stratified_subset(labels, 0.01, seed=3)
    assert set(labels[idx]) == {0, 1, 2} and np.bincount(labels[idx]).tolist() == [10, 1, 1]
    assert np.array_equal(idx, stratified_subset(labels, 0.01, seed=3))
    assert not np.array_equal(idx, stratified_subset(labels, 0.01, seed=4))
    assert len(stratified_subset(labels, 1.0)) == 1000
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0)


def test_metrics_values():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(labels, scores)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.75 and m["auc"] == 1.0
    assert np.isnan(classification_metrics(np.array([1, 1]), scores[:2])["auc"])
    multi = classification_metrics(np.array([0, 1, 2]), np.eye(3) * 5)
    assert multi["auc"] == 1.0 and multi["accuracy"] == 1.0
