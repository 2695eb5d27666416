"""Transferability estimators, each against an independent implementation of its paper, and
the agreement of estimates with measured outcomes against scipy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from bob_cache.errors import SpecError
from bob_cache.ood import LinearHead
from bob_cache.transfer import (
    ArrayRows,
    ClassMoments,
    TransferInputs,
    agreement_points,
    agreement_table,
    create_estimator,
    labelled_rows,
    list_estimators,
    plot_agreement,
)
from bob_cache.transfer.knn_loo import sample_positions


def draw(n: int = 400, dim: int = 24, classes: int = 5, *, seed: int = 0, relu: bool = True):
    """Overlapping classes of post-ReLU-like features (float32), labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = means[y] + rng.normal(0, 1.5, size=(n, dim))
    x = np.maximum(x, 0) if relu else x
    return x.astype(np.float32), y


EPS = 1e-5  # LogME's ε, as its authors' code (each_evidence) puts it in updates and evidence


def inputs(x: np.ndarray, y: np.ndarray, **kw: object) -> TransferInputs:
    return TransferInputs(labelled_rows(x, y), **kw)


# --- LogME -----------------------------------------------------------------------------------


def logme_direct(f: np.ndarray, y: np.ndarray) -> float:
    """The paper's evidence, straight from its definition (with the authors' code's ε in the
    updates and the fit terms): for each class, A = αI + βFᵀF and m = βA⁻¹Fᵀy by a dense
    solve, γ = D − α tr(A⁻¹) (no eigendecomposition), the α/β updates of Algorithm 1 run to
    1e-12, and the log evidence from slogdet(A) and ‖Fm − y‖² over rows."""
    f = f.astype(np.float64)
    n, d = f.shape
    ftf = f.T @ f
    values = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(10_000):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, f.T @ t)
            gamma = d - alpha * np.trace(np.linalg.inv(a))
            new_alpha = gamma / (m @ m + EPS)
            new_beta = (n - gamma) / (np.sum((f @ m - t) ** 2) + EPS)
            still = abs(new_alpha / new_beta - alpha / beta) > 1e-12 * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if not still:
                break
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ t)
        evidence = (
            n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * (np.sum((f @ m - t) ** 2) + EPS) - alpha / 2 * (m @ m + EPS)
            - np.linalg.slogdet(a)[1] / 2
        )  # fmt: skip
        values.append(evidence / n)
    return float(np.mean(values))


@pytest.mark.parametrize(("n", "dim"), [(400, 24), (60, 96)])  # n > D, and D > n
def test_logme_matches_the_papers_evidence_computed_directly(n: int, dim: int) -> None:
    x, y = draw(n, dim)
    got = create_estimator("logme", tol=1e-10).estimate(inputs(x, y)).value
    assert got == pytest.approx(logme_direct(x, y), rel=1e-9)


def test_logme_of_classes_the_features_fit_exactly_is_finite() -> None:
    """Fewer rows than dimensions and separable classes (a small photo folder's 180 rows of
    1,280-d MobileNetV2 features): without ε every class's β diverged and LogME was NaN."""
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(6), 8)
    x = np.maximum(rng.normal(0, 1, (6, 300))[y] * 4 + rng.normal(0, 0.3, (48, 300)), 0)
    estimate = create_estimator("logme", tol=1e-10).estimate(inputs(x.astype(np.float32), y))
    assert np.isfinite(estimate.value) and "NOT CONVERGED" not in estimate.protocol
    assert estimate.value == pytest.approx(logme_direct(x.astype(np.float32), y), rel=1e-7)


def test_logme_matches_scikit_learns_evidence_maximization() -> None:
    """BayesianRidge without intercept, with Gamma priors of rate ε/2 and shape 0 on both
    precisions, maximizes the same evidence (MacKay's updates with ε, its own code); its final
    log marginal likelihood / n per class."""
    from sklearn.linear_model import BayesianRidge

    x, y = draw(300, 16, classes=4, seed=3)
    per_class = []
    for k in range(4):
        model = BayesianRidge(
            fit_intercept=False, alpha_1=0, alpha_2=EPS / 2, lambda_1=0, lambda_2=EPS / 2,
            alpha_init=1,
            lambda_init=1, tol=1e-12, max_iter=10_000, compute_score=True,
        ).fit(x.astype(np.float64), (y == k).astype(np.float64))  # fmt: skip
        per_class.append(model.scores_[-1] / len(y))
    got = create_estimator("logme", tol=1e-10).estimate(inputs(x, y)).value
    assert got == pytest.approx(np.mean(per_class), rel=1e-9)


def test_logme_prefers_features_that_separate_the_classes() -> None:
    x, y = draw(500, 16, seed=1)
    noise = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    logme = create_estimator("logme")
    assert logme.estimate(inputs(x, y)).value > logme.estimate(inputs(noise, y)).value


# --- H-score --------------------------------------------------------------------------------


def hscore_direct(f: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """tr(Σ_α⁻¹ (1−α) cov(E[f|y])) with scikit-learn's LedoitWolf as Σ_α and numpy for the rest."""
    from sklearn.covariance import LedoitWolf

    f = f.astype(np.float64)
    lw = LedoitWolf().fit(f)
    g = np.zeros_like(f)
    for k in np.unique(y):
        g[y == k] = f[y == k].mean(axis=0)
    cov_g = np.cov(g, rowvar=False, bias=True)
    return float(np.trace(np.linalg.pinv(lw.covariance_) @ ((1 - lw.shrinkage_) * cov_g))), float(
        lw.shrinkage_
    )


@pytest.mark.parametrize(("n", "dim", "relu"), [(400, 24, True), (50, 80, False)])
def test_hscore_matches_ledoit_wolf_and_the_numpy_formula(n: int, dim: int, relu: bool) -> None:
    x, y = draw(n, dim, relu=relu)
    x = x + 20  # far from the origin: the one-pass moments must not lose the centring
    est = create_estimator("hscore").estimate(inputs(x, y))
    want, shrinkage = hscore_direct(x, y)
    assert est.metrics["shrinkage"] == pytest.approx(shrinkage, rel=1e-5, abs=1e-7)
    assert est.value == pytest.approx(want, rel=1e-5)


def test_moments_over_many_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import bob_cache.transfer.rows as rows_module

    x, y = draw(500, 12)
    whole = ClassMoments.accumulate(labelled_rows(x, y))
    monkeypatch.setattr(rows_module, "BLOCK_ROWS", 37)
    parts = ClassMoments.accumulate(labelled_rows(x, y))
    np.testing.assert_allclose(parts.covariance(), whole.covariance(), rtol=1e-5, atol=1e-6)
    assert parts.ledoit_wolf_shrinkage() == pytest.approx(whole.ledoit_wolf_shrinkage(), rel=1e-6)


def test_the_float32_pass_of_large_sets_stays_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FLOAT64_PRODUCTS the block products run in float32 (ImageNet size)."""
    import bob_cache.transfer.moments as moments

    x, y = draw(2000, 32, seed=6)
    x = x + 5
    monkeypatch.setattr(moments, "FLOAT64_PRODUCTS", 0)
    logme = create_estimator("logme").estimate(inputs(x, y)).value
    hscore = create_estimator("hscore").estimate(inputs(x, y)).value
    assert logme == pytest.approx(logme_direct(x, y), rel=3e-4)
    assert hscore == pytest.approx(hscore_direct(x, y)[0], rel=1e-4)


# --- LEEP and NCE --------------------------------------------------------------------------


def source_head(dim: int, z: int = 30, seed: int = 2) -> LinearHead:
    rng = np.random.default_rng(seed)
    return LinearHead(rng.normal(0, 0.3, size=(z, dim)), rng.normal(0, 0.1, size=z))


def leep_direct(x: np.ndarray, y: np.ndarray, head: LinearHead) -> float:
    """Nguyen et al. 2020, Eqs. 1-3, on the dense n × Z matrix of source probabilities."""
    theta = special.softmax(x.astype(np.float64) @ head.weight.T + head.bias, axis=1)
    classes = np.unique(y)
    joint = np.stack([theta[y == k].sum(axis=0) for k in classes]) / len(y)  # P(y, z)
    conditional = joint / joint.sum(axis=0)  # P(y | z)
    return float(np.mean(np.log((theta * conditional[np.searchsorted(classes, y)]).sum(axis=1))))


def test_leep_matches_the_papers_equations() -> None:
    x, y = draw(300, 20)
    head = source_head(20)
    got = create_estimator("leep").estimate(inputs(x, y, source=head)).value
    assert got == pytest.approx(leep_direct(x, y, head), rel=1e-5)
    assert got < 0


def test_nce_is_minus_the_conditional_entropy_from_mutual_information() -> None:
    """NCE = −H(Y|Z) = I(Y; Z) − H(Y): scikit-learn's mutual information and scipy's entropy."""
    from sklearn.metrics import mutual_info_score

    x, y = draw(300, 20)
    head = source_head(20)
    z = (x.astype(np.float64) @ head.weight.T + head.bias).argmax(axis=1)
    want = mutual_info_score(y, z) - stats.entropy(np.bincount(y))
    got = create_estimator("nce").estimate(inputs(x, y, source=head)).value
    assert got == pytest.approx(want, abs=1e-9)


def test_leep_and_nce_without_a_source_head_name_what_they_need() -> None:
    x, y = draw(50, 8)
    for name in ("leep", "nce"):
        with pytest.raises(SpecError, match="source-task classifier.*logme, hscore or knn-loo"):
            create_estimator(name).estimate(inputs(x, y))
    with pytest.raises(SpecError, match="8-d"):
        create_estimator("leep").estimate(inputs(x, y, source=source_head(9)))


# --- kNN leave-one-out ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_loo_matches_scikit_learn_leave_one_out(k: int) -> None:
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = draw(240, 16, seed=4)
    model = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    want = cross_val_score(model, x, y, cv=LeaveOneOut()).mean()
    got = create_estimator("knn-loo", k=k).estimate(inputs(x, y))
    assert got.metrics["top1"] == pytest.approx(want, abs=1e-12)
    assert 0.3 < want < 0.95  # the data makes neighbours disagree


def test_knn_loo_above_max_rows_scores_the_id_hash_sample_whatever_the_order() -> None:
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = draw(300, 16, seed=5)
    ids = np.array([f"img{i:04d}" for i in range(300)])
    keep = sample_positions(ids, 100)
    model = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")
    want = cross_val_score(model, x[keep], y[keep], cv=LeaveOneOut()).mean()
    estimator = create_estimator("knn-loo", k=5, max_rows=100)
    got = estimator.estimate(TransferInputs(labelled_rows(x, y, ids)))
    assert got.rows == 100 and got.value == pytest.approx(want)
    assert "100 of 300 labelled rows drawn by id hash" in got.protocol
    order = np.random.default_rng(0).permutation(300)
    shuffled = estimator.estimate(TransferInputs(labelled_rows(x[order], y[order], ids[order])))
    assert shuffled.value == pytest.approx(got.value)


def test_knn_loo_refuses_k_at_or_above_the_rows() -> None:
    x, y = draw(6, 4, classes=2)
    with pytest.raises(SpecError, match="k=6 needs at least 7 labelled rows.*smaller k"):
        create_estimator("knn-loo", k=6).estimate(inputs(x, y))


# --- Labels, streaming, registry --------------------------------------------------------------


def test_multi_label_unlabelled_and_one_class_sets_are_refused_with_the_fix() -> None:
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(SpecError, match="multi-label.*single-label source"):
        labelled_rows(x, np.zeros((4, 2), np.int64))
    with pytest.raises(SpecError, match="no labels.*class sub-folders"):
        labelled_rows(x, np.full(4, -1))
    with pytest.raises(SpecError, match="single class.*at least two"):
        labelled_rows(x, np.array([3, 3, -1, 3]))


def test_unlabelled_rows_are_left_out_and_counted() -> None:
    x, y = draw(100, 8)
    y = y.copy()
    y[:10] = -1
    rows = labelled_rows(x, y)
    assert rows.n == 90 and rows.dropped == 10
    est = create_estimator("hscore").estimate(TransferInputs(rows))
    assert est.value == pytest.approx(hscore_direct(x[10:], y[10:])[0], rel=1e-5)


class CountingRows(ArrayRows):
    """A reader that counts full passes over its rows."""

    passes: ClassVar[list[int]] = []

    def blocks(self):  # type: ignore[override]
        CountingRows.passes.append(len(self.array))
        yield from super().blocks()


def test_logme_and_hscore_share_one_pass_leep_and_nce_two() -> None:
    x, y = draw(200, 10)
    CountingRows.passes = []
    shared = TransferInputs(labelled_rows(CountingRows(x), y), source=source_head(10))
    for name in ("logme", "hscore"):
        create_estimator(name).estimate(shared)
    assert CountingRows.passes == [200]
    for name in ("nce", "leep"):
        create_estimator(name).estimate(shared)
    assert CountingRows.passes == [200, 200, 200]


def test_the_registry_lists_every_estimator_and_checks_options() -> None:
    assert set(list_estimators()) == {"logme", "hscore", "leep", "nce", "knn-loo"}
    with pytest.raises(SpecError, match="Did you mean 'logme'"):
        create_estimator("logmee")
    with pytest.raises(SpecError, match="no option.*'kk'.*k, max_rows"):
        create_estimator("knn-loo", kk=3)


# --- Agreement with the measured outcomes ---------------------------------------------------


def results_frame(estimates: dict[str, float], top1: dict[str, float], *,
                  method: str = "logme", dataset: str = "digits") -> pd.DataFrame:  # fmt: skip
    rows = []
    for backbone, value in estimates.items():
        key = f"key-{backbone}"
        rows.append(
            {
                "stage": "transferability",
                "dataset": dataset,
                "backbone": backbone,
                "feature_key": key,
                "method": method,
                "setting": "full",
                "metric": "top1" if method == "knn-loo" else method,
                "value": value,
                "seed": 0,
                "config_hash": f"t-{backbone}",
                "time": "2025-01-01T00:00:00",
            }
        )
        rows.append({"stage": "probe", "dataset": dataset, "backbone": backbone,
                     "feature_key": key, "method": "linear", "setting": "full", "metric": "top1",
                     "value": top1[backbone], "seed": 0, "config_hash": f"p-{backbone}",
                     "time": "2025-01-01T00:00:00"})  # fmt: skip
    return pd.DataFrame(rows)


ESTIMATES = {"a.in1k": 0.9, "b.in1k": 0.4, "c.in1k": 0.7, "d.in1k": 0.2, "e.random-s0": 0.8,
             "f.random-s0": 0.1, "g.in1k": 0.5, "h.in1k": 0.3}  # fmt: skip
TOP1 = {"a.in1k": 0.95, "b.in1k": 0.7, "c.in1k": 0.8, "d.in1k": 0.6, "e.random-s0": 0.3,
        "f.random-s0": 0.2, "g.in1k": 0.9, "h.in1k": 0.5}  # fmt: skip


def test_agreement_matches_scipy_and_its_bootstrap_interval() -> None:
    frame = results_frame(ESTIMATES, TOP1)
    table = agreement_table(frame, n_boot=4000, seed=0)
    (row,) = table.to_dict("records")
    x = np.array([ESTIMATES[b] for b in sorted(ESTIMATES)])
    y = np.array([TOP1[b] for b in sorted(TOP1)])
    assert row["n_backbones"] == 8 and row["outcome"] == "linear"
    assert row["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert row["weighted_tau"] == pytest.approx(stats.weightedtau(x, y).statistic)
    ci = stats.bootstrap(
        (x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
        method="percentile", n_resamples=4000, rng=np.random.default_rng(1),
    ).confidence_interval  # fmt: skip
    assert row["spearman_low"] == pytest.approx(ci.low, abs=0.06)
    assert row["spearman_high"] == pytest.approx(ci.high, abs=0.06)
    assert row["resamples"] > 3900


def test_spearman_p_is_scipys_exact_permutation_p() -> None:
    six = {k: ESTIMATES[k] for k in list(ESTIMATES)[:6]}
    (row,) = agreement_table(results_frame(six, TOP1), n_boot=50).to_dict("records")
    x = np.array([six[b] for b in sorted(six)])
    y = np.array([TOP1[b] for b in sorted(six)])
    exact = stats.permutation_test(  # all 6! pairings of x with y
        (x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
        n_resamples=math.inf,
    )  # fmt: skip
    assert row["spearman_p"] == pytest.approx(exact.pvalue)
    assert row["spearman_p"] != pytest.approx(stats.spearmanr(x, y).pvalue)  # not the t-test


def test_agreement_says_plainly_when_random_init_is_ranked_above_pretrained() -> None:
    table = agreement_table(results_frame(ESTIMATES, TOP1), n_boot=200)
    (row,) = table.to_dict("records")
    assert "FAILS" in row["verdict"]
    assert "ranks random-init e.random-s0 (0.8) above pretrained c.in1k (0.7)" in row["failures"]
    assert "f.random-s0" not in row["failures"]  # ranked last by both: no failure
    assert row["top_pick"] == "a.in1k" and row["top_pick_rank"] == 1


def test_agreement_with_few_backbones_is_not_assessed_and_three_say_so() -> None:
    two = {k: ESTIMATES[k] for k in list(ESTIMATES)[:2]}
    (row,) = agreement_table(results_frame(two, TOP1), n_boot=50).to_dict("records")
    assert np.isnan(row["spearman"]) and row["verdict"].startswith("not assessed: 2 backbone")
    three = {k: ESTIMATES[k] for k in ("a.in1k", "b.in1k", "c.in1k")}
    (row,) = agreement_table(results_frame(three, TOP1), n_boot=50).to_dict("records")
    assert row["spearman"] == pytest.approx(1.0) and row["spearman_p"] == pytest.approx(1 / 3)
    assert "only 3 backbones (the smallest exact p possible is 0.33)" in row["verdict"]
    assert "no reliable signal" in row["verdict"]  # a perfect ρ of 3 backbones is no order
    broken = results_frame({**three, "b.in1k": float("nan")}, TOP1)
    (row,) = agreement_table(broken, n_boot=50).to_dict("records")
    assert row["verdict"] == "not assessed: not finite for b.in1k"


def test_agreement_uses_the_newest_configuration_averages_seeds_and_pairs_finetuning() -> None:
    frame = results_frame(ESTIMATES, TOP1)
    extra = frame[(frame.stage == "transferability") & (frame.backbone == "a.in1k")].assign(
        config_hash="t-a-other", value=-5.0, time="2025-02-01T00:00:00"
    )
    finetune = pd.DataFrame([
        {"stage": "finetune", "dataset": "digits", "backbone": b, "feature_key": "ft",
         "method": "classification", "setting": "finetune", "metric": "top1",
         "value": top1 - 0.1 * seed, "seed": seed, "config_hash": f"f-{b}",
         "time": "2025-01-01", "task": "finetune-classification"}
        for b, top1 in TOP1.items() for seed in (0, 1)
    ])  # fmt: skip
    points = agreement_points(pd.concat([frame, extra, finetune], ignore_index=True))
    a = points[(points.backbone == "a.in1k") & (points.outcome == "linear")].iloc[0]
    assert a["estimate"] == -5.0 and "newest" in a["note"]
    ft = points[(points.outcome == "finetune") & (points.backbone == "b.in1k")].iloc[0]
    assert ft["outcome_value"] == pytest.approx(0.65)  # two seeds of one configuration
    assert set(points["outcome"]) == {"linear", "finetune"}
    assert points.loc[points.backbone == "e.random-s0", "random_init"].all()


def test_agreement_plot_is_written(tmp_path: Path) -> None:
    frame = results_frame(ESTIMATES, TOP1)
    frame = pd.concat([frame, results_frame(ESTIMATES, TOP1, method="knn-loo")])
    table = agreement_table(frame, n_boot=100)
    out = plot_agreement(frame, tmp_path / "agree.png", dataset="digits", table=table)
    assert out is not None and out.stat().st_size > 10_000
    assert plot_agreement(frame, tmp_path / "none.png", dataset="other") is None
