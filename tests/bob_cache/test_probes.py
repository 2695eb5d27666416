"""Probe algorithms: known answers, agreement with scikit-learn, streaming, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from bob_cache.errors import SpecError
from bob_cache.probes import (
    BobRecipe,
    Features,
    Standardizer,
    bob_scores,
    fit_logistic,
    knn_scores,
    sample_fraction,
    sample_shots,
    sweep,
    train_bob_probe,
)
from bob_cache.probes.features import load_rows
from bob_cache.stores import open_store
from tests.conftest import blobs, write_feature_sets


def accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    return float((scores.argmax(1) == y).mean())


def split3(x: np.ndarray, y: np.ndarray) -> tuple:
    n = len(x)
    a, b = int(0.6 * n), int(0.8 * n)
    return (
        Features.in_memory(x[:a]),
        y[:a],
        Features.in_memory(x[a:b]),
        y[a:b],
        Features.in_memory(x[b:]),
        y[b:],
    )


def test_separable_features_give_perfect_accuracy() -> None:
    tr, ytr, va, yva, te, yte = split3(*blobs(600, classes=5))
    result = sweep(tr, ytr, va, yva, n_outputs=5, score=accuracy)
    assert accuracy(yte, result.model.scores(te)) == 1.0
    assert result.path[0]["lam"] == 1.0 and result.C > 0


def test_shuffled_labels_give_chance_accuracy() -> None:
    x, y = blobs(2000, classes=4, dim=32)
    y = np.random.default_rng(1).permutation(y)
    tr, ytr, va, yva, te, yte = split3(x, y)
    result = sweep(tr, ytr, va, yva, n_outputs=4, score=accuracy)
    assert abs(accuracy(yte, result.model.scores(te)) - 0.25) < 0.06


def test_agrees_with_sklearn_logistic_regression_at_the_same_C() -> None:
    digits = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.3, random_state=0
    )
    for C in (0.01, 0.3):
        ours = fit_logistic(Features.in_memory(xtr), ytr, n_outputs=10, C=C)
        std = Standardizer.fit(Features.in_memory(xtr))
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(std(xtr), ytr)
        ours_acc = accuracy(yte, ours.scores(Features.in_memory(xte)))
        ref_acc = ref.score(std(xte), yte)
        assert abs(ours_acc - ref_acc) <= 0.005, (C, ours_acc, ref_acc)
        np.testing.assert_allclose(
            ours.weight - ours.weight.mean(0), ref.coef_ - ref.coef_.mean(0), atol=5e-3
        )


def test_streaming_gives_the_same_answer_as_in_memory(tmp_path: Path) -> None:
    x, y = blobs(900, classes=3, dim=8, spread=2.5)  # overlapping: a real λ choice
    write_feature_sets(
        tmp_path / "s",
        {"train": (x[:600], y[:600]), "val": (x[600:750], y[600:750]), "test": (x[750:], y[750:])},
        shard_rows=64,
    )
    sets = {fs.attrs["split"]: fs for fs in open_store(tmp_path / "s").feature_sets()}
    answers = []
    for stream in (False, True):
        tr, ytr, _ = load_rows(sets["train"], stream=stream)
        va, yva, _ = load_rows(sets["val"], stream=stream)
        te, _, _ = load_rows(sets["test"], stream=stream)
        assert tr.is_streamed == stream
        result = sweep(tr, ytr, va, yva, n_outputs=3, score=accuracy)
        answers.append((result.lam, result.model.scores(te)))
    assert answers[0][0] == answers[1][0]  # the same λ
    assert np.array_equal(answers[0][1].argmax(1), answers[1][1].argmax(1))  # the same predictions
    np.testing.assert_allclose(answers[0][1], answers[1][1], atol=1e-2)  # float32 sums per shard


def test_knn_votes_match_a_brute_force_implementation() -> None:
    x, y = blobs(300, classes=3, dim=6, spread=3.0, seed=2)
    train, query = Features.in_memory(x[:250]), Features.in_memory(x[250:])
    scores = knn_scores(train, y[:250], query, n_outputs=3, ks=(5, 20), temperature=0.1)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[250:] @ xn[:250].T
    for k in (5, 20):
        top = np.argsort(-sims, axis=1)[:, :k]
        expected = np.zeros((50, 3))
        for i, row in enumerate(top):
            np.add.at(expected[i], y[row], np.exp(sims[i, row] / 0.1))
        np.testing.assert_allclose(scores[k], expected, rtol=1e-4)


def test_knn_separable_is_perfect_and_k_caps_at_train_size() -> None:
    x, y = blobs(200, classes=4)
    scores = knn_scores(
        Features.in_memory(x[:20]), y[:20], Features.in_memory(x[20:]), n_outputs=4, ks=(10, 200)
    )
    assert accuracy(y[20:], scores[10]) == 1.0 and scores[200].shape == (180, 4)


def test_few_shot_subsets_are_exact_and_deterministic() -> None:
    y = np.repeat(np.arange(5), 20)
    a, b = sample_shots(y, 3, seed=7), sample_shots(y, 3, seed=7)
    assert np.array_equal(a, b) and np.bincount(y[a]).tolist() == [3] * 5
    assert not np.array_equal(a, sample_shots(y, 3, seed=8))
    frac = sample_fraction(y, 0.1, seed=0)
    assert len(frac) == 10 and np.bincount(y[frac]).tolist() == [2] * 5
    assert np.array_equal(frac, sample_fraction(y, 0.1, seed=0))


def test_few_shot_errors_name_the_class_and_the_fix() -> None:
    y = np.array([0] * 10 + [1] * 2)
    with pytest.raises(
        SpecError, match="5-shot needs 5 training images per class, but class 1 has 2"
    ):
        sample_shots(y, 5, seed=0)
    with pytest.raises(SpecError, match="fewer than the 2 classes"):
        sample_fraction(y, 0.05, seed=0)


def test_bob_recipe_learns_and_is_deterministic_under_a_seed() -> None:
    x, y = blobs(400, classes=4)
    train, test = Features.in_memory(x[:300]), Features.in_memory(x[300:])
    # The paper's learning rate assumes ImageNet scale (batch 16384); LARS steps are relative
    # to the weight norm, so a 300-row toy set needs a larger base rate to move at all.
    recipe = BobRecipe(epochs=40, batch_size=64, warmup_epochs=4, base_lr=64)
    a = bob_scores(train_bob_probe(train, y[:300], n_outputs=4, seed=3, recipe=recipe), test)
    b = bob_scores(train_bob_probe(train, y[:300], n_outputs=4, seed=3, recipe=recipe), test)
    assert np.array_equal(a, b)
    assert accuracy(y[300:], a) >= 0.95
