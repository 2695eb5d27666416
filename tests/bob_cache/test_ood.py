"""OOD detectors and metrics, each checked from outside: scikit-learn metrics, scipy distances,
a port of ViM's official benchmark, and known answers on synthetic feature clusters."""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors

from bob_cache.errors import BobCacheError, DetectorError, UnknownDetectorError
from bob_cache.ood import (
    LinearHead,
    create_detector,
    fpr_at_tpr,
    list_detectors,
    ood_metrics,
    restore_detector,
)

ALL = [
    "energy",
    "knn",
    "mahalanobis",
    "maxlogit",
    "msp",
    "react",
    "relative-mahalanobis",
    "vim",
]
# Logits are one float32 product reduced in float64 (LinearHead): ~1e-7 relative error.
F32_LOGITS = {"rtol": 1e-5, "atol": 1e-5}
READING = ["knn", "mahalanobis", "react", "relative-mahalanobis", "vim"]  # fit reads ID rows

# Synthetic "penultimate" features: non-negative (post-ReLU), 4 classes each lighting up its own
# 8 units out of the first 32, plus 16 units no class uses. The head averages a class's units.
K, UNITS, D = 4, 8, 48


def id_features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, K, n)
    x = np.abs(rng.normal(0, 0.5, (n, D)))
    for k in range(K):
        rows = labels == k
        x[np.ix_(rows, range(k * UNITS, (k + 1) * UNITS))] += 4 + rng.normal(
            0, 0.5, (rows.sum(), UNITS)
        )
    return x.astype(np.float32), labels.astype(np.int64)


def far_ood(rng: np.random.Generator, n: int) -> np.ndarray:
    """Far-shifted: weak on every class unit, strong on the units no class uses."""
    x = np.abs(rng.normal(0, 0.5, (n, D)))
    x[:, K * UNITS :] += 6
    return x.astype(np.float32)


def make_head() -> LinearHead:
    weight = np.zeros((K, D))
    for k in range(K):
        weight[k, k * UNITS : (k + 1) * UNITS] = 1 / UNITS
    return LinearHead(weight, np.array([0.1, -0.2, 0.3, 0.0]))


def blocks(x: np.ndarray, y: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def fit(name: str, x: np.ndarray, y: np.ndarray, *, size: int | None = None, **options):
    stream = blocks(x, y, size or len(x))
    return create_detector(name, **options).fit(stream, head=make_head())


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = id_features(rng, 1500)
    id_test, _ = id_features(rng, 800)
    same, _ = id_features(rng, 800)
    return {"x": x, "y": y, "id_test": id_test, "same": same, "far": far_ood(rng, 800)}


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, object]:
    return {name: fit(name, data["x"], data["y"]) for name in ALL}


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(1)
    ids = np.round(rng.normal(1, 1, 300), 1)  # rounded: many ties, also across ID/OOD
    oods = np.round(rng.normal(0, 1, 200), 1)
    is_id = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[ids, oods]
    m = ood_metrics(ids, oods)
    assert m.auroc == pytest.approx(roc_auc_score(is_id, scores), abs=1e-12)
    assert m.aupr_in == pytest.approx(average_precision_score(is_id, scores), abs=1e-12)
    assert m.aupr_out == pytest.approx(average_precision_score(1 - is_id, -scores), abs=1e-12)
    assert (m.n_id, m.n_ood, m.tpr) == (300, 200, 0.95)
    # FPR@95: the ceil(0.95 n_id)-th highest ID score is the threshold; OOD ties count
    t = np.sort(ids)[::-1][int(np.ceil(0.95 * 300)) - 1]
    assert m.threshold == t
    assert m.fpr_at_tpr == pytest.approx(np.mean(oods >= t), abs=1e-12)
    assert set(m.as_dict()) >= {"auroc", "aupr_in", "aupr_out", "fpr_at_tpr"}


def test_fpr_at_95_tpr_hand_computed_with_ties():
    # 20 ID scores: 95% of them is 19, the 19th highest ID score is 4 (tied with 3 others).
    ids = [10] * 5 + [8] * 5 + [6] * 5 + [4] * 4 + [2]
    oods = [9, 6, 4, 4, 3, 1, 0, 0, 0, 0]  # at or above 4: 9, 6, 4, 4
    assert fpr_at_tpr(ids, oods) == (0.4, 4.0)
    # 10 ID scores: TPR >= 0.95 needs all 10, so the threshold is the lowest ID score (1).
    assert fpr_at_tpr([5, 5, 4, 4, 4, 3, 3, 2, 1, 1], [1, 1, 0, 6]) == (0.75, 1.0)
    # every ID score tied: the one threshold keeps them all, and the tied OOD score counts
    assert fpr_at_tpr([3] * 20, [3, 2]) == (0.5, 3.0)
    assert fpr_at_tpr(ids, oods, tpr=0.5) == (0.1, 8.0)  # 10 of 20 ID at >= 8; OOD: only 9


def test_metrics_reject_bad_scores():
    with pytest.raises(DetectorError, match="non-empty 1-D"):
        ood_metrics([1.0, 2.0], [])
    with pytest.raises(DetectorError, match="NaN"):
        ood_metrics([1.0, np.nan], [0.0])
    with pytest.raises(DetectorError, match=r"tpr must be in \(0, 1\]"):
        fpr_at_tpr([1.0], [0.0], tpr=95)


# -- known answers ------------------------------------------------------------------------------


def test_registry_lists_every_detector():
    assert list_detectors() == ALL


@pytest.mark.parametrize("name", ALL)
def test_far_shift_is_detected(name, fitted, data):
    detector = fitted[name]
    id_scores, ood_scores = detector.score(data["id_test"]), detector.score(data["far"])
    assert id_scores.shape == (800,) and id_scores.dtype == np.float64
    assert ood_metrics(id_scores, ood_scores).auroc > 0.99
    assert id_scores.mean() > ood_scores.mean()  # the sign convention: higher = more ID


@pytest.mark.parametrize("name", ALL)
def test_identical_distributions_are_chance(name, fitted, data):
    detector = fitted[name]
    auroc = ood_metrics(detector.score(data["id_test"]), detector.score(data["same"])).auroc
    assert abs(auroc - 0.5) <= 0.05


# -- streaming, state ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mahalanobis", "relative-mahalanobis", "vim", "knn", "react"])
def test_streaming_fit_equals_one_block(name, data):
    x, y = data["x"], data["y"]
    whole = fit(name, x, y)
    if name == "vim":  # reads twice: a function returning a fresh generator each time
        stream = lambda: ((x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7))  # noqa: E731
    else:  # read once: a one-shot generator of 7-row blocks
        stream = ((x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7))
    streamed = create_detector(name).fit(stream, head=make_head())
    assert streamed.n_fit == whole.n_fit == len(x)
    query = np.r_[data["id_test"], data["far"]]
    np.testing.assert_allclose(streamed.score(query), whole.score(query), rtol=1e-5, atol=1e-5)


def test_react_percentile_exact_and_subsampled(data):
    x, y = data["x"], data["y"]
    exact = fit("react", x, y)
    assert exact.threshold == np.percentile(x.astype(np.float64), 90)
    # more elements than max_samples: a uniform subsample, independent of the block sizes
    one = fit("react", x, y, max_samples=5000)
    many = fit("react", x, y, size=13, max_samples=5000)
    assert one.threshold == many.threshold
    assert one.threshold == pytest.approx(exact.threshold, rel=0.05)
    assert one.threshold != exact.threshold
    other_seed = fit("react", x, y, max_samples=5000, seed=1)
    assert other_seed.threshold != one.threshold


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips(name, fitted, data):
    detector = fitted[name]
    state = detector.state()
    assert all(isinstance(v, np.ndarray | int | float) for v in state.values())
    buffer = io.BytesIO()  # as a store would keep it: arrays and 0-d arrays
    np.savez(buffer, **state)
    buffer.seek(0)
    restored = restore_detector(name, dict(np.load(buffer)))
    query = np.r_[data["id_test"][:50], data["far"][:50]]
    np.testing.assert_array_equal(restored.score(query), detector.score(query))
    assert restored.n_fit == detector.n_fit and restored.dim == D


# -- definitions against independent implementations -------------------------------------------


@pytest.fixture(scope="module")
def small():
    """A small problem: 12-dim features, 3 classes with their own covariance."""
    rng = np.random.default_rng(5)
    n, d, k = 300, 12, 3
    y = rng.integers(0, k, n)
    mixing = rng.normal(size=(d, d)) / 3
    x = rng.normal(size=(n, d)) @ mixing + 3 * rng.normal(size=(k, d))[y] + 5
    query = np.r_[x[:20] + rng.normal(0, 0.3, (20, d)), rng.normal(5, 3, (20, d))]
    weight, bias = rng.normal(size=(k, d)), rng.normal(size=k)
    return {"x": x.astype(np.float32), "y": y, "query": query, "weight": weight, "bias": bias}


def _fit_small(name, small, **options):
    stream = blocks(small["x"], small["y"], 64)
    return create_detector(name, **options).fit(stream, head=(small["weight"], small["bias"]))


def test_logit_detectors_match_scipy(small):
    q = small["query"]
    logits = q @ small["weight"].T + small["bias"]
    expected = {
        "msp": softmax(logits, axis=1).max(axis=1),
        "maxlogit": logits.max(axis=1),
        "energy": logsumexp(logits, axis=1),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(_fit_small(name, small).score(q), want, **F32_LOGITS)
    hot = _fit_small("energy", small, temperature=2.0).score(q)
    np.testing.assert_allclose(hot, 2 * logsumexp(logits / 2, axis=1), **F32_LOGITS)


def test_react_matches_definition(small):
    clip = np.percentile(small["x"].astype(np.float64), 90)
    clipped = np.minimum(small["query"], clip) @ small["weight"].T + small["bias"]
    got = _fit_small("react", small).score(small["query"])
    np.testing.assert_allclose(got, logsumexp(clipped, axis=1), **F32_LOGITS)


def test_knn_matches_sklearn(small):
    x, q = small["x"].astype(np.float64), small["query"]
    normalized = x / np.linalg.norm(x, axis=1, keepdims=True)
    nn = NearestNeighbors(n_neighbors=10).fit(normalized)
    dist, _ = nn.kneighbors(q / np.linalg.norm(q, axis=1, keepdims=True))
    got = _fit_small("knn", small, k=10).score(q)
    np.testing.assert_allclose(got, -(dist[:, 9] ** 2), atol=1e-5)


def _class_precision(x, y):
    means = np.stack([x[y == c].mean(axis=0) for c in range(y.max() + 1)])
    ec = EmpiricalCovariance(assume_centered=True).fit(x - means[y])
    return means, ec.precision_


def test_mahalanobis_matches_scipy(small):
    x, y, q = small["x"].astype(np.float64), small["y"], small["query"]
    means, vi = _class_precision(x, y)
    detector = _fit_small("mahalanobis", small)
    np.testing.assert_allclose(detector.precision, vi, rtol=1e-6, atol=1e-9)
    want = [-min(mahalanobis(row, m, vi) ** 2 for m in means) for row in q]
    np.testing.assert_allclose(detector.score(q), want, rtol=1e-7)


def test_relative_mahalanobis_matches_scipy(small):
    x, y, q = small["x"].astype(np.float64), small["y"], small["query"]
    means, vi = _class_precision(x, y)
    background = EmpiricalCovariance().fit(x)  # one Gaussian over all ID rows (MLE, /N)
    want = [
        -min(
            mahalanobis(row, m, vi) ** 2
            - mahalanobis(row, background.location_, background.precision_) ** 2
            for m in means
        )
        for row in q
    ]
    got = _fit_small("relative-mahalanobis", small).score(q)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)


def test_vim_matches_official_benchmark(small):
    """A port of haoqiwang/vim benchmark.py's ViM block (with DIM = 6 of 12)."""
    w, b = small["weight"], small["bias"]
    train, q = small["x"].astype(np.float64), small["query"]
    u = -np.matmul(np.linalg.pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True).fit(train - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[6:]]).T).real
    vlogit_train = np.linalg.norm(np.matmul(train - u, ns), axis=-1)
    alpha = (train @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    want = -np.linalg.norm(np.matmul(q - u, ns), axis=-1) * alpha + logsumexp(q @ w.T + b, axis=-1)
    detector = _fit_small("vim", small)
    assert detector.principal_dim == 6  # D // 2 for D <= 512
    assert detector.alpha == pytest.approx(alpha, rel=1e-6)
    np.testing.assert_allclose(detector.score(q), want, **F32_LOGITS)


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_detector_name_suggests():
    with pytest.raises(UnknownDetectorError) as info:
        create_detector("mahalanobs")
    assert isinstance(info.value, BobCacheError) and isinstance(info.value, KeyError)
    assert "Did you mean 'mahalanobis'" in str(info.value)
    assert "Expected one of: energy, knn, mahalanobis" in str(info.value)
    with pytest.raises(DetectorError, match=r"no option\(s\) \['kk'\]. Its options: k"):
        create_detector("knn", kk=3)
    with pytest.raises(DetectorError, match="integer >= 1"):
        create_detector("knn", k=0)


def test_wrong_dimension_is_rejected(fitted, data):
    wide = np.zeros((3, D + 1), dtype=np.float32)
    for name in ALL:
        with pytest.raises(DetectorError, match=f"have {D + 1} columns.*expects {D}-dim"):
            fitted[name].score(wide)
    x, y = data["x"], data["y"]
    changing = [(x[:10], y[:10]), (x[10:20, :-1], y[10:20])]
    with pytest.raises(DetectorError, match="Block 1's features have 47 columns"):
        create_detector("mahalanobis").fit(changing)
    with pytest.raises(DetectorError, match="same backbone"):
        create_detector("vim").fit(blocks(x[:, :-1], y, 100), head=make_head())


@pytest.mark.parametrize("name", READING)
def test_empty_stream_is_rejected(name):
    empty_block = [(np.zeros((0, D), np.float32), np.zeros(0, np.int64))]
    for stream in ([], empty_block):
        with pytest.raises(DetectorError, match="empty ID stream"):
            create_detector(name).fit(stream, head=make_head())


def test_fit_inputs_are_checked(data):
    x, y = data["x"], data["y"]
    one_shot = ((x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100))
    with pytest.raises(DetectorError, match="one-shot iterator"):
        create_detector("vim").fit(one_shot, head=make_head())
    with pytest.raises(DetectorError, match=r"pass head=\(weight, bias\)"):
        create_detector("energy").fit([])
    with pytest.raises(DetectorError, match="needs class labels"):
        create_detector("mahalanobis").fit([(x, None)])
    with pytest.raises(DetectorError, match="unlabeled"):
        create_detector("relative-mahalanobis").fit([(x, np.full(len(x), -1))])
    with pytest.raises(DetectorError, match=r"Lower k to at most 30 \(`--knn-k`, `knn_k` in"):
        create_detector("knn", k=50).fit(blocks(x[:30], y[:30], 10))
    every = create_detector("knn", k=50, at_most_rows=True).fit(blocks(x[:30], y[:30], 10))
    exact = create_detector("knn", k=30).fit(blocks(x[:30], y[:30], 10))
    assert every.k == 30 and np.array_equal(every.score(x[30:40]), exact.score(x[30:40]))
    with pytest.raises(DetectorError, match="not fitted"):
        create_detector("knn").score(x)
    with pytest.raises(DetectorError, match="lacks"):
        restore_detector("mahalanobis", {"dim": D, "n_fit": 1, "means": np.zeros((1, D))})


def test_knn_bank_on_zarr_scores_as_in_memory_across_bank_blocks(small, monkeypatch) -> None:
    """A bank appended to a Zarr array and searched in blocks gives the in-memory scores."""
    import zarr

    import bob_cache.ood.knn as knn_module
    from bob_cache.stores.detector_store import bank_sink

    x, y, q = small["x"], small["y"], small["query"]
    monkeypatch.setattr(knn_module, "BANK_BLOCK_ROWS", 37)  # many blocks, uneven last one
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    stream = [(x[i : i + 50], y[i : i + 50]) for i in range(0, len(x), 50)]
    on_disk = create_detector("knn", k=10, bank_sink=bank_sink(group)).fit(stream)
    in_memory = create_detector("knn", k=10).fit([(x, y)])
    assert isinstance(on_disk.bank_rows, zarr.Array) and group["bank"].shape == x.shape
    np.testing.assert_allclose(on_disk.score(q), in_memory.score(q), rtol=0, atol=1e-5)
    restored = restore_detector("knn", {**on_disk.state(), "dim": on_disk.dim, "n_fit": len(x)})
    np.testing.assert_allclose(restored.score(q), in_memory.score(q), rtol=0, atol=1e-5)


# -- singular fits: more dimensions than the ID rows span ---------------------------------------


@pytest.fixture(scope="module")
def singular():
    """40-dim features, 3 classes of 10 rows (30 rows span at most 27 within-class dims); the
    OOD rows are ID rows with added noise, as a corrupted copy of a dataset."""
    rng = np.random.default_rng(0)
    k, per, d = 3, 10, 40
    means = 3 * rng.normal(size=(k, d))
    y = np.repeat(np.arange(k), per)
    x = means[y] + rng.normal(size=(k * per, d))
    id_test = means[rng.integers(0, k, 200)] + rng.normal(size=(200, d))
    noisy = means[rng.integers(0, k, 200)] + rng.normal(size=(200, d)) * np.sqrt(2)
    return {"x": x, "y": y, "id_test": id_test, "noisy": noisy}


def _gaussians(x, y, ridge_of):
    """Independent numpy: class means, tied and background covariances (/N), precisions."""
    n, d = x.shape
    means = np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])
    centered = x - means[y]
    within = centered.T @ centered / n
    mu0 = x.mean(axis=0)
    background = (x - mu0).T @ (x - mu0) / n
    ridge = ridge_of(background, d)
    if ridge:
        return (
            means,
            np.linalg.inv(within + ridge * np.eye(d)),
            mu0,
            np.linalg.inv(background + ridge * np.eye(d)),
        )
    from scipy.linalg import pinvh

    return means, pinvh(within), mu0, pinvh(background)


def _definition(x, y, q, *, ridge_of):
    means, p, mu0, p0 = _gaussians(x, y, ridge_of)
    d_k = np.stack([np.einsum("ij,jk,ik->i", q - m, p, q - m) for m in means], axis=1)
    d_0 = np.einsum("ij,jk,ik->i", q - mu0, p0, q - mu0)
    return -d_k.min(axis=1), d_0 - d_k.min(axis=1)  # mahalanobis, relative-mahalanobis


def _auroc(id_scores, ood_scores):
    return ood_metrics(id_scores, ood_scores).auroc


def test_a_singular_gaussian_fit_gets_the_shared_ridge_of_its_definition(singular):
    """Ren et al.'s relative distance on a rank-deficient tied covariance: regularized with
    one ridge (1e-6 x the mean variance) on both covariances, as defined here in numpy."""
    x, y = singular["x"], singular["y"]
    q = np.r_[singular["id_test"], singular["noisy"]]
    want_md, want_rmd = _definition(x, y, q, ridge_of=lambda b, d: 1e-6 * np.trace(b) / d)
    for name, want in (("mahalanobis", want_md), ("relative-mahalanobis", want_rmd)):
        detector = create_detector(name).fit(blocks(x, y, 7))
        assert detector.rank == 27 and detector.ridge == pytest.approx(1e-6 * np.trace(
            np.cov(x.T, bias=True)) / 40, rel=1e-9)  # fmt: skip
        assert "regularized: singular covariance (rank 27 of 40 dims, 30 fit rows)" in detector.note
        np.testing.assert_allclose(detector.score(q), want, rtol=1e-6)
        restored = restore_detector(name, detector.state())
        assert restored.note == detector.note
        np.testing.assert_array_equal(restored.score(q), detector.score(q))
    # the pseudo-inverse alone (no ridge) ranks the noisy rows above the clean ones
    _, pinv_rmd = _definition(x, y, q, ridge_of=lambda b, d: 0.0)
    assert _auroc(pinv_rmd[:200], pinv_rmd[200:]) < 0.5
    fitted = create_detector("relative-mahalanobis").fit(blocks(x, y, 30))
    scores = fitted.score(q)
    assert _auroc(scores[:200], scores[200:]) > 0.6


def test_a_non_singular_gaussian_fit_is_unchanged(small):
    detector = _fit_small("relative-mahalanobis", small)
    assert (detector.rank, detector.ridge, detector.note) == (12, 0.0, "")


def test_vim_principal_dim_stays_below_what_the_id_rows_span(singular):
    """15 rows span at most 15 of 40 dims: the default rule's 20 leaves them no residual."""
    x, y = singular["x"][::2], singular["y"][::2]
    head = (np.random.default_rng(1).normal(size=(3, 40)), np.zeros(3))
    vim = create_detector("vim").fit(blocks(x, y, 15), head=head)
    assert (vim.rank, vim.principal_dim) == (15, 7)
    assert "principal_dim 7 = rank // 2 (the ID rows span 15 of 40 dims" in vim.note
    assert np.isfinite(vim.alpha) and restore_detector("vim", vim.state()).note == vim.note
    with pytest.raises(DetectorError, match=r"below the 15 dimensions the ID rows span.*"
                       r"Pass principal_dim < 15"):  # fmt: skip
        create_detector("vim", principal_dim=20).fit(blocks(x, y, 15), head=head)
    assert (
        create_detector("vim").fit(blocks(singular["x"], singular["y"], 30), head=head).note == ""
    )
