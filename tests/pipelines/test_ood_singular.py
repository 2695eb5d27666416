"""The ood stage on an ID set whose rows span fewer dimensions than the features have: the
Gaussian detectors are regularized, and every row's protocol says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bob_cache.pipelines.ood import OODConfig, ood
from bob_cache.stores.results import ResultsTable
from tests.conftest import write_feature_sets


def test_a_singular_fit_is_regularized_and_its_rows_say_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k, dim = 3, 40
    means = 3 * rng.normal(size=(k, dim))

    def rows(n: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % k
        return (means[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y

    noisy, _ = rows(90, noise=1.5)
    write_feature_sets(tmp_path / "s", {"train": rows(30), "val": rows(30), "test": rows(90)})
    write_feature_sets(tmp_path / "s", {"test": (noisy, -np.ones(90, np.int64))},
                       dataset="noisy", key="feat00000002")  # fmt: skip

    def run(**kw: object):
        return ood(OODConfig(
            store=str(tmp_path / "s"), backbone="model", dataset="toy", detect=("noisy",),
            detectors=("mahalanobis", "relative-mahalanobis", "msp"),
            results=str(tmp_path / "r"), **kw,
        ))  # fmt: skip

    report = run()
    notes = {d["detector"]: d.get("note", "") for d in report.detection}
    assert notes["msp"] == ""
    for name in ("mahalanobis", "relative-mahalanobis"):  # 30 rows, 3 classes: rank 27 of 40
        assert "regularized: singular covariance (rank 27 of 40 dims, 30 fit rows)" in notes[name]
    frame = ResultsTable.open(tmp_path / "r").read()
    auroc = frame[frame.metric == "auroc"].set_index("method")
    assert auroc.loc["relative-mahalanobis", "protocol"].endswith(notes["relative-mahalanobis"])
    assert "regularized" not in auroc.loc["msp", "protocol"]
    assert auroc.loc["relative-mahalanobis", "value"] > 0.5  # the pseudo-inverse's was below
    again = run(force=True)  # the stored state restores its note with it
    assert {d["detector"]: d.get("note", "") for d in again.detection} == notes
    assert {d["state"] for d in again.detection if d["detector"] != "msp"} == {"stored"}
