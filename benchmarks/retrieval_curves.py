"""Retrieval (issue 10): ``--kind auto`` against autofaiss on data the auto rules were not tuned
on, as recall@10 against queries/s curves at the same memory budget.

The auto rules (``FLAT_MAX_ROWS``, ``HNSW_MAX_TARGET``, nlist ≈ 4·√N, scalar codes before PQ)
were set from the 1M × 768 synthetic set of ``retrieval_index.py`` (seed 0). Here they meet:

* ``synthetic``: a second synthetic set with another seed and another cluster structure
  (defaults: 300k × 512, seed 1, 3,000 clusters of ~100 rows in 300 superclusters, a narrower
  spread along a rank-24 subspace, 3× the isotropic noise, clusters further from their
  supercluster). Queries are fresh draws, not database rows.
* ``features``: real features already in a feature store, e.g. ImageNet MobileNetV2 on
  ``builtin:digits``: the train split is the database, the test split the reported queries, the
  val split the validation queries.

Protocol, per memory budget:

1. autofaiss builds under the budget in its own venv (its own index and search parameter).
   Its recall on the *validation* queries sets bob's target (rounded up to 0.01, at least 0.95;
   autofaiss has no recall target). The reported queries set nothing.
2. bob's auto index is built for that target and for the default 0.95 (one build when both
   resolve to the same index; the lower target's pick then comes from the same build's tuning
   sweep, exactly what a build for it would pick). bob tunes on held-out database rows.
3. Curves: every index is searched along its own parameter (bob: its kind's nprobe/efSearch;
   autofaiss: the parameter its ``index_param`` leads with) on the same grid, stopping after
   recall 0.999, in two passes interleaved bob, autofaiss, bob, autofaiss; each point keeps its
   faster pass. Each tool's own pick is measured in the same passes.
4. Matched recall: at fixed recall levels and at each tool's own recall, each curve's q/s is
   interpolated on its upper envelope (log q/s linear in recall between neighbouring points; a
   level below a curve's cheapest point takes that point's q/s, marked ≥). Ratios bob/autofaiss
   are within this run.

    python benchmarks/retrieval_curves.py synthetic            # 300k × 512, seed 1 (~13 min)
    python benchmarks/retrieval_curves.py features --store S --dataset digits \\
        --backbone mobilenet_v2 --budgets 1GB
    python benchmarks/retrieval_curves.py plot benchmarks/out/curves-*.json

Figures go to ``benchmarks/out/curves-<tag>.json`` (+ ``.png``); work files under
``benchmarks/out/curves-<tag>/``. Finished steps are kept in ``<out>.partial.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import retrieval_index as ri  # noqa: E402

K = ri.K
DEFAULT_TARGET = 0.95
STOP_RECALL = 0.999
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
LEVELS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
PASSES = 2


# --- data ------------------------------------------------------------------------------------
def synthetic_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """retrieval_index's generator with 2 × --queries fresh queries: test half, validation half."""
    ns = argparse.Namespace(**{**vars(args), "queries": 2 * args.queries})
    info = ri.make_data(ns, work)
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    _save_split(work, "test", q[: args.queries], truth[: args.queries])
    _save_split(work, "val", q[args.queries :], truth[args.queries :])
    return {
        **info,
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "val": args.queries,
    }


def feature_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Database, query and validation vectors from three splits of one feature set."""
    from numpy.lib.format import open_memmap

    from bob_cache.pipelines.selection import select_feature_sets
    from bob_cache.stores import open_store

    sets = select_feature_sets(
        open_store(args.store),
        dataset=args.dataset,
        backbone=args.backbone,
        feature=args.feature,
        splits=(args.db_split, args.query_split, args.val_split),
    )
    loaded = {}
    for split, fs in sets.items():
        if fs.n_invalid:
            raise SystemExit(f"{fs.path} has {fs.n_invalid} invalid rows; expected none")
        x = ri.normalized(np.asarray(fs.features[:]))
        loaded[split] = (x, np.asarray(fs.group["labels"][:]))
    db, db_labels = loaded[args.db_split]
    vectors = open_memmap(work / "vectors.npy", mode="w+", dtype=np.float32, shape=db.shape)
    vectors[:] = db
    vectors.flush()
    out: dict[str, Any] = {
        "rows": len(db),
        "dim": db.shape[1],
        "feature_key": sets[args.db_split].key,
    }
    for name, split in (("test", args.query_split), ("val", args.val_split)):
        q, labels = loaded[split]
        scores, truth = ri.exact_truth(q, db, K)
        _save_split(work, name, q, truth)
        out["queries" if name == "test" else "val"] = len(q)
        if name == "test":
            out["truth_share_same_label"] = round(
                float((db_labels[truth] == labels[:, None]).mean()), 4
            )
            out["truth_top1_score_median"] = round(float(np.median(scores[:, 0])), 4)
            out["truth_top1_minus_top10_median"] = round(
                float(np.median(scores[:, 0] - scores[:, -1])), 4
            )
    return out


def _save_split(work: Path, name: str, q: np.ndarray, truth: np.ndarray) -> None:
    np.save(work / f"queries_{name}.npy", np.ascontiguousarray(q, dtype=np.float32))
    np.save(work / f"truth_{name}.npy", truth)


# --- autofaiss (its own venv) ----------------------------------------------------------------
def autofaiss(work: Path, budget: str, python: str, *extra: str) -> dict[str, Any]:
    """Run benchmarks/peers/autofaiss_run.py: a build (no extra args) or a --curve."""
    wd = work / f"autofaiss-{budget}"
    wd.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(HERE / "peers" / "autofaiss_run.py"), "--workdir", str(wd), "--k", str(K)]
    cmd += ["--queries", str(work / "queries_test.npy"), "--truth", str(work / "truth_test.npy")]
    if not extra:
        cmd += ["--vectors", str(work / "vectors.npy"), "--max-memory", budget, "--metric", "ip"]
        cmd += ["--val-queries", str(work / "queries_val.npy")]
        cmd += ["--val-truth", str(work / "truth_val.npy")]
    log = wd / ("build.log" if not extra else "curve.log")
    with open(log, "a") as err:
        done = subprocess.run([*cmd, *extra], stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        raise RuntimeError(f"autofaiss {budget} {' '.join(extra)} failed; see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_versions(python: str) -> dict[str, str]:
    code = (
        "import autofaiss, faiss, numpy, json; print(json.dumps({'autofaiss': "
        "autofaiss.__version__, 'faiss': faiss.__version__, 'numpy': numpy.__version__}))"
    )
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True).stdout)


def grid(param: str, limit: int) -> list[int]:
    return [v for v in (EF_GRID if param == "efSearch" else NPROBE_GRID) if v <= limit]


def peer_grid(af: dict[str, Any]) -> list[int]:
    params = af.get("search_params") or ""
    if not params:
        return [0]
    if params.startswith("efSearch"):
        return grid("efSearch", max(EF_GRID))
    nlist = int(re.search(r"IVF(\d+)", af["index_key"]).group(1))
    return grid("nprobe", nlist)


def peer_own_value(af: dict[str, Any]) -> int:
    params = af.get("search_params") or ""
    return int(params.split(",")[0].split("=")[1]) if params else 0


# --- bob -------------------------------------------------------------------------------------
def bob_points(
    work: Path, name: str, values: list[int | None], ctx: dict[str, Any], stop: float
) -> list[dict[str, Any]]:
    """recall@10 and q/s of one of bob's indexes at each value (stop after recall ≥ stop)."""
    from bob_cache.retrieval.faiss_ops import set_search_param
    from bob_cache.retrieval.kinds import get_kind

    q, truth = np.load(work / "queries_test.npy"), np.load(work / "truth_test.npy")
    s = ri.open_searcher(work, name, **ctx)
    kind = get_kind(s.record.kind)
    points = []
    for value in values:
        set_search_param(s.index, kind, value)
        qb, _ = ri.qps_batched(s.index, q[:1000])
        r = ri.recall(s.index.search(q, K)[1], truth)
        q1, n1 = ri.qps_batch1(s.index, q)
        points.append(
            {
                "value": value,
                "recall": round(r, 5),
                "qps_batch1": round(q1, 2),
                "batch1_queries": n1,
                "qps_batch1000": round(qb, 2),
            }
        )
        print(f"  bob {name} {kind.search_param}={value}: {points[-1]}", file=sys.stderr)
        if r >= stop:
            break
    del s
    gc.collect()
    return points


def bob_grid(build: dict[str, Any]) -> list[int | None]:
    rec = build["record"]
    if rec["search_param"] is None:
        return [None]
    limit = rec["params"].get("nlist", max(EF_GRID))
    return grid(rec["search_param"], limit)


def pick_value(build: dict[str, Any], target: float) -> int | None:
    """What a build for ``target`` picks: the first tuning-sweep value reaching it."""
    rec = build["record"]
    if rec["search_param"] is None or target >= rec["target_recall"]:
        return rec["search_value"]
    return next(int(r["value"]) for r in build["sweep"] if r["recall"] >= target)


# --- comparison ------------------------------------------------------------------------------
def compare(
    state: ri.State,
    work: Path,
    budget: str,
    ctx: dict[str, Any],
    python: str,
    passes_wanted: int = PASSES,
) -> dict:
    from bob_cache.retrieval.auto import parse_memory, resolve_kind

    rows, dim = state.data["data"]["rows"], state.data["data"]["dim"]
    af = state.step(f"autofaiss:{budget}", lambda: autofaiss(work, budget, python))
    t_peer = ri.peer_target(DEFAULT_TARGET, {"recall_at_k": af["val_recall_at_k"]})
    targets = sorted({t_peer, DEFAULT_TARGET}, reverse=True)
    groups: dict[str, list[float]] = {}
    for t in targets:
        c = resolve_kind(
            "auto", rows, dim, max_memory=parse_memory(budget), params={}, target_recall=t
        )
        groups.setdefault(f"auto-{budget}-{c.kind.name}", []).append(t)
    builds = {
        name: state.step(
            f"build:{name}",
            lambda n=name, t=ts[0]: ri.build(work, n, "auto", budget, t, **ctx),
        )
        for name, ts in groups.items()
    }
    picks = {
        f"{name} @ {t}": {"index": name, "target": t, "value": pick_value(builds[name], t)}
        for name, ts in groups.items()
        for t in ts
    }
    passes = []
    for i in range(passes_wanted):

        def one_pass() -> dict[str, Any]:
            out: dict[str, Any] = {"bob": {}, "bob_picks": {}}
            with OtherLoad() as load_bob:
                for name, b in builds.items():
                    out["bob"][name] = bob_points(work, name, bob_grid(b), ctx, STOP_RECALL)
                for label, p in picks.items():
                    pick = bob_points(work, p["index"], [p["value"]], ctx, 2.0)
                    out["bob_picks"][label] = pick[0]
            values = ",".join(map(str, peer_grid(af)))
            own = str(peer_own_value(af))
            with OtherLoad() as load_peer:
                out["autofaiss"] = autofaiss(
                    work, budget, python, "--curve", values, "--min-seconds", "1"
                )
                out["autofaiss_pick"] = autofaiss(
                    work, budget, python, "--curve", own, "--min-seconds", "1", "--stop-recall", "2"
                )["points"][0]
            out["other_processes_cores"] = {"bob": load_bob.cores, "autofaiss": load_peer.cores}
            return out

        passes.append(state.step(f"curves:{budget}:pass{i + 1}", one_pass))
    return {
        "autofaiss_build": af,
        "targets": {"from_autofaiss_val_recall": t_peer, "default": DEFAULT_TARGET},
        "bob_builds": builds,
        "picks": picks,
        "passes": passes,
        **best_of(passes),
    }


class OtherLoad:
    """How many cores processes other than this one and its children kept busy, on average
    (from /proc/stat): the machine is shared, so every timed pass records it."""

    def __enter__(self) -> OtherLoad:
        self.start = _cpu_now()
        return self

    def __exit__(self, *exc: object) -> None:
        (w0, b0, o0), (w1, b1, o1) = self.start, _cpu_now()
        self.cores = round(max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9), 2)


def _cpu_now() -> tuple[float, float, float]:
    """(wall s, CPU s all processes spent busy, CPU s this process and its children spent)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def best_of(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per point, the pass with the higher batch-1 q/s (recall is the same in every pass)."""

    def merge(lists: list[list[dict]]) -> list[dict]:
        by_value: dict[Any, dict] = {}
        for pts in lists:
            for p in pts:
                old = by_value.get(p["value"])
                if old is None or p["qps_batch1"] > old["qps_batch1"]:
                    best1000 = max(p["qps_batch1000"], (old or p)["qps_batch1000"])
                    by_value[p["value"]] = {**p, "qps_batch1000": best1000}
        return sorted(by_value.values(), key=lambda p: p["value"] or 0)

    first = passes[0]
    return {
        "bob_curves": {n: merge([p["bob"][n] for p in passes]) for n in first["bob"]},
        "bob_pick_points": {
            label: merge([[p["bob_picks"][label]] for p in passes])[0]
            for label in first["bob_picks"]
        },
        "autofaiss_curve": merge([p["autofaiss"]["points"] for p in passes]),
        "autofaiss_pick_point": merge([[p["autofaiss_pick"]] for p in passes])[0],
    }


def qps_at(points: list[dict[str, Any]], level: float, key: str = "qps_batch1") -> tuple:
    """(q/s at recall ``level`` on the curve's upper envelope, floor flag) or (None, False)."""
    frontier: list[tuple[float, float]] = []
    for p in sorted(points, key=lambda p: -p["recall"]):
        if not frontier or p[key] > frontier[-1][1]:
            frontier.append((p["recall"], p[key]))
    frontier.reverse()  # recall ascending, q/s descending
    if level > frontier[-1][0]:
        return None, False
    if level <= frontier[0][0]:
        return frontier[0][1], level < frontier[0][0]
    for (r0, q0), (r1, q1) in itertools.pairwise(frontier):
        if r0 < level <= r1:
            f = (level - r0) / (r1 - r0)
            return math.exp(math.log(q0) + f * (math.log(q1) - math.log(q0))), False
    return None, False


def matched(result: dict[str, Any]) -> list[dict[str, Any]]:
    af_curve = result["autofaiss_curve"] + [result["autofaiss_pick_point"]]
    levels = {lv: "level" for lv in LEVELS}
    levels[result["autofaiss_pick_point"]["recall"]] = "autofaiss's pick"
    for label, p in result["bob_pick_points"].items():
        levels[p["recall"]] = f"bob's pick {label}"
    rows = []
    for level, why in sorted(levels.items()):
        theirs, t_floor = qps_at(af_curve, level)
        for name, curve in result["bob_curves"].items():
            ours, o_floor = qps_at(curve + _picks_of(result, name), level)
            rows.append(
                {
                    "recall": level,
                    "why": why,
                    "bob_index": name,
                    "bob_qps_batch1": None if ours is None else round(ours, 1),
                    "bob_floor": o_floor,
                    "autofaiss_qps_batch1": None if theirs is None else round(theirs, 1),
                    "autofaiss_floor": t_floor,
                    "ratio": round(ours / theirs, 2) if ours and theirs else None,
                }
            )
    return rows


def _picks_of(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    picks = result["picks"]
    return [p for label, p in result["bob_pick_points"].items() if picks[label]["index"] == name]


# --- summary ---------------------------------------------------------------------------------
def summarize(report: dict[str, Any]) -> str:
    m, d, pv = report["machine"], report["data"], report["peer_versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; bob: faiss {m['faiss']}, numpy {m['numpy']}; "
        f"peer venv: autofaiss {pv['autofaiss']}, faiss {pv['faiss']}, numpy {pv['numpy']}.",
        f"Data: {report['tag']}: {d['rows']:,} × {d['dim']}; {d['queries']} reported queries, "
        f"{d['val']} validation queries.",
    ]
    for budget, res in report["budgets"].items():
        af, afp = res["autofaiss_build"], res["autofaiss_pick_point"]
        lines += [
            "",
            f"Budget {budget}:",
            "",
            "| tool | index | pick | recall@10 | q/s b1 | q/s b1000 | build s | index MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, p in res["bob_pick_points"].items():
            b = res["bob_builds"][res["picks"][label]["index"]]
            r = b["record"]
            lines.append(
                f"| bob auto (target {res['picks'][label]['target']}) | {r['kind']} "
                f"{ri._params(r['params'])} | "
                f"{_setting(r['search_param'], p['value'])} | "
                f"{p['recall']:.4f} | {p['qps_batch1']:.1f} | {p['qps_batch1000']:.1f} | "
                f"{r['build_seconds']:.0f} | {r['bytes'] / 2**20:.0f} |"
            )
        lines.append(
            f"| autofaiss | {af['index_key']} | {af['search_params'] or '-'} | {afp['recall']:.4f} "
            f"| {afp['qps_batch1']:.1f} | {afp['qps_batch1000']:.1f} | {af['build_seconds']:.0f} "
            f"| {af['index_bytes'] / 2**20:.0f} |"
        )
        lines += [
            "",
            "| curve | value | recall@10 | q/s b1 | q/s b1000 |",
            "| --- | --- | --- | --- | --- |",
        ]
        curves = {**res["bob_curves"], "autofaiss": res["autofaiss_curve"]}
        for name, pts in curves.items():
            for p in pts:
                lines.append(
                    f"| {name} | {p['value']} | {p['recall']:.4f} | {p['qps_batch1']:.1f} | "
                    f"{p['qps_batch1000']:.1f} |"
                )
        loads = "; ".join(
            f"pass {i + 1}: {p['other_processes_cores']['bob']} (bob) / "
            f"{p['other_processes_cores']['autofaiss']} (autofaiss)"
            for i, p in enumerate(res["passes"])
            if "other_processes_cores" in p
        )
        lines += ["", f"Cores kept busy by other processes while timing: {loads or 'n/a'}."]
        lines += [
            "",
            "| recall@10 | (why) | bob index | bob q/s b1 | autofaiss q/s b1 | bob / autofaiss |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in res["matched"]:
            lines.append(
                f"| {row['recall']:.4f} | {row['why']} | {row['bob_index']} | "
                f"{_fmt(row['bob_qps_batch1'], row['bob_floor'])} | "
                f"{_fmt(row['autofaiss_qps_batch1'], row['autofaiss_floor'])} | "
                f"{'-' if row['ratio'] is None else row['ratio']} |"
            )
    return "\n".join(lines)


def _setting(param: str | None, value: Any) -> str:
    return f"{param}={value}" if param else "exact"


def _fmt(v: float | None, floor: bool) -> str:
    return "not reached" if v is None else f"{'≥' if floor else ''}{v:.1f}"


def plot(paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in paths:
        report = json.loads(path.read_text())
        budgets = report["budgets"]
        fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.8), squeeze=False)
        for ax, (budget, res) in zip(axes[0], budgets.items(), strict=True):
            for name, pts in res["bob_curves"].items():
                ax.plot(
                    [p["recall"] for p in pts],
                    [p["qps_batch1"] for p in pts],
                    "o-",
                    label=f"bob {name}",
                )
            pts = res["autofaiss_curve"]
            key = res["autofaiss_build"]["index_key"]
            ax.plot(
                [p["recall"] for p in pts],
                [p["qps_batch1"] for p in pts],
                "s--",
                label=f"autofaiss {key}",
            )
            for label, p in res["bob_pick_points"].items():
                ax.plot(p["recall"], p["qps_batch1"], "*", ms=16, label=f"bob pick {label}")
            p = res["autofaiss_pick_point"]
            ax.plot(p["recall"], p["qps_batch1"], "X", ms=13, color="k", label="autofaiss pick")
            ax.set_yscale("log")
            ax.set_xlabel("recall@10")
            ax.set_ylabel("queries/s, batch 1")
            ax.set_title(f"{report['tag']}, budget {budget}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
        print(f"plot: {path.with_suffix('.png')}", file=sys.stderr)


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="mode", required=True)
    syn = sub.add_parser("synthetic", help="a second synthetic set")
    syn.add_argument("--rows", type=int, default=300_000)
    syn.add_argument("--dim", type=int, default=512)
    syn.add_argument("--clusters", type=int, default=3000)
    syn.add_argument("--spread", type=float, default=0.9)
    syn.add_argument("--offset", type=float, default=0.8)
    syn.add_argument("--noise", type=float, default=0.3)
    syn.add_argument("--rank", type=int, default=24)
    syn.add_argument("--seed", type=int, default=1)
    syn.add_argument("--queries", type=int, default=1000, help="reported; as many again validate")
    syn.add_argument("--budgets", default="1GB")
    feat = sub.add_parser("features", help="real features from a store")
    feat.add_argument("--store", required=True)
    feat.add_argument("--dataset", required=True)
    feat.add_argument("--backbone", required=True)
    feat.add_argument("--feature", default=None)
    feat.add_argument("--db-split", default="train")
    feat.add_argument("--query-split", default="test")
    feat.add_argument("--val-split", default="val")
    feat.add_argument("--budgets", default="1GB")
    for sp in (syn, feat):
        sp.add_argument(
            "--autofaiss-python", default=str(ROOT / ".venv-autofaiss" / "bin" / "python")
        )
        sp.add_argument("--fresh", action="store_true")
        sp.add_argument("--passes", type=int, default=PASSES, help="interleaved timing passes")
        sp.add_argument(
            "--remeasure", action="store_true", help="keep data and builds, time the curves again"
        )
    pl = sub.add_parser("plot", help="PNG of the curves in JSON reports")
    pl.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args()
    if args.mode == "plot":
        plot(args.paths)
        return

    if args.mode == "synthetic":
        tag = f"synthetic-{args.rows}x{args.dim}-s{args.seed}"
        keys = ("rows", "dim", "clusters", "spread", "offset", "noise", "rank", "seed", "queries")
        ctx: dict[str, Any] = {}
    else:
        tag = f"{args.dataset}-{args.backbone}".replace("/", "_").replace(":", "_")
        keys = ("store", "dataset", "backbone", "feature", "db_split", "query_split", "val_split")
        ctx = {"store": args.store, "dataset": args.dataset, "backbone": args.backbone}
    out = HERE / "out" / f"curves-{tag}.json"
    work = HERE / "out" / f"curves-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    state = ri.State(
        out.with_suffix(".partial.json"), args.fresh, {k: getattr(args, k) for k in keys}
    )
    state.data["machine"] = ri.machine()
    state.data["peer_versions"] = peer_versions(args.autofaiss_python)
    make = synthetic_data if args.mode == "synthetic" else feature_data
    state.step("data", lambda: make(args, work))
    if args.remeasure:
        for key in [k for k in state.data if k.startswith("curves:")]:
            del state.data[key]
    results = {}
    for budget in budgets:
        res = compare(state, work, budget, ctx, args.autofaiss_python, args.passes)
        res["matched"] = matched(res)
        results[budget] = res
    report = {
        "tag": tag,
        "args": state.data["args"],
        "machine": state.data["machine"],
        "peer_versions": state.data["peer_versions"],
        "data": state.data["data"],
        "budgets": results,
    }
    report["summary"] = summarize(report)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(report["summary"])
    plot([out])
    print(f"\nfigures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
