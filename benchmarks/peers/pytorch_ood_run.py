"""Peer benchmark: fit and score one pytorch-ood detector on cached features; measure it.

Run with the pytorch-ood venv's python (see setup_pytorch_ood.sh); ``ood_detectors.py`` starts
one such process per detector::

    .venv-pytorch-ood/bin/python benchmarks/peers/pytorch_ood_run.py --detector knn \
        --data benchmarks/out/ood-250000x768x1000-s0 --out DIR --k 50

Inputs in --data (written by ood_detectors.py): ``train.npy`` / ``test.npy`` / ``ood.npy``
float16 (N, D) features, ``train_labels.npy`` int64, ``head_weight.npy`` float32 (K, D) and
``head_bias.npy`` float32 (K,). Every file is read with plain file reads (no memory map, so no
file pages count toward this process's RSS) and cast float16 -> float32 block by block.

What is timed: *load* (the ID training features into one float32 tensor, as pytorch-ood's
``fit_features(z, y)`` takes them), *fit* (``fit_features`` / ``fit_feature_maps``; nothing
for the logit detectors, which need no fit), *score* (reading each query chunk, the head's
``torch.nn.Linear`` for the logit detectors, and ``predict*``). Query chunks of --chunk rows
alternate ID, OOD, ID, OOD...; the scores so far (pytorch-ood's sign: higher = more OOD) are
saved after every chunk, so a run killed at a time limit still leaves the rows it scored.

The detectors, as pytorch-ood 0.4.0 implements them (``torch.no_grad()`` around everything):

* msp / maxlogit / energy: ``MaxSoftmax(head)``, ``MaxLogit(head)``, ``EnergyBased(head, t=1)``,
  scored by ``predict(x)`` (head on the features, float32).
* react: ``ReAct(backbone=identity, head=head, percentile=p/100, detector=EnergyBased.score)``;
  ``fit_feature_maps(z, y)`` takes ``np.percentile`` of *every* ID activation (exact).
* knn: ``KNN(None, k=k)`` (L2-normalized, scikit-learn ``NearestNeighbors(n_jobs=-1)``, exact).
* mahalanobis: ``Mahalanobis(None)``; rmd: ``RMD(None)`` (loops over the classes when scoring).
* vim: ``ViM(None, d=d, w=W, b=b)``.

Writes ``<detector>.json`` (times, RSS, threshold/alpha where the detector has one) and
``<detector>.progress.json`` after every chunk into --out; stdout gets the JSON result too.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DETECTORS = ("msp", "maxlogit", "energy", "react", "knn", "mahalanobis", "rmd", "vim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", choices=DETECTORS)
    p.add_argument("--data", type=Path, help="folder with the .npy inputs")
    p.add_argument("--out", type=Path, help="scores and results go here")
    p.add_argument("--k", type=int, default=50, help="knn: the k-th neighbour")
    p.add_argument("--percentile", type=float, default=90.0, help="react: percentile in 0-100")
    p.add_argument("--principal-dim", type=int, default=512, help="vim: d")
    p.add_argument("--chunk", type=int, default=5000, help="query rows per predict call")
    p.add_argument("--versions", action="store_true", help="print library versions and exit")
    return p.parse_args(argv)


# --- reading float16 .npy files without a memory map -----------------------------------------
def npy_info(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran or len(shape) > 2:
            raise ValueError(f"{path}: expected a C-ordered 1-D or 2-D array; got {shape}.")
        return shape, dtype, f.tell()


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-D .npy file, read with plain file reads."""
    (_, dim), dtype, offset = npy_info(path)
    with open(path, "rb") as f:
        f.seek(offset + start * dim * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=(stop - start) * dim).reshape(-1, dim)


def load_features(path: Path, *, block: int = 8192) -> torch.Tensor:
    """The whole file as one float32 tensor, cast block by block."""
    (n, dim), _, _ = npy_info(path)
    out = torch.empty((n, dim), dtype=torch.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        out[start:stop] = torch.from_numpy(read_rows(path, start, stop).astype(np.float32))
    return out


def rss_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


# --- the detectors ---------------------------------------------------------------------------
def create(args: argparse.Namespace, head: torch.nn.Linear) -> Any:
    from pytorch_ood import detector as d

    name = args.detector
    if name == "msp":
        return d.MaxSoftmax(head, t=1.0)
    if name == "maxlogit":
        return d.MaxLogit(head)
    if name == "energy":
        return d.EnergyBased(head, t=1.0)
    if name == "react":
        return d.ReAct(
            backbone=torch.nn.Identity(),
            head=head,
            percentile=args.percentile / 100,
            detector=d.EnergyBased.score,
        )
    if name == "knn":
        return d.KNN(None, k=args.k)
    if name == "mahalanobis":
        return d.Mahalanobis(None)
    if name == "rmd":
        return d.RMD(None)
    return d.ViM(None, d=args.principal_dim, w=head.weight, b=head.bias)


def fit(name: str, det: Any, z: torch.Tensor | None, y: torch.Tensor | None) -> None:
    if name in ("msp", "maxlogit", "energy"):
        return  # nothing to fit: the head is the model
    if name == "react":
        det.fit_feature_maps(z, y)
    else:
        det.fit_features(z, y)


def predict(name: str, det: Any, x: torch.Tensor) -> torch.Tensor:
    if name in ("msp", "maxlogit", "energy"):
        return det.predict(x)
    if name == "react":
        return det.predict_feature_maps(x)
    return det.predict_features(x)


def fitted_values(name: str, det: Any) -> dict[str, float]:
    if name == "react":
        return {"threshold": float(det.threshold)}
    if name == "vim":
        return {"alpha": float(det.alpha), "principal_dim": int(det.d)}
    return {}


def save_scores(out: Path, name: str, scores: dict[str, np.ndarray], done: dict[str, int]) -> None:
    for split, values in scores.items():
        tmp = out / f"{name}.{split}.tmp.npy"
        np.save(tmp, values[: done[split]])
        tmp.replace(out / f"{name}.{split}.npy")


def score_all(args: argparse.Namespace, det: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Score ID and OOD chunks alternately, saving scores and progress after each chunk."""
    paths = {"id": args.data / "test.npy", "ood": args.data / "ood.npy"}
    sizes = {split: npy_info(p)[0][0] for split, p in paths.items()}
    scores = {split: np.zeros(n) for split, n in sizes.items()}
    done = {split: 0 for split in sizes}
    seconds = 0.0
    while any(done[s] < sizes[s] for s in sizes):
        for split, path in paths.items():
            if done[split] >= sizes[split]:
                continue
            start, stop = done[split], min(sizes[split], done[split] + args.chunk)
            t0 = time.perf_counter()
            x = torch.from_numpy(read_rows(path, start, stop).astype(np.float32))
            scores[split][start:stop] = predict(args.detector, det, x).double().cpu().numpy()
            seconds += time.perf_counter() - t0
            done[split] = stop
            save_scores(args.out, args.detector, scores, done)
            progress = {**base, "score_seconds": seconds, "rows_scored": done}
            (args.out / f"{args.detector}.progress.json").write_text(json.dumps(progress))
    return {"score_seconds": seconds, "rows_scored": done}


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    weight = torch.from_numpy(np.load(args.data / "head_weight.npy"))
    bias = torch.from_numpy(np.load(args.data / "head_bias.npy"))
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head.requires_grad_(False)
    det = create(args, head)
    rss_start = rss_mb()["VmRSS"]
    z = y = None
    load_seconds = 0.0
    if args.detector not in ("msp", "maxlogit", "energy"):
        t0 = time.perf_counter()
        z = load_features(args.data / "train.npy")
        y = torch.from_numpy(np.load(args.data / "train_labels.npy"))
        load_seconds = time.perf_counter() - t0
    rss_loaded = rss_mb()["VmRSS"]
    base = {"load_seconds": load_seconds, "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded}
    progress = args.out / f"{args.detector}.progress.json"
    progress.write_text(json.dumps(base))
    t0 = time.perf_counter()
    fit(args.detector, det, z, y)
    base["fit_seconds"] = time.perf_counter() - t0
    progress.write_text(json.dumps(base))
    scored = score_all(args, det, base)
    result = {
        "side": "pytorch-ood",
        "detector": args.detector,
        **base,
        **scored,
        "vm_hwm_mb": rss_mb()["VmHWM"],
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fit_rows": 0 if z is None else len(z),
        "torch_threads": torch.get_num_threads(),
        **fitted_values(args.detector, det),
    }
    (args.out / f"{args.detector}.json").write_text(json.dumps(result, indent=1))
    return result


def versions() -> dict[str, str]:
    import pytorch_ood
    import scipy
    import sklearn

    return {
        "pytorch_ood": pytorch_ood.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.versions:
        print(json.dumps(versions()))
        return
    if not (args.detector and args.data and args.out):
        raise SystemExit("--detector, --data and --out are required (or --versions).")
    with torch.no_grad():
        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
