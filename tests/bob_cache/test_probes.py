"""Probe algorithms: known answers, agreement with scikit-learn, streaming, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bob_cache.errors import SpecError
from bob_cache.probes import (
    BobRecipe,
    Features,
    Standardizer,
    bob_scores,
    cv_folds,
    fit_logistic,
    knn_scores,
    row_hashes,
    sample_fraction,
    sample_shots,
    sweep,
    sweep_cv,
    train_bob_probe,
)
from bob_cache.probes.features import load_rows
from bob_cache.probes.knn import split_ks
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
    assert result.path[0]["C"] == pytest.approx(1 / tr.n) and result.C > 0
    assert (result.train_rows, result.val_rows) == (tr.n, va.n)


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
        # a tight tolerance: the same objective has the same minimizer
        ours = fit_logistic(Features.in_memory(xtr), ytr, n_outputs=10, C=C, gtol=1e-6)
        std = Standardizer.fit(Features.in_memory(xtr))
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(std(xtr), ytr)
        ours_acc = accuracy(yte, ours.scores(Features.in_memory(xte)))
        ref_acc = ref.score(std(xte), yte)
        assert abs(ours_acc - ref_acc) <= 0.005, (C, ours_acc, ref_acc)
        np.testing.assert_allclose(
            ours.weight - ours.weight.mean(0), ref.coef_ - ref.coef_.mean(0), atol=5e-3
        )


def ill_conditioned(
    n: int = 3000, dim: int = 256, classes: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """A few loud directions carry most of the variance; the classes differ in quiet ones."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, classes, n)
    loud = rng.normal(size=(n, 4)) * np.array([40.0, 25.0, 15.0, 10.0])
    quiet = rng.normal(size=(n, 12)) + rng.normal(size=(classes, 12))[y]
    mixing = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:16]
    x = np.hstack([loud, quiet]) @ mixing + 0.05 * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def test_the_preconditioner_evens_out_loud_directions_and_keeps_the_minimizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from bob_cache.probes import objective as objective_module
    from bob_cache.probes.precondition import DAMPING, Preconditioner

    x, y = ill_conditioned()
    features = Features.in_memory(x)
    std = Standardizer.fit(features)
    pre = Preconditioner.fit(features, std, torch.device("cpu"))
    z = torch.from_numpy(std(x)).double()
    sigma = z.T @ z / len(z)
    m = pre.forward.double()
    torch.testing.assert_close(m @ pre.inverse.double(), torch.eye(256, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # fmt: skip
    before, after = torch.linalg.eigvalsh(sigma), torch.linalg.eigvalsh(m @ sigma @ m)
    delta = DAMPING * float(before.mean())
    assert float(after.max()) <= delta * 1.001 < float(before.max()) / 5  # loud ones evened out
    assert (
        float(after.max() / after.clamp_min(1e-3).min())
        < float(before.max() / before.clamp_min(1e-3).min()) / 5
    )

    def fit(identity: bool) -> tuple[object, int]:
        if identity:
            identity_map = Preconditioner(torch.eye(256), torch.eye(256))
            monkeypatch.setattr(objective_module.Objective, "preconditioner", identity_map)
        model = fit_logistic(features, y, n_outputs=6, C=1.0, gtol=1e-6)
        monkeypatch.undo()
        return model, model.iterations

    (plain, plain_iters), (ours, ours_iters) = fit(True), fit(False)
    assert ours_iters < plain_iters  # a shorter path ...
    ref = LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10).fit(std(x), y)
    expected = ref.decision_function(std(x))
    for model in (ours, plain):  # ... to the same minimizer (logits; softmax is shift-free)
        assert model.converged
        logits = model.scores(features)
        np.testing.assert_allclose(
            logits - logits.mean(1, keepdims=True),
            expected - expected.mean(1, keepdims=True), atol=5e-2,
        )  # fmt: skip


def test_an_evaluation_at_the_same_point_is_not_computed_twice() -> None:
    import torch

    from bob_cache.probes.objective import Objective, _Closure

    x, y = ill_conditioned(300)
    features = Features.in_memory(x)
    calls = []
    objective = Objective(features, y, Standardizer.fit(features), 6, torch.device("cpu"))

    def counted(w: torch.Tensor, b: torch.Tensor, lam: float) -> tuple:
        calls.append(1)
        return objective(w, b, lam)

    v, b = torch.zeros(6, 256), torch.zeros(6)
    opt = torch.optim.LBFGS([v, b])
    closure = _Closure(counted, objective.preconditioner, 1e-3, opt)
    first = closure()
    closure.largest_gradient()
    assert float(closure()) == float(first) and len(calls) == 1
    v += 0.1
    closure()
    assert len(calls) == 2


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
        answers.append((result.C, result.model.scores(te)))
    assert answers[0][0] == answers[1][0]  # the same λ
    assert np.array_equal(answers[0][1].argmax(1), answers[1][1].argmax(1))  # the same predictions
    np.testing.assert_allclose(answers[0][1], answers[1][1], atol=1e-2)  # float32 sums per shard


def test_loaded_rows_are_exactly_the_valid_rows_in_memory_and_streamed(tmp_path: Path) -> None:
    x, y = blobs(300, classes=3, dim=8)
    unreadable = [0, 5, 63, 64, 200, 299]  # across shard edges (64 rows a shard)
    write_feature_sets(
        tmp_path / "s", {"train": (x, y)}, shard_rows=64, unreadable={"train": unreadable}
    )
    (fs,) = open_store(tmp_path / "s").feature_sets()
    keep = np.setdiff1d(np.arange(300), unreadable)
    for stream in (False, True):
        rows, labels, ids = load_rows(fs, stream=stream)
        np.testing.assert_array_equal(rows.materialize(), x[keep])
        np.testing.assert_array_equal(labels, y[keep])
        assert list(ids) == [f"train/{i:05d}" for i in keep]


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


def test_knn_separable_is_perfect_and_a_k_above_the_train_size_is_refused() -> None:
    """Never capped: k=20 and k=200 on 20 rows would be one fit under two names."""
    x, y = blobs(200, classes=4)
    train, query = Features.in_memory(x[:20]), Features.in_memory(x[20:])
    scores = knn_scores(train, y[:20], query, n_outputs=4, ks=(10, 20))
    assert accuracy(y[20:], scores[10]) == 1.0 and scores[20].shape == (180, 4)
    with pytest.raises(SpecError, match=r"k=200 is above the 20 training rows.*at most"):
        knn_scores(train, y[:20], query, n_outputs=4, ks=(10, 200))
    assert split_ks((5, 20, 21, 200), 20) == ((5, 20), (21, 200))


def test_few_shot_subsets_are_exact_and_deterministic() -> None:
    y = np.repeat(np.arange(5), 20)
    ids = np.array([f"img{i:03d}.jpg" for i in range(100)])
    a, b = sample_shots(y, ids, 3, seed=7), sample_shots(y, ids, 3, seed=7)
    assert np.array_equal(a, b) and np.bincount(y[a]).tolist() == [3] * 5
    assert not np.array_equal(a, sample_shots(y, ids, 3, seed=8))
    frac = sample_fraction(y, ids, 0.1, seed=0)
    assert len(frac) == 10 and np.bincount(y[frac]).tolist() == [2] * 5
    assert np.array_equal(frac, sample_fraction(y, ids, 0.1, seed=0))
    # floor per class: never more rows than the fraction names
    assert np.bincount(y[sample_fraction(y, ids, 0.29, seed=0)]).tolist() == [5] * 5


def test_subsets_follow_the_ids_not_the_row_order_or_other_rows() -> None:
    """Two backbones whose invalid rows differ still get exactly the same images."""
    y = np.repeat(np.arange(4), 30)
    ids = np.array([f"c{c}/img{i:03d}.png" for i, c in enumerate(y)])
    chosen = set(ids[sample_shots(y, ids, 5, seed=3)])
    # another backbone: rows shuffled, and a few images it failed on (not among the chosen)
    shuffled = np.random.default_rng(0).permutation(len(y))
    order = np.array([i for i in shuffled if ids[i] in chosen or i % 7])
    assert set(ids[order][sample_shots(y[order], ids[order], 5, seed=3)]) == chosen
    frac = set(ids[sample_fraction(y, ids, 0.2, seed=1)])
    assert set(ids[shuffled][sample_fraction(y[shuffled], ids[shuffled], 0.2, seed=1)]) == frac
    # the hash is public: anyone can redraw a subset from the ids
    digest = hashlib.blake2b(b"shots:3:" + ids[0].encode(), digest_size=8).digest()
    expected = int.from_bytes(digest, "big")
    assert int(row_hashes(ids[:1], "shots:3")[0]) == expected


def test_cv_folds_are_stratified_and_none_for_a_single_row_class() -> None:
    y = np.repeat(np.arange(3), [4, 7, 9])
    ids = [str(i) for i in range(len(y))]
    folds = cv_folds(y, ids, seed=0)
    assert folds.max() == 3  # min(5, smallest class count 4) folds
    for f in range(4):
        assert set(y[folds == f]) == {0, 1, 2}  # every fold holds every class
    assert cv_folds(np.array([0, 0, 1]), ["a", "b", "c"], seed=0) is None


def test_few_shot_errors_name_the_class_and_the_fix() -> None:
    y = np.array([0] * 10 + [1] * 2)
    ids = [str(i) for i in range(12)]
    with pytest.raises(
        SpecError, match="5-shot needs 5 training images per class, but class 1 has 2"
    ):
        sample_shots(y, ids, 5, seed=0)
    with pytest.raises(SpecError, match=r"leaves 1 class\(es\) with no training image: class 1"):
        sample_fraction(y, ids, 0.3, seed=0)


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


def test_bob_recipe_drops_a_last_batch_of_one_row_and_trains_on_a_small_set() -> None:
    """65 rows in batches of 64 left a last batch of one row, and BatchNorm raised; MAE's
    loader drops it. A set smaller than a batch is one batch; one row is a clear error."""
    x, y = blobs(200, classes=2, dim=8)
    recipe = BobRecipe(epochs=3, batch_size=64, warmup_epochs=1)
    for n in (65, 129, 30, 2):
        probe = train_bob_probe(
            Features.in_memory(x[:n]), y[:n], n_outputs=2, seed=0, recipe=recipe
        )
        assert np.isfinite(bob_scores(probe, Features.in_memory(x[n:]))).all()
    import torch

    from bob_cache.probes.bob_recipe import _loss

    logits = torch.ones(4, 2, requires_grad=True)  # a multi-label batch with no known entry
    _loss(logits, -torch.ones(4, 2)).backward()
    assert torch.equal(logits.grad, torch.zeros(4, 2))  # no step, not NaN
    with pytest.raises(SpecError, match="needs at least 2 training rows.*--recipe sweep"):
        train_bob_probe(Features.in_memory(x[:1]), y[:1], n_outputs=2, seed=0, recipe=recipe)


def _digits_split() -> tuple:
    digits = load_digits()
    return train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.3, random_state=0
    )


def test_few_shot_cv_agrees_with_sklearn_on_the_same_subset_and_folds() -> None:
    """The k-shot probe sees only its subset, and matches LogisticRegressionCV on it."""
    xtr, xte, ytr, yte = _digits_split()
    ids = np.array([f"digit{i:04d}" for i in range(len(ytr))])
    for shots in (5, 10):
        rows = sample_shots(ytr, ids, shots, seed=0)
        folds = cv_folds(ytr[rows], ids[rows], seed=0)
        sub = Features.in_memory(xtr[rows])
        ours = sweep_cv(sub, ytr[rows], folds, n_outputs=10, score=accuracy)
        assert (ours.train_rows, ours.val_rows) == (10 * shots, 0)
        assert "5-fold cross-validation inside the subset" in ours.protocol
        ours_acc = accuracy(yte, ours.model.scores(Features.in_memory(xte)))
        grid = sorted(p["C"] for p in ours.path if p["stage"] == "cv0")
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=1e-8))
        ref = GridSearchCV(pipe, {"logisticregression__C": grid}, cv=PredefinedSplit(folds)).fit(
            xtr[rows], ytr[rows]
        )  # standardized inside each fold, as ours is
        assert ref.best_params_["logisticregression__C"] == pytest.approx(ours.C)
        assert abs(ref.score(xte, yte) - ours_acc) <= 0.003, (shots, ours_acc)


def test_one_shot_falls_back_to_a_fixed_C_and_says_so() -> None:
    xtr, xte, ytr, yte = _digits_split()
    ids = np.array([f"digit{i:04d}" for i in range(len(ytr))])
    rows = sample_shots(ytr, ids, 1, seed=0)
    assert cv_folds(ytr[rows], ids[rows], seed=0) is None
    ours = sweep_cv(Features.in_memory(xtr[rows]), ytr[rows], None, n_outputs=10, score=accuracy)
    assert ours.C == 1.0 and "fixed C=1" in ours.protocol and ours.train_rows == 10
    std = Standardizer.fit(Features.in_memory(xtr[rows]))
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(std(xtr[rows]), ytr[rows])
    assert accuracy(yte, ours.model.scores(Features.in_memory(xte))) == pytest.approx(
        ref.score(std(xte), yte), abs=0.003
    )


def test_a_chunk_cut_short_by_its_evaluation_cap_is_not_taken_for_convergence() -> None:
    """L-BFGS stops a chunk early when its line searches use up the chunk's evaluations; the
    fit goes on until the gradient test passes instead of reporting a stalled fit as done."""
    import torch

    from bob_cache.probes.objective import Objective, Stop, _Closure, _run

    x, y = ill_conditioned(300)
    features = Features.in_memory(x)
    objective = Objective(features, y, Standardizer.fit(features), 6, torch.device("cpu"))
    v, b = torch.zeros(6, 256), torch.zeros(6)
    # max_eval=2: every chunk is capped after a single line-search evaluation
    opt = torch.optim.LBFGS(
        [v, b], lr=1, max_iter=5, max_eval=2, history_size=10, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-12,
    )  # fmt: skip
    closure = _Closure(objective, objective.preconditioner, 1e-3, opt)
    assert _run(opt, closure, Stop(1e-4), 2000, None)
    assert closure.largest_gradient()[0] <= 1e-4  # (it stopped at 0.09 when taken for done)
    # Asked for a zero gradient, it stops once line searches find no decrease that float32
    # resolves, long before 2000 iterations of capped chunks: a stall, reported as not done.
    before = int(opt.state[v]["n_iter"])
    assert not _run(opt, closure, Stop(0.0), 2000, None)
    assert int(opt.state[v]["n_iter"]) - before < 100


def test_a_float32_stall_is_reported_as_not_converged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On digits, float32 cannot reach the small-problem tolerance (1e-6): L-BFGS stops when
    the loss no longer decreases, and the fit says converged=False, in the model, the log and
    the sweep's protocol. The reported model of a small problem is fitted in float64, which
    gets there."""
    import torch

    from bob_cache.probes import linear, objective

    xtr, _, ytr, _ = _digits_split()
    features = Features.in_memory(xtr)
    assert fit_logistic(features, ytr, n_outputs=10, C=0.05, gtol=1e-7).converged  # float64
    monkeypatch.setattr(linear, "final_dtype", lambda *a: torch.float32)
    with caplog.at_level("WARNING", logger="bob_cache.probes.linear"):
        model = fit_logistic(features, ytr, n_outputs=10, C=0.05, gtol=1e-7)
    assert not model.converged and model.iterations < objective.MAX_ITER
    assert "before converging" in caplog.text
    tr, va = Features.in_memory(xtr[:900]), Features.in_memory(xtr[900:])
    result = sweep(tr, ytr[:900], va, ytr[900:], n_outputs=10, score=accuracy)
    assert not result.model.converged and "NOT CONVERGED" in result.protocol


def test_reported_model_is_the_converged_fit_at_the_chosen_C() -> None:
    """Not early-stopped: within 0.3 points of scikit-learn run to convergence at that C."""
    xtr, xte, ytr, yte = _digits_split()
    tr, va = Features.in_memory(xtr[:900]), Features.in_memory(xtr[900:])
    result = sweep(tr, ytr[:900], va, ytr[900:], n_outputs=10, score=accuracy)
    assert result.model.converged and result.train_rows + result.val_rows == len(ytr)
    std = Standardizer.fit(Features.in_memory(xtr))  # refit rows: train + val
    ref = LogisticRegression(C=result.C, max_iter=10000, tol=1e-10).fit(std(xtr), ytr)
    ours = accuracy(yte, result.model.scores(Features.in_memory(xte)))
    assert abs(ours - ref.score(std(xte), yte)) <= 0.003


def test_the_large_problem_stopping_rule_also_gives_the_converged_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above SMALL_WORK the fit stops at a gradient of 1e-4 or when the watched predictions
    settle; forced onto digits, it still lands within 0.3 points of scikit-learn converged."""
    from bob_cache.probes import objective as objective_module

    monkeypatch.setattr(objective_module, "SMALL_WORK", 0)
    stops: list[object] = []
    rule = objective_module.final_stop
    monkeypatch.setattr(
        "bob_cache.probes.linear.final_stop", lambda *a: stops.append(rule(*a)) or stops[-1]
    )
    xtr, xte, ytr, yte = _digits_split()
    std = Standardizer.fit(Features.in_memory(xtr))
    for C in (0.003, 0.05, 1.0):
        model = fit_logistic(Features.in_memory(xtr), ytr, n_outputs=10, C=C)
        assert stops[-1].watch is not None and stops[-1].gtol == objective_module.FINAL_GTOL
        ref = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(std(xtr), ytr)
        ours = accuracy(yte, model.scores(Features.in_memory(xte)))
        assert abs(ours - ref.score(std(xte), yte)) <= 0.003, C


def _digits_multilabel() -> tuple[np.ndarray, np.ndarray]:
    """Digits features with four yes/no labels (even, ≥ 5, has a loop, is a one), a quarter of
    the entries unknown (-1) and one label mostly unknown."""
    digits = load_digits()
    x, t = digits.data[:700].astype(np.float32), digits.target[:700]
    y = np.stack([t % 2 == 0, t >= 5, np.isin(t, (0, 6, 8, 9)), t == 1], axis=1).astype(np.int64)
    rng = np.random.default_rng(0)
    y[rng.random(y.shape) < 0.25] = -1
    y[rng.random(len(y)) < 0.6, 2] = -1
    return x, y


def test_multilabel_probe_is_one_vs_rest_logistic_regression_on_known_labels() -> None:
    """At the same C, each label's weights are scikit-learn's LogisticRegression fitted on that
    label's known rows (after the same standardization): C·Σ known losses + ½‖w‖² per label."""
    x, y = _digits_multilabel()
    features = Features.in_memory(x)
    z = Standardizer.fit(features)(x).astype(np.float64)  # float32 input: sklearn stalls too
    for C in (0.01, 0.3):
        ours = fit_logistic(features, y, n_outputs=4, C=C, gtol=1e-7)
        assert ours.converged
        for label in range(4):
            known = y[:, label] >= 0
            ref = LogisticRegression(C=C, max_iter=10_000, tol=1e-10)
            ref.fit(z[known], y[known, label])
            np.testing.assert_allclose(ours.weight[label], ref.coef_[0], atol=1e-4, rtol=0)
            assert ours.bias[label] == pytest.approx(ref.intercept_[0], abs=1e-4)
            np.testing.assert_allclose(
                ours.scores(features)[:, label], ref.decision_function(z), atol=1e-3, rtol=0
            )
