"""OOD detection at 1M ID rows under ``bob-cache ood --max-memory 4GB`` (issue 12, part 2).

The data and head come from ``ood_detectors.py``'s generator at 1,000,000 ID training rows ×
768 dims, 1000 classes (float16), with 10,000 ID test and 10,000 OOD rows (fewer queries than
the 250k comparison: exact kNN over a 1M bank costs ~1.5 TFLOP per 1,000 queries here). They
are written into a bob-cache feature store (``synth`` train/test, ``synth-ood`` test) with the
same head stored as a probe head (no standardization), then one ``bob-cache ood --detect
synth-ood --max-memory 4GB`` runs every detector in a child process whose peak RSS
(``VmHWM``, polled, and ``ru_maxrss``) is the figure; the store is on local disk.

pytorch-ood runs its Mahalanobis and kNN on the same files in its own venv, each in a child
with a 16 GiB address-space cap (``prlimit --as``; at 250k rows its Mahalanobis already peaked
at 16.2 GB) and a time limit, so an out-of-memory failure is reported instead of taking the
machine down.

    flock /tmp/bench.lock python benchmarks/ood_scale.py          # ~30 min on 2 cores
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ood_detectors as od  # noqa: E402

ROWS, TEST, OOD = 1_000_000, 10_000, 10_000
CAP_BYTES = 16 * 2**30
PEER_DETECTORS = ("mahalanobis", "knn")


def build_store(workdir: Path) -> Path:
    """A feature store holding the generated splits and the head (made once)."""
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout
    from bob_cache.stores.head_store import HeadParams, HeadRecord, write_head

    store = workdir / "store"
    if (store / ".done").exists():
        return store
    shutil.rmtree(store, ignore_errors=True)
    fstore = open_store(store, mode="a")
    layout = resolve_layout(shard_rows=65_536)
    spec = {"layer": "final", "pool": "avg", "dtype": "float16"}
    classes = [f"class{i}" for i in range(1000)]
    made = {}
    for dataset, split, stem in (("synth", "train", "train"), ("synth", "test", "test"),
                                 ("synth-ood", "test", "ood")):  # fmt: skip
        x = np.load(workdir / f"{stem}.npy", mmap_mode="r")
        y = np.load(workdir / f"{stem}_labels.npy")
        if dataset == "synth-ood":
            y = np.full(len(y), -1, dtype=np.int64)
        key = "feat0000000" + ("1" if dataset == "synth" else "2")
        request = FeatureSetRequest(
            path=f"{dataset}/{split}/model.synthetic/{key}", key=key, spec=spec,
            provenance={"dataset": {"name": dataset, "class_names": classes},
                        "split": split, "backbone": {"slug": "model.synthetic",
                                                     "name": "model", "arch": "model"}},
            n_rows=len(x), dim=x.shape[1], dtype="float16",
        )  # fmt: skip
        fs = fstore.require(request, layout, label_shape=())
        fs.write_rows(x, labels=y, ids=[f"{stem}/{i:07d}" for i in range(len(x))])
        fs.finalize()
        made[(dataset, split)] = fs
    train = made[("synth", "train")]
    weight = np.load(workdir / "head_weight.npy")
    bias = np.load(workdir / "head_bias.npy")
    record = HeadRecord(
        name="synthhead", method="linear", setting="full", seed=0, C=None, classes=classes,
        n_classes=1000, dim=768, dataset="synth", backbone="model.synthetic",
        feature_key=train.key, feature_set=train.path,
        generations={train.path: {str(s): g for s, g in train.generations().items()}},
        sets_created={train.path: train.attrs.get("created", "")}, train_rows=ROWS,
        val_rows=0, protocol="shrunk LDA head of ood_detectors.py (given, not fitted here)",
    )  # fmt: skip
    write_head(train, record, HeadParams(weight=weight, bias=bias, mean=None, scale=None))
    (store / ".done").write_text("ok")
    return store


def run_bob(workdir: Path, store: Path) -> dict:
    results = workdir / "results"
    shutil.rmtree(results, ignore_errors=True)
    for old in (store / "synth" / "train").rglob("detectors"):
        shutil.rmtree(old, ignore_errors=True)  # fit afresh
    cmd = [sys.executable, "-m", "bob_cache.cli", "ood", "--store", str(store), "--backbone",
           "model", "--id", "synth", "--detect", "synth-ood", "--max-memory", "4GB",
           "--knn-k", "50", "--results", str(results), "--json"]  # fmt: skip
    log = workdir / "bob-ood.log"
    record = od.run_process(cmd, timeout=3600, log=log)
    text = log.read_text()
    report = json.loads(text[text.index("{") :]) if "{" in text else None
    return {**record, "report": report}


def run_peer(name: str, args: object, workdir: Path) -> dict:
    cmd = ["prlimit", f"--as={CAP_BYTES}", *od.child_command("peer", name, args, workdir)]
    folder = workdir / "peer"
    folder.mkdir(exist_ok=True)
    record = od.run_process(cmd, timeout=600, log=folder / f"{name}.log")
    result = folder / f"{od.PAIRS[name][0]}.json"
    if result.exists():
        record["result"] = json.loads(result.read_text())
    record["log_tail"] = (folder / f"{name}.log").read_text()[-600:]
    return record


def main() -> None:
    args = od.parse_args(["--rows", str(ROWS), "--test-rows", str(TEST), "--ood-rows", str(OOD)])
    from bob_cache.ood.vim import resolve_principal_dim

    args.principal_dim = args.principal_dim or resolve_principal_dim(None, args.dim)
    workdir = HERE / "out" / f"ood-scale-{ROWS}x768x1000"
    t0 = time.perf_counter()
    meta = od.generate(args, workdir)
    store = build_store(workdir)
    prepared = time.perf_counter() - t0
    bob = run_bob(workdir, store)
    print(json.dumps({k: v for k, v in bob.items() if k != "report"}), file=sys.stderr)
    peers = {name: run_peer(name, args, workdir) for name in PEER_DETECTORS}
    out = {"machine": od.machine_info(), "rows": ROWS, "test_rows": TEST, "ood_rows": OOD,
           "prepare_seconds": prepared, "head": meta, "bob": bob, "peer": peers}  # fmt: skip
    (HERE / "out" / "ood-scale.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({"bob_peak_rss_mb": bob.get("peak_rss_mb"), "bob_seconds": bob.get("seconds"),
                      "peer": {n: {k: p.get(k) for k in ("status", "peak_rss_mb", "seconds")}
                               for n, p in peers.items()}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
