"""Post-hoc OOD detectors side by side: bob-cache (``bob_cache.ood``) against pytorch-ood.

Both sides fit and score on the same cached features and the same linear head, in one run:

* **Data**: synthetic "pooled post-activation" features, deterministic in ``--seed``. Latent
  ``g = m0 + mu_c + e`` with a positive base ``m0``, class means ``mu_c`` at radius ``R`` in random
  directions and ``e ~ N(0, S)`` under one shared random covariance ``S`` (random rotation,
  eigenvalues ~ 1/i, mean variance 1); the feature is ``max(g, 0)`` (about 30 % zeros). ID train
  and ID test draw from ``--classes`` classes; OOD rows draw from as many *novel* classes at radius
  ``0.67 R`` with 8 random units per row raised by ``2 |N(0, 1)|`` (the large, sparse activations
  ReAct clips). Stored as float16 ``.npy`` (as bob's feature store keeps features); both sides
  read the same float16 values and cast them to float32.
* **Head** (given to both, float32): a shrunk linear discriminant (class means and the tied
  within-class covariance of the float16 training rows, shrinkage 0.1 toward a scaled
  identity), centered over the classes (``sum_k w_k = 0``, as softmax regression from zero
  init keeps it) and temperature-scaled by the NLL-optimal ``T`` on 20,000 training rows.
* **Protocol**: every detector fits on *all* ID training rows (and their labels / the head)
  and scores the ID test rows (positive class) and the OOD rows. Each detector of each side
  runs in a fresh child process (bob's here with this venv's python, pytorch-ood's with
  ``benchmarks/peers/pytorch_ood_run.py`` in its own venv, see
  ``benchmarks/peers/setup_pytorch_ood.sh``); its peak RSS is the child's own ``VmHWM``
  (reported at exit, polled from ``/proc`` while it runs), so one detector's memory never hides
  another's (``ru_maxrss`` would carry this parent's peak across the fork and exec). Both
  sides fit from the float16 file read in blocks of ``--block`` rows (bob streams them,
  pytorch-ood gets one float32 tensor: its *load* is reported apart from its fit) and score
  query chunks of ``--chunk`` rows, ID and OOD alternately, saving scores after each chunk, so
  a child killed at ``--timeout`` still leaves the rows it scored. A pair whose children both
  finish within ``--repeat-below`` seconds runs ``--repeats`` times (bob, pytorch-ood, bob,
  ...; the machine is shared, so single short timings swing): the table gives the median time
  and the highest peak RSS. Metrics for both sides come from ``bob_cache.ood.ood_metrics``
  (pytorch-ood's scores negated: it scores higher = more OOD), cross-checked with
  ``sklearn.metrics.roc_auc_score``; where a side timed out, both sides' AUROC is also taken
  on the rows both scored.

    python benchmarks/ood_detectors.py --rows 20000 --dim 128 --classes 100 --repeats 1  # ~70 s
    flock /tmp/bench.lock nice -n 5 python benchmarks/ood_detectors.py        # 250k x 768 x 1000

Data and per-child scores go under ``benchmarks/out/ood-<rows>x<dim>x<classes>-s<seed>/``;
finished children are kept in its ``runs.json`` and skipped by the same command (``--fresh``
reruns those of the listed ``--detectors``). Results: ``--out`` (default
``benchmarks/out/ood-detectors.json``, plus ``.md`` with the table and ``.png`` with the figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_RUNNER = HERE / "peers" / "pytorch_ood_run.py"
# bob's detector name -> (pytorch-ood runner name, pytorch-ood class)
PAIRS = {
    "msp": ("msp", "MaxSoftmax"),
    "maxlogit": ("maxlogit", "MaxLogit"),
    "energy": ("energy", "EnergyBased"),
    "react": ("react", "ReAct + EnergyBased.score"),
    "knn": ("knn", "KNN"),
    "mahalanobis": ("mahalanobis", "Mahalanobis"),
    "relative-mahalanobis": ("rmd", "RMD"),
    "vim": ("vim", "ViM"),
}
SPLITS = ("id", "ood")
GENERATOR = "rectified-gaussians-1"  # bump when the data or head recipe changes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=250_000, help="ID training rows")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--test-rows", type=int, help="ID test rows (default rows/5)")
    p.add_argument("--ood-rows", type=int, help="OOD rows (default rows/5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detectors", default=",".join(PAIRS), help="comma-separated bob names")
    p.add_argument("--k", type=int, default=50, help="knn: the k-th neighbour (both sides)")
    p.add_argument("--percentile", type=float, default=90.0, help="react percentile (0-100)")
    p.add_argument("--principal-dim", type=int, help="vim d (default: bob's rule for --dim)")
    p.add_argument("--block", type=int, default=8192, help="ID rows per fit block")
    p.add_argument("--chunk", type=int, default=5000, help="query rows per score call")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    p.add_argument("--repeats", type=int, default=3, help="runs of each short detector pair")
    p.add_argument(
        "--repeat-below", type=float, default=60.0, help="a pair is short if both run < this (s)"
    )
    p.add_argument("--peer-python", type=Path, default=ROOT / ".venv-pytorch-ood/bin/python")
    p.add_argument("--out", type=Path, default=HERE / "out" / "ood-detectors.json")
    p.add_argument("--fresh", action="store_true", help="rerun the listed detectors' children")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one bob detector
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.test_rows = args.test_rows or args.rows // 5
    args.ood_rows = args.ood_rows or args.rows // 5
    return args


# --- float16 .npy files, read without a memory map --------------------------------------------
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
    """Rows ``[start, stop)`` of a 2-D .npy file (plain reads: no mapped pages in the RSS)."""
    (_, dim), dtype, offset = npy_info(path)
    with open(path, "rb") as f:
        f.seek(offset + start * dim * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=(stop - start) * dim).reshape(-1, dim)


# --- synthetic features -----------------------------------------------------------------------
class FeatureModel:
    """Class-conditional Gaussians under one shared covariance, rectified (see module doc)."""

    def __init__(self, dim: int, classes: int, seed: int, *, radius: float = 3.0) -> None:
        seeds = np.random.SeedSequence(seed).spawn(4)
        rng = np.random.default_rng(seeds[0])
        self.streams = {n: np.random.default_rng(s) for n, s in zip(SPLITS, seeds[2:], strict=True)}
        self.streams["train"] = np.random.default_rng(seeds[1])
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        spectrum = 1.0 / (1.0 + np.arange(dim))
        spectrum *= dim / spectrum.sum()  # mean variance 1
        self.factor = (rotation * np.sqrt(spectrum)).T  # e @ factor ~ N(0, S)
        base = 0.5 * rng.uniform(0.5, 1.5, dim)
        directions = rng.standard_normal((2 * classes, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.means = {
            "id": base + radius * directions[:classes],
            "ood": base + (2 / 3) * radius * directions[classes:],
        }

    def draw(self, labels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
        """float16 features of ``labels`` (ID or novel classes); OOD rows get the spikes."""
        n, dim = len(labels), len(self.factor)
        x = self.means[kind][labels] + rng.standard_normal((n, dim)) @ self.factor
        if kind == "ood":
            units = rng.integers(0, dim, (n, 8))
            spikes = 2.0 * np.abs(rng.standard_normal((n, 8)))
            np.add.at(x, (np.arange(n)[:, None], units), spikes)
        return np.maximum(x, 0).astype(np.float16)


def write_split(model: FeatureModel, path: Path, labels: np.ndarray, kind: str, rng) -> None:
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float16, shape=(len(labels), len(model.factor))
    )
    for start in range(0, len(labels), 16384):
        out[start : start + 16384] = model.draw(labels[start : start + 16384], kind, rng)
    out.flush()
    del out


def generate(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Write train/test/ood features, labels and the head; keep them if already written."""
    meta_path = workdir / "meta.json"
    settings = {
        k: getattr(args, k) for k in ("rows", "dim", "classes", "test_rows", "ood_rows", "seed")
    }
    settings["generator"] = GENERATOR
    if meta_path.exists() and json.loads(meta_path.read_text())["settings"] == settings:
        return json.loads(meta_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = FeatureModel(args.dim, args.classes, args.seed)
    train_rng = model.streams["train"]
    labels = train_rng.permutation(np.arange(args.rows) % args.classes)
    np.save(workdir / "train_labels.npy", labels.astype(np.int64))
    write_split(model, workdir / "train.npy", labels, "id", train_rng)
    sizes = {"id": args.test_rows, "ood": args.ood_rows}
    for kind, name in (("id", "test"), ("ood", "ood")):
        rng = model.streams[kind]
        split_labels = rng.integers(0, args.classes, sizes[kind])
        np.save(workdir / f"{name}_labels.npy", split_labels.astype(np.int64))
        write_split(model, workdir / f"{name}.npy", split_labels, kind, rng)
    data_seconds = time.perf_counter() - t0
    head = fit_head(workdir, args)
    from bob_cache.ood.vim import resolve_principal_dim

    meta = {
        "settings": settings,
        "data_seconds": data_seconds,
        **head,
        "vim_principal_dim_default": resolve_principal_dim(None, args.dim),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# --- the shared linear head -------------------------------------------------------------------
def class_statistics(path: Path, labels: np.ndarray, classes: int, block: int):
    """Class means and the tied within-class covariance (float64) of a float16 .npy file."""
    (n, dim), _, _ = npy_info(path)
    sums, scatter, shift = np.zeros((classes, dim)), np.zeros((dim, dim)), None
    for start in range(0, n, block):
        x = read_rows(path, start, min(n, start + block)).astype(np.float64)
        shift = x.mean(axis=0) if shift is None else shift
        z = x - shift
        scatter += z.T @ z
        np.add.at(sums, labels[start : start + block], z)
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    centered = sums / counts[:, None]
    within = (scatter - (sums.T / counts) @ sums) / n
    return centered + shift, (within + within.T) / 2


def fit_head(workdir: Path, args: argparse.Namespace, *, shrinkage: float = 0.1) -> dict:
    """Shrunk LDA, centered over classes, temperature-scaled; saved as float32."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    t0 = time.perf_counter()
    labels = np.load(workdir / "train_labels.npy")
    means, within = class_statistics(workdir / "train.npy", labels, args.classes, args.block)
    dim = len(within)
    shrunk = (1 - shrinkage) * within + shrinkage * np.trace(within) / dim * np.eye(dim)
    projected = means @ np.linalg.inv(shrunk)
    bias = -0.5 * (projected * means).sum(axis=1)
    weight, bias = projected - projected.mean(axis=0), bias - bias.mean()
    n_cal = min(20_000, args.rows)
    x, y = read_rows(workdir / "train.npy", 0, n_cal).astype(np.float64), labels[:n_cal]
    logits = x @ weight.T + bias

    def nll(t: float) -> float:
        return float((logsumexp(logits / t, axis=1) - logits[np.arange(n_cal), y] / t).mean())

    temperature = float(minimize_scalar(nll, bounds=(0.02, 50), method="bounded").x)
    weight, bias = (
        (weight / temperature).astype(np.float32),
        (bias / temperature).astype(np.float32),
    )
    np.save(workdir / "head_weight.npy", weight)
    np.save(workdir / "head_bias.npy", bias)
    test = read_rows(workdir / "test.npy", 0, npy_info(workdir / "test.npy")[0][0])
    pred = (test.astype(np.float32) @ weight.T + bias).argmax(axis=1)
    accuracy = float((pred == np.load(workdir / "test_labels.npy")).mean())
    return {
        "head": "shrunk LDA (0.1), centered, temperature-scaled",
        "head_temperature": temperature,
        "head_test_top1": accuracy,
        "head_seconds": time.perf_counter() - t0,
    }


# --- bob's side: one detector in this process (the --child mode) -------------------------------
def proc_mb(field: str, pid: int | str = "self") -> float:
    """``VmRSS`` / ``VmHWM`` (this mm's own peak, unlike ``ru_maxrss``) in MB; 0 if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    line = next((line for line in status if line.startswith(f"{field}:")), f"{field}: 0 kB")
    return int(line.split()[1]) / 1024


def bob_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "knn": {"k": args.k},
        "react": {"percentile": args.percentile},
        "vim": {"principal_dim": args.principal_dim},
    }.get(name, {})


def run_bob_child(args: argparse.Namespace) -> dict[str, Any]:
    """Fit bob's detector ``args.child`` on the ID stream, score the chunks, record."""
    import resource

    from bob_cache.ood import create_detector

    name, data, out = args.child, args.workdir, args.workdir / "bob"
    if name == "knn":
        import faiss  # noqa: F401  (imported lazily by the detector; keep it out of the fit)
    head = (np.load(data / "head_weight.npy"), np.load(data / "head_bias.npy"))
    labels = np.load(data / "train_labels.npy")
    n = len(labels)
    detector = create_detector(name, **bob_options(name, args))
    base = {"load_seconds": 0.0, "rss_start_mb": proc_mb("VmRSS")}
    (out / f"{name}.progress.json").write_text(json.dumps(base))

    def stream():
        for start in range(0, n, args.block):
            stop = min(n, start + args.block)
            yield read_rows(data / "train.npy", start, stop).astype(np.float32), labels[start:stop]

    t0 = time.perf_counter()
    detector.fit(stream, head=head)
    base["fit_seconds"] = time.perf_counter() - t0
    (out / f"{name}.progress.json").write_text(json.dumps(base))
    scored = score_chunks(args, out, detector.score, base)
    # read fitted values as attributes: state() would copy e.g. kNN's whole bank into this RSS
    keys = ("threshold", "alpha", "principal_dim")
    fitted = {k: float(getattr(detector, k)) for k in keys if hasattr(detector, k)}
    return {
        "side": "bob",
        "detector": name,
        **base,
        **scored,
        "fit_rows": detector.n_fit,
        "vm_hwm_mb": proc_mb("VmHWM"),
        "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **fitted,
    }


def score_chunks(args: argparse.Namespace, out: Path, score, base: dict) -> dict[str, Any]:
    """Score ID and OOD chunks alternately; save the scores and progress after each chunk."""
    paths = {"id": args.workdir / "test.npy", "ood": args.workdir / "ood.npy"}
    sizes = {split: npy_info(path)[0][0] for split, path in paths.items()}
    scores = {split: np.zeros(size) for split, size in sizes.items()}
    done, seconds = dict.fromkeys(sizes, 0), 0.0
    while any(done[s] < sizes[s] for s in sizes):
        for split, path in paths.items():
            if done[split] >= sizes[split]:
                continue
            start, stop = done[split], min(sizes[split], done[split] + args.chunk)
            t0 = time.perf_counter()
            scores[split][start:stop] = score(read_rows(path, start, stop).astype(np.float32))
            seconds += time.perf_counter() - t0
            done[split] = stop
            for s, values in scores.items():
                np.save(out / f"{args.child}.{s}.tmp.npy", values[: done[s]])
                (out / f"{args.child}.{s}.tmp.npy").replace(out / f"{args.child}.{s}.npy")
            progress = {**base, "score_seconds": seconds, "rows_scored": done}
            (out / f"{args.child}.progress.json").write_text(json.dumps(progress))
    return {"score_seconds": seconds, "rows_scored": done}


# --- running the children ---------------------------------------------------------------------
def run_process(cmd: list[str], *, timeout: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` with a time limit, polling its ``VmHWM``; ``ru_maxrss`` from ``os.wait4``.

    ``ru_maxrss`` of a child is at least the *parent's* peak RSS at the fork (Linux keeps the
    pre-exec high-water mark), so this parent stays small (no data, no bob import) and the
    child's own ``VmHWM`` is the figure reported.
    """
    with open(log, "w") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        timed_out, hwm = False, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, proc_mb("VmHWM", proc.pid))
            if time.perf_counter() - t0 > timeout:
                hwm = max(hwm, proc_mb("VmHWM", proc.pid))
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_seconds": time.perf_counter() - t0,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "peak_rss_mb": hwm,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,
    }


def generate_in_child(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """:func:`generate` in a child process, so that this parent's peak RSS stays small."""
    sizes = ["--rows", str(args.rows), "--dim", str(args.dim), "--classes", str(args.classes),
             "--test-rows", str(args.test_rows), "--ood-rows", str(args.ood_rows)]  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--generate", "--workdir", str(workdir),
           *sizes, "--seed", str(args.seed), "--block", str(args.block)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"Generating the data failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_command(side: str, name: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    if side == "bob":
        opts = ["--k", str(args.k), "--percentile", str(args.percentile)]
        return [sys.executable, str(Path(__file__).resolve()), "--child", name,
                "--workdir", str(workdir), "--rows", str(args.rows), "--dim", str(args.dim),
                "--classes", str(args.classes), "--principal-dim", str(args.principal_dim),
                "--block", str(args.block), "--chunk", str(args.chunk), *opts]  # fmt: skip
    return [str(args.peer_python), str(PEER_RUNNER), "--detector", PAIRS[name][0],
            "--data", str(workdir), "--out", str(workdir / "peer"), "--k", str(args.k),
            "--percentile", str(args.percentile), "--principal-dim", str(args.principal_dim),
            "--chunk", str(args.chunk)]  # fmt: skip


def run_side(side: str, name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One child for (side, detector): the process figures plus what the child recorded."""
    folder = workdir / side
    folder.mkdir(exist_ok=True)
    stem = PAIRS[name][0] if side == "peer" else name
    for old in folder.glob(f"{stem}.*"):
        old.unlink()
    cmd = child_command(side, name, args, workdir)
    record = run_process(cmd, timeout=args.timeout, log=folder / f"{stem}.log")
    result, progress = folder / f"{stem}.json", folder / f"{stem}.progress.json"
    if result.exists():
        record["result"] = json.loads(result.read_text())
        record["peak_rss_mb"] = max(record["peak_rss_mb"], record["result"]["vm_hwm_mb"])
    elif progress.exists():
        record["progress"] = json.loads(progress.read_text())
    record["status"] = (
        "ok" if "result" in record else "timeout" if record["timed_out"] else "failed"
    )
    if record["status"] == "failed":
        record["log_tail"] = (folder / f"{stem}.log").read_text()[-2000:]
    return record


def run_children(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    """Every (detector, side) child, skipping those recorded with the same settings."""
    runs_path = workdir / "runs.json"
    skip = ("detectors", "fresh", "out", "repeats", "repeat_below")
    settings = {k: str(v) for k, v in vars(args).items() if k not in skip}
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    if runs.get("settings") != settings:
        runs = {"settings": settings, "children": {}}
    if args.fresh:  # rerun the listed detectors only
        for name in args.detectors.split(","):
            for side in ("bob", "peer"):
                runs["children"].pop(f"{side}:{name}", None)
    for name in args.detectors.split(","):
        for repeat in range(args.repeats):
            keys = [f"{side}:{name}" for side in ("bob", "peer")]
            if repeat and not all(is_short(runs["children"][k], args) for k in keys):
                break
            for key in keys:
                old = runs["children"].get(key)
                done = (old.get("runs") or [run_summary(old)]) if old else []
                if len(done) > repeat:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
                record = run_side(key.split(":")[0], name, args, workdir)
                record["runs"] = [*done, run_summary(record)]
                runs["children"][key] = record
                print(f"    {record['status']} in {record['wall_seconds']:.1f} s, peak RSS "
                      f"{record['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
                runs_path.write_text(json.dumps(runs, indent=1))
    return runs["children"]


def is_short(record: dict[str, Any], args: argparse.Namespace) -> bool:
    return record["status"] == "ok" and record["wall_seconds"] < args.repeat_below


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What one run of a child measured (its repeats are summarized by the median)."""
    res = record.get("result", {})
    seconds = res["fit_seconds"] + res["score_seconds"] if res else None
    return {"fit_score_seconds": seconds, "peak_rss_mb": record["peak_rss_mb"]}


# --- comparing ---------------------------------------------------------------------------------
def load_scores(folder: Path, stem: str) -> dict[str, np.ndarray] | None:
    paths = {split: folder / f"{stem}.{split}.npy" for split in SPLITS}
    if not all(p.exists() for p in paths.values()):
        return None
    return {split: np.load(p) for split, p in paths.items()}


def side_metrics(scores: dict[str, np.ndarray], n: dict[str, int]) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from bob_cache.ood import ood_metrics

    ids, oods = scores["id"][: n["id"]], scores["ood"][: n["ood"]]
    metrics = ood_metrics(ids, oods).as_dict()
    is_id = np.r_[np.ones(len(ids)), np.zeros(len(oods))]
    metrics["auroc_sklearn"] = float(roc_auc_score(is_id, np.r_[ids, oods]))
    return metrics


def compare(name: str, children: dict, workdir: Path) -> dict[str, Any]:
    """Metrics of both sides on the rows both scored, and how their scores agree."""
    from scipy.stats import spearmanr

    bob = load_scores(workdir / "bob", name)
    peer = load_scores(workdir / "peer", PAIRS[name][0])
    out: dict[str, Any] = {"pytorch_ood_class": PAIRS[name][1]}
    for side, rec in (("bob", children[f"bob:{name}"]), ("peer", children[f"peer:{name}"])):
        res = rec.get("result", rec.get("progress", {}))
        keys = ("status", "wall_seconds", "peak_rss_mb", "ru_maxrss_mb")
        out[side] = {k: rec[k] for k in keys}
        out[side].update({k: v for k, v in res.items() if k not in ("side", "detector")})
        if rec["status"] == "ok":
            runs = rec.get("runs") or [run_summary(rec)]
            seconds = [r["fit_score_seconds"] for r in runs]
            out[side]["fit_score_seconds"] = float(np.median(seconds))
            out[side]["fit_score_seconds_runs"] = seconds
            out[side]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        elif res.get("score_seconds"):  # stopped at the limit: extrapolate the scoring rate
            total = sum(npy_info(workdir / f"{n}.npy")[0][0] for n in ("test", "ood"))
            rate = res["score_seconds"] / sum(res["rows_scored"].values())
            out[side]["estimated_fit_score_seconds"] = res["fit_seconds"] + rate * total
    if bob is None or peer is None:
        return out
    peer = {split: -values for split, values in peer.items()}  # pytorch-ood: higher = more OOD
    n = {s: min(len(bob[s]), len(peer[s])) for s in SPLITS}
    out["rows_compared"] = n
    out["bob"]["metrics"], out["peer"]["metrics"] = side_metrics(bob, n), side_metrics(peer, n)
    both_b = np.r_[bob["id"][: n["id"]], bob["ood"][: n["ood"]]]
    both_p = np.r_[peer["id"][: n["id"]], peer["ood"][: n["ood"]]]
    out["spearman"] = float(spearmanr(both_b, both_p).statistic)
    out["auroc_diff"] = out["bob"]["metrics"]["auroc"] - out["peer"]["metrics"]["auroc"]
    for side, data in (("bob", bob), ("peer", peer)):  # each side's full-set AUROC when complete
        if out[side]["status"] == "ok":
            full = {s: len(data[s]) for s in SPLITS}
            out[side]["auroc_all_rows"] = side_metrics(data, full)["auroc"]
    return out


# --- the report --------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    import faiss
    import scipy
    import sklearn

    bob = {
        "bob-cache": version("bob-cache"),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "faiss-cpu": faiss.__version__,
    }
    proc = subprocess.run(
        [str(args.peer_python), str(PEER_RUNNER), "--versions"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {"bob": bob, "pytorch-ood side": json.loads(proc.stdout.strip().splitlines()[-1])}


def seconds_cell(side: dict[str, Any], timeout: float) -> str:
    if side["status"] == "ok":
        return f"{side['fit_score_seconds']:.1f}"
    if side["status"] == "timeout":
        estimate = side.get("estimated_fit_score_seconds")
        about = f"; ~{estimate:,.0f} extrapolated" if estimate else ""
        return f"> {timeout:.0f} (stopped{about})"
    return "failed"


def rss_cell(side: dict[str, Any]) -> str:
    if "rss_start_mb" not in side:
        return f"{side['peak_rss_mb']:.0f}"
    return f"{side['peak_rss_mb']:.0f} (+{side['peak_rss_mb'] - side['rss_start_mb']:.0f})"


def markdown_table(results: dict[str, Any], timeout: float) -> str:
    head = (
        "| detector (bob / pytorch-ood) | AUROC bob | AUROC pytorch-ood | Δ AUROC | "
        "bob fit+score s | pytorch-ood fit+score s (+ load s) | bob / pytorch-ood time | "
        "bob peak RSS MB (+ over imports) | pytorch-ood peak RSS MB (+ over imports) |\n"
        + "|---" * 9
        + "|"
    )
    lines, notes = [head], []
    for name, r in results.items():
        b, p = r["bob"], r["peer"]
        partial = any(side["status"] != "ok" for side in (b, p))
        mark = "*" if partial and "rows_compared" in r else ""
        if mark:
            n = r["rows_compared"]
            notes.append(f"{name}: {n['id']:,} ID + {n['ood']:,} OOD rows")
        auroc = [f"{s['metrics']['auroc']:.4f}{mark}" if "metrics" in s else "—" for s in (b, p)]
        diff = f"{r['auroc_diff']:+.1e}" if "auroc_diff" in r else "—"
        ratio = "—"
        if b["status"] == "ok" and p["status"] == "ok":
            ratio = f"{b['fit_score_seconds'] / p['fit_score_seconds']:.2f}"
        elif b["status"] == "ok" and p["status"] == "timeout":
            ratio = f"< {b['fit_score_seconds'] / timeout:.2f}"
        peer_s = seconds_cell(p, timeout)
        if p.get("load_seconds"):
            peer_s += f" (+ {p['load_seconds']:.1f})"
        lines.append(
            f"| {name} / {r['pytorch_ood_class']} | {auroc[0]} | {auroc[1]} | {diff} | "
            f"{seconds_cell(b, timeout)} | {peer_s} | {ratio} | {rss_cell(b)} | {rss_cell(p)} |"
        )
    if notes:
        lines.append(
            "\n\\* AUROC of both sides over the rows both scored before a child was stopped: "
        )
        lines[-1] += "; ".join(notes) + "."
    return "\n".join(lines)


def plot(results: dict[str, Any], timeout: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    for offset, side, label in ((-0.2, "bob", "bob-cache"), (0.2, "peer", "pytorch-ood")):
        recs = [results[n][side] for n in names]
        secs = [r.get("fit_score_seconds", timeout) for r in recs]
        hatch = ["//" if r["status"] != "ok" else "" for r in recs]
        bars = axes[0].barh(y + offset, secs, height=0.4, label=label)
        for bar, h in zip(bars, hatch, strict=True):
            bar.set_hatch(h)
        axes[1].barh(y + offset, [r["peak_rss_mb"] / 1024 for r in recs], height=0.4)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fit + score seconds (log; hatched = stopped at the time limit)")
    axes[1].set_xlabel("peak RSS of the child process, GiB")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.generate:
        print(json.dumps(generate(args, args.workdir)))
        return
    if args.child:
        result = run_bob_child(args)
        (args.workdir / "bob" / f"{args.child}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    unknown = sorted(set(args.detectors.split(",")) - set(PAIRS))
    if unknown:
        raise SystemExit(f"Unknown detector(s) {unknown}; expected some of {', '.join(PAIRS)}.")
    if not args.peer_python.exists():
        raise SystemExit(f"No {args.peer_python}; run benchmarks/peers/setup_pytorch_ood.sh first.")
    t0, load_before = time.perf_counter(), os.getloadavg()
    workdir = HERE / "out" / f"ood-{args.rows}x{args.dim}x{args.classes}-s{args.seed}"
    data = generate_in_child(args, workdir)
    args.principal_dim = args.principal_dim or data["vim_principal_dim_default"]
    children = run_children(args, workdir)
    results = {name: compare(name, children, workdir) for name in args.detectors.split(",")}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(args),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("child", "workdir")},
        "data": data,
        "run_seconds": time.perf_counter() - t0,
        "children_seconds": sum(rec["wall_seconds"] for rec in children.values()),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    table = markdown_table(results, args.timeout)
    args.out.with_suffix(".md").write_text(table + "\n")
    title = (f"{args.rows:,} ID train rows × {args.dim} dims, {args.classes} classes; "
             f"scored {args.test_rows:,} ID + {args.ood_rows:,} OOD rows")  # fmt: skip
    plot(results, args.timeout, args.out.with_suffix(".png"), title)
    print(table)
    print(f"\nrun: {report['run_seconds']:.0f} s; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
