"""Batch-1 queries/s of the same HNSW graph with and without bob's ``IDMap2`` wrapper, on an
idle core and beside one busy core (issue 10's curves were timed on a shared machine).

bob stores hnsw and flat indexes as ``IDMap2,...``: FAISS's ``IndexIDMap2::search`` maps the
result ids in an OpenMP ``parallel for`` on every call, so a lone query wakes every OpenMP
thread; ``IndexHNSW::search`` alone runs one query on the calling thread. When another process
holds a core, waking the second thread can cost a scheduler time slice. This script measures
that directly: bob's hnsw index from ``retrieval_curves.py synthetic`` (IDMap2 wrapper), the
graph inside it (no wrapper), and autofaiss's HNSW32 for the same data, at efSearch 16 and 96,
with 2 and 1 OpenMP threads, first with nothing else running and then beside a busy loop
this script starts (and ends) itself.

    python benchmarks/retrieval_contention.py   # after retrieval_curves.py synthetic; ~1 min
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import retrieval_index as ri  # noqa: E402


class _OpsSearch:
    """bob's query path: ``faiss_ops.search`` on the stored index, as ``Searcher`` calls it."""

    def __init__(self, index: object) -> None:
        self.index = index

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from bob_cache.retrieval import faiss_ops

        return faiss_ops.search(self.index, x, k)


def main() -> None:
    import faiss

    work = HERE / "out" / "curves-synthetic-300000x512-s1"
    q = np.load(work / "queries_test.npy")
    bob = ri.open_searcher(work, "auto-1GB-hnsw").index
    indexes = {
        "bob IDMap2,HNSW32 (index.search)": bob,
        "bob IDMap2,HNSW32 (faiss_ops.search)": _OpsSearch(bob),
        "bob's graph without IDMap2": faiss.downcast_index(bob.index),
        "autofaiss HNSW32": faiss.read_index(str(work / "autofaiss-1GB" / "knn.index")),
    }
    rows = []
    for busy in (False, True):
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for ef in (16, 96):
                for threads in (2, 1):
                    faiss.omp_set_num_threads(threads)
                    for name, index in indexes.items():
                        target = index.index if isinstance(index, _OpsSearch) else index
                        faiss.ParameterSpace().set_index_parameter(target, "efSearch", ef)
                        qps, n = ri.qps_batch1(index, q, min_seconds=1.0, max_seconds=5.0)
                        row = {
                            "busy_core": busy,
                            "efSearch": ef,
                            "omp_threads": threads,
                            "index": name,
                            "qps_batch1": round(qps, 1),
                            "queries": n,
                        }
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    out = HERE / "out" / "retrieval-contention.json"
    out.write_text(json.dumps({"machine": ri.machine(), "rows": rows}, indent=1))
    print("| busy core | efSearch | OMP threads | index | q/s batch 1 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {'yes' if r['busy_core'] else 'no'} | {r['efSearch']} | {r['omp_threads']} | "
            f"{r['index']} | {r['qps_batch1']:.0f} |"
        )
    print(f"\nfigures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
