"""Gaussian OOD detectors on a singular fit: the demo's digits vs noisy digits, per backbone.

The demo's MobileNetV2 gives 1,280-dim features from 1,078 ID train rows, so the tied
covariance is singular (rank 1,068). For Mahalanobis and relative Mahalanobis (RMD) this
prints the detection AUROC (ID test vs the noisy copy's test split) of:

* ``pinvh``: the unregularized definition (``scipy.linalg.pinvh`` precisions, what
  bob-cache computed before the fix and OpenOOD's RMDS computes), in numpy here;
* ``bob-cache``: ``bob_cache.ood`` as it is now (a shared ridge when the fit is singular);
* ``numpy ridge``: the regularized definition, computed independently here;
* ``pytorch-ood``: pytorch-ood 0.4.0's ``Mahalanobis`` and ``RMD`` (1e-6 added to the diagonal
  of the unnormalized scatter matrices), in float64, when it can be imported (e.g.
  ``pip install --no-deps --target /tmp/ptood pytorch-ood==0.4.0`` and ``PYTHONPATH``).

A synthetic case (the unit test's: 40 dims from 3 classes of 10 rows) comes first.

AUROC comes from ``sklearn.metrics.roc_auc_score`` (ID positive, higher score = ID).

    make demo   # or any battle of suites/demo.yaml: it writes demo-store
    PYTHONPATH=/tmp/ptood python benchmarks/ood_singular.py --store demo-store
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import linalg
from sklearn.metrics import roc_auc_score

from bob_cache.ood import create_detector
from bob_cache.probes.features import load_rows
from bob_cache.stores import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="demo-store")
    parser.add_argument("--id", default="digits")
    parser.add_argument("--ood", default="digits-noise")
    parser.add_argument("--out", default="benchmarks/out/ood-singular.json")
    args = parser.parse_args()
    sets = {
        (fs.attrs["dataset"]["name"], fs.attrs["split"], fs.attrs["backbone"]["slug"]): fs
        for fs in open_store(args.store).feature_sets()
    }
    backbones = sorted({b for (d, s, b) in sets if d == args.id and s == "train"})
    results = [_synthetic()]
    print(json.dumps(results[0]))
    for backbone in backbones:
        x, y = _rows(sets[args.id, "train", backbone])
        id_test, _ = _rows(sets[args.id, "test", backbone])
        ood, _ = _rows(sets[args.ood, "test", backbone])
        row = {"backbone": backbone, "rows": len(x), "dim": x.shape[1]}
        row.update(_compare(x, y, id_test, ood))
        results.append(row)
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    _table(results)


def _synthetic() -> dict:
    """The test's case (tests/bob_cache/test_ood.py): 40 dims, 3 classes of 10 rows; the OOD
    rows are ID draws with added noise."""
    rng = np.random.default_rng(0)
    k, per, d = 3, 10, 40
    means = 3 * rng.normal(size=(k, d))
    y = np.repeat(np.arange(k), per)
    x = means[y] + rng.normal(size=(k * per, d))
    id_test = means[rng.integers(0, k, 200)] + rng.normal(size=(200, d))
    noisy = means[rng.integers(0, k, 200)] + rng.normal(size=(200, d)) * np.sqrt(2)
    return {"backbone": "synthetic (test case)", "rows": len(x), "dim": d,
            **_compare(x, y, id_test, noisy)}  # fmt: skip


def _rows(fs) -> tuple[np.ndarray, np.ndarray]:
    features, labels, _ = load_rows(fs, stream=False)
    return features.materialize().astype(np.float64), labels


def _auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores, ood_scores]))


def _compare(x, y, id_test, ood) -> dict:
    out: dict = {}
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centered = x - means[np.searchsorted(classes, y)]
    within = centered.T @ centered / len(x)
    mu0 = x.mean(axis=0)
    background = (x - mu0).T @ (x - mu0) / len(x)
    out["within_rank"] = int(np.linalg.matrix_rank(within))
    ridge = 1e-6 * np.trace(background) / x.shape[1]
    eye = np.eye(x.shape[1])
    for label, (p, p0) in {
        "pinvh": (linalg.pinvh(within), linalg.pinvh(background)),
        "numpy ridge": (
            np.linalg.inv(within + ridge * eye),
            np.linalg.inv(background + ridge * eye),
        ),
    }.items():
        for name, score in _scores(means, p, mu0, p0).items():
            out[f"{name} · {label}"] = _auroc(score(id_test), score(ood))
    for name in ("mahalanobis", "relative-mahalanobis"):
        detector = create_detector(name).fit([(x, y)])
        out[f"{name} · bob-cache"] = _auroc(detector.score(id_test), detector.score(ood))
        out[f"{name} · note"] = detector.note
    out.update(_pytorch_ood(x, y, id_test, ood))
    return out


def _scores(means, p, mu0, p0) -> dict:
    def d_min(q):
        return np.stack([np.einsum("ij,jk,ik->i", q - m, p, q - m) for m in means], 1).min(1)

    def d_0(q):
        return np.einsum("ij,jk,ik->i", q - mu0, p0, q - mu0)

    return {"mahalanobis": lambda q: -d_min(q), "relative-mahalanobis": lambda q: d_0(q) - d_min(q)}


def _pytorch_ood(x, y, id_test, ood) -> dict:
    try:
        import torch
        from pytorch_ood.detector import RMD, Mahalanobis
    except ImportError:
        return {}
    torch.set_default_dtype(torch.float64)
    out = {}
    z, labels = torch.from_numpy(x), torch.from_numpy(y)
    for name, cls in (("mahalanobis", Mahalanobis), ("relative-mahalanobis", RMD)):
        detector = cls(None).fit_features(z, labels)
        scores = [-detector.predict_features(torch.from_numpy(q)).numpy() for q in (id_test, ood)]
        out[f"{name} · pytorch-ood"] = _auroc(*scores)
    torch.set_default_dtype(torch.float32)
    return out


def _table(results: list[dict]) -> None:
    sides = ("pinvh", "bob-cache", "numpy ridge", "pytorch-ood")
    print("\n| backbone | rows × dims (rank) | detector | " + " | ".join(sides) + " |")
    print("|---|---|---|" + "---|" * len(sides))
    for r in results:
        for name in ("mahalanobis", "relative-mahalanobis"):
            cells = [f"{r[f'{name} · {s}']:.4f}" if f"{name} · {s}" in r else "—" for s in sides]
            shape = f"{r['rows']} × {r['dim']} ({r['within_rank']})"
            print(f"| {r['backbone']} | {shape} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
