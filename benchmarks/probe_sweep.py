"""Linear probe: bob-cache's whole C sweep against scikit-learn, same data, same protocol.

Data: float16 features shaped like real post-ReLU embeddings (non-negative, heavy-tailed,
classes overlapping in a low-rank subspace), hard enough that scikit-learn's lbfgs uses
all of its default 100 iterations. Three contenders, each in a fresh process (peak memory =
max RSS of that process), each timed from the raw float16 arrays, standardization included:

* ``sklearn``: ``StandardScaler`` + one ``LogisticRegression()`` at its defaults on train+val.
* ``sklearn-cv``: ``StandardScaler`` + ``LogisticRegressionCV`` over the same C grid as
  bob-cache (``C = 1/(λ·n_train)`` for λ = 1 … 1e-6), choosing C on the same validation split
  (``PredefinedSplit``), warm-started along the path (scikit-learn's own), refit on train+val.
* ``bob``: ``bob_cache.probes.sweep`` (what ``bob-cache probe --method linear`` runs).

All are scored on the same test rows.

    python benchmarks/probe_sweep.py                        # 100k × 768, 100 classes
    python benchmarks/probe_sweep.py --rows 1381167 --val-test 50000,50000 --classes 1000 \
        --only bob                                          # ImageNet-1k: 1,281,167 train rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CONTENDERS = ["sklearn", "sklearn-cv", "bob"]


def make_data(
    rows: int, dim: int, classes: int, seed: int = 0, splits: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Features shaped like real post-ReLU embeddings; train/val/test 80/10/10, or ``splits``
    = (val rows, test rows) with the rest as train.

    Classes come in groups of five around shared "superclass" means in a 256-d latent space
    whose variance decays as a power law (a few dominant directions, discriminative detail in
    weak ones: an ill-conditioned problem); each image gets a gamma-distributed magnitude, a
    random 768-d projection, heavy-tailed noise, and a ReLU (about 60% zeros).
    """
    rng = np.random.default_rng(seed)
    rank = 256
    spectrum = (1.0 + np.arange(rank)) ** -1.0
    supers = rng.normal(0, 1.0, size=(classes // 5, rank))
    means = (np.repeat(supers, 5, axis=0) + rng.normal(0, 0.5, size=(classes, rank))) * spectrum
    mixing = rng.normal(0, 4 / np.sqrt(rank), size=(rank, dim)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    x = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 20000):
        yy = y[start : start + 20000]
        scale = rng.gamma(2.0, 0.5, size=(len(yy), 1)).astype(np.float32)
        latent = (means[yy] + rng.normal(0, 0.8, size=(len(yy), rank)) * spectrum).astype(
            np.float32
        )
        noise = rng.standard_t(3, size=(len(yy), dim)).astype(np.float32) * 0.1
        x[start : start + len(yy)] = np.maximum(scale * (latent @ mixing) + noise - 0.1, 0)
    a, b = (
        (int(0.8 * rows), int(0.9 * rows))
        if splits is None
        else (rows - sum(splits), rows - splits[1])
    )
    return {
        "x_train": x[:a],
        "y_train": y[:a],
        "x_val": x[a:b],
        "y_val": y[a:b],
        "x_test": x[b:],
        "y_test": y[b:],
    }


def data_path(args: argparse.Namespace) -> Path:
    splits = tuple(int(v) for v in args.val_test.split(",")) if args.val_test else None
    tag = f"-{splits[0]}-{splits[1]}" if splits else ""
    path = args.out / f"probe-{args.rows}x{args.dim}-{args.classes}{tag}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **make_data(args.rows, args.dim, args.classes, splits=splits))
    return path


def run_bob(data: dict[str, np.ndarray]) -> dict[str, Any]:
    from bob_cache.probes import Features, sweep

    def accuracy(y: np.ndarray, scores: np.ndarray) -> float:
        return float((scores.argmax(1) == y).mean())

    n_classes = int(data["y_train"].max()) + 1
    start = time.perf_counter()  # standardization (inside sweep) is timed too
    train, val = Features.in_memory(data["x_train"]), Features.in_memory(data["x_val"])
    result = sweep(train, data["y_train"], val, data["y_val"], n_outputs=n_classes, score=accuracy)
    seconds = time.perf_counter() - start
    test = accuracy(data["y_test"], result.model.scores(Features.in_memory(data["x_test"])))
    path = [
        {k: round(v, 6) if isinstance(v, float) else v for k, v in p.items()} for p in result.path
    ]
    return {
        "seconds": seconds,
        "test_top1": test,
        "C": result.C,
        "fits": len(path),
        "path": path,
        "final_iterations": result.model.iterations,
        "converged": result.model.converged,
    }


def run_sklearn(data: dict[str, np.ndarray], *, cv: bool) -> dict[str, Any]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit
    from sklearn.preprocessing import StandardScaler

    from bob_cache.probes.linear import COARSE

    n_train = len(data["y_train"])
    start = time.perf_counter()
    x = np.concatenate([data["x_train"], data["x_val"]]).astype(np.float32)
    y = np.concatenate([data["y_train"], data["y_val"]])
    scaler = StandardScaler().fit(x)
    x = scaler.transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if cv:
            fold = np.r_[np.full(n_train, -1), np.zeros(len(y) - n_train, dtype=np.int64)]
            Cs = sorted(1.0 / (lam * n_train) for lam in COARSE)
            model = LogisticRegressionCV(
                Cs=Cs, cv=PredefinedSplit(fold), solver="lbfgs", scoring="accuracy"
            )
        else:
            model = LogisticRegression(solver="lbfgs")
        model.fit(x, y)
    seconds = time.perf_counter() - start
    test = float(model.score(scaler.transform(data["x_test"].astype(np.float32)), data["y_test"]))
    out = {"seconds": seconds, "test_top1": test, "n_iter": np.asarray(model.n_iter_).tolist()}
    out["C"] = float(model.C_[0]) if cv else 1.0
    if cv:
        scores = np.ravel(next(iter(model.scores_.values())))
        out["val_scores"] = dict(zip(map(str, Cs), scores.tolist(), strict=True))
    return out


def child(which: str, path: Path) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress on stderr
    data = dict(np.load(path))
    out = run_bob(data) if which == "bob" else run_sklearn(data, cv=which == "sklearn-cv")
    out["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def data_parser(doc: str) -> argparse.ArgumentParser:
    """The options that pick a draw of :func:`make_data` (shared with probe_cli_scale.py)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--val-test", help="VAL,TEST rows (default: 10%% each of --rows)")
    p.add_argument("--out", type=Path, default=HERE / "out")
    return p


def main() -> None:
    p = data_parser(__doc__)
    p.add_argument("--only", choices=CONTENDERS, default=None)
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    path = data_path(args)
    report: dict[str, Any] = {
        "rows": args.rows,
        "dim": args.dim,
        "classes": args.classes,
        "cores": os.cpu_count(),
    }
    for which in [args.only] if args.only else CONTENDERS:
        cmd = [sys.executable, __file__, "--child", which, "--data", str(path)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        report[which] = json.loads(done.stdout)
        print(json.dumps({which: report[which]}), flush=True)
    for peer in CONTENDERS[:2]:
        if "bob" in report and peer in report:
            report[f"time_ratio_bob_over_{peer}"] = (
                report["bob"]["seconds"] / report[peer]["seconds"]
            )
            report[f"top1_gain_points_over_{peer}"] = 100 * (
                report["bob"]["test_top1"] - report[peer]["test_top1"]
            )
    name = f"probe_sweep-{path.stem.removeprefix('probe-')}.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("bob", "sklearn")}))


if __name__ == "__main__":
    main()
