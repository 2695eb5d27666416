"""A graph over a large IVF index's centroids for its coarse search, swapped in at search time.

An IVF search first finds the query's ``nprobe`` nearest centroids. The flat quantizer a build
trains compares the query with every centroid: at 4,096 lists of 768 floats that is 12.6 MB
read per query, 0.22 ms of a 2 ms batch-1 ``--rerank 500`` query at 10M rows, and it grows
with the list count (65,536 lists for 100M rows). :func:`use_graph` puts an HNSW graph over
the same centroids (FAISS's ``IndexHNSWFlat``, the IVF-HNSW that autofaiss builds) in the
flat quantizer's place in an opened, read-only index. The graph is approximate, but at
``efSearch`` ≥ 64 and twice ``nprobe`` it found the flat scan's lists for every one of the
10M benchmark's 1,000 queries (the same candidates, the same recall) in about 0.04 ms. It is
built at open from the stored centroids (0.35 s for 4,096), so the stored index is unchanged
and adding vectors (which must assign exactly) never goes through it; an index so changed
must not be written back (it would be saved with the graph as its quantizer).
"""

from __future__ import annotations

from typing import Any

from bob_cache.extras import import_faiss

MIN_LISTS = 2048  # below this a flat scan of the centroids costs about what the graph does
GRAPH_M = 32  # neighbours per graph node
EF_MIN = 64  # efSearch at least this, and twice nprobe


def use_graph(index: Any, *, min_lists: int | None = None) -> bool:
    """Search ``index``'s lists through an HNSW graph of its centroids; whether it now does.

    Only an IVF index with at least ``min_lists`` (:data:`MIN_LISTS`) lists and a flat
    quantizer is changed. Call it after the search parameter is set (``efSearch`` follows
    ``nprobe``); the index must only be searched afterwards.
    """
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.nlist < (MIN_LISTS if min_lists is None else min_lists):
        return False
    flat = faiss.downcast_index(ivf.quantizer)
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal != ivf.nlist:
        return False
    graph = faiss.IndexHNSWFlat(flat.d, GRAPH_M, flat.metric_type)
    graph.add(flat.reconstruct_n(0, flat.ntotal))
    if ivf.own_fields:  # the flat quantizer goes to its Python proxy: freed on return
        flat.this.own(True)
        ivf.own_fields = False
    ivf.quantizer = graph
    # the graph lives as long as the (outermost) index that points at it
    index.referenced_objects = [*getattr(index, "referenced_objects", []), graph]
    follow(index)
    return True


def follow(index: Any) -> None:
    """Keep a swapped-in graph's ``efSearch`` at ``max(EF_MIN, 2·nprobe)`` after ``nprobe``
    changed (:func:`~bob_cache.retrieval.faiss_ops.set_search_param` calls it)."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    graph = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if isinstance(graph, faiss.IndexHNSW):
        graph.hnsw.efSearch = max(EF_MIN, 2 * int(ivf.nprobe))
