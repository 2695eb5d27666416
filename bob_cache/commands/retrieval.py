"""The retrieval family: ``index build|update|ls``, ``query``, ``serve``, ``retrieval-eval``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bob_cache.commands.common import (
    BackboneOpt,
    DatasetOpt,
    DeviceOpt,
    FeatureOpt,
    JsonOpt,
    QuietOpt,
    ResultsOpt,
    StoreArg,
    StoreOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
    require_existing_store,
)
from bob_cache.extras import require

if TYPE_CHECKING:
    from bob_cache.retrieval.warm import Warmer

SplitOpt = Annotated[str, typer.Option(help="Split that forms the searchable database.")]
IndexNameOpt = Annotated[
    str | None, typer.Option("--index", help="Index name (default: the newest one).")
]
WeightsOpt = Annotated[
    str | None, typer.Option(help="Checkpoint, when the recorded weights file moved.")
]
MetricOpt = Annotated[str, typer.Option(help="cosine or l2.")]
RerankOpt = Annotated[
    int | None,
    typer.Option(
        help="Rescore the index's top K candidates exactly from the stored float16 vectors "
        "(a copy kept in the index cache), so recall is not capped by the code size. K ≥ k."
    ),
]
IndexCacheOpt = Annotated[
    str | None,
    typer.Option(
        envvar="BOB_CACHE_INDEX_CACHE",
        help="Local folder where sharded indexes are merged to disk and --rerank's vectors "
        "kept (default ~/.cache/bob-cache/indexes).",
    ),
]
RESULT_COLUMNS = ("query", "rank", "id", "class", "score")
INDEX_COLUMNS = ("name", "kind", "metric", "rows", "search_param", "search_value", "recall")
IndexShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--shards",
        help="Build an IVF index (ivf, ivfsq, ivfpq) in N parts, each a contiguous range of "
        "the store's shards, written and committed beside the set (a rerun finishes a killed "
        "build). Update: the parts the new shards are split into.",
    ),
]
IndexSchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="tcp://HOST:PORT of a running Dask cluster that computes the parts (its workers "
        "must reach the store).",
    ),
]
IndexLocalClusterOpt = Annotated[
    int | None,
    typer.Option(
        "--local-cluster", help="Compute the parts on a Dask LocalCluster of N processes."
    ),
]


@handle_errors
def index_build(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    split: SplitOpt = "train",
    kind: Annotated[
        str, typer.Option(help="auto, flat, hnsw, ivf, ivfsq (scalar codes) or ivfpq.")
    ] = "auto",
    metric: MetricOpt = "cosine",
    max_memory: Annotated[
        str | None, typer.Option(help="Memory budget of the index, e.g. 4GB (auto fits it).")
    ] = None,
    target_recall: Annotated[
        float, typer.Option(help="Recall@k the search parameter is tuned to reach.")
    ] = 0.95,
    k: Annotated[int, typer.Option("-k", help="k of the recall target.")] = 10,
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default ≈ 4·√rows).")] = None,
    m: Annotated[
        int | None, typer.Option("--pq-bytes", help="ivfpq code bytes (must divide the dim).")
    ] = None,
    bits: Annotated[
        int | None, typer.Option("--sq-bits", help="ivfsq bits per dimension: 8, 6 or 4.")
    ] = None,
    hnsw_m: Annotated[int | None, typer.Option(help="HNSW links per node (default 32).")] = None,
    name: Annotated[str | None, typer.Option(help="Index name (default: the kind).")] = None,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--no-gpu", help="faiss-gpu (default: when it sees a GPU)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild an existing index.")] = False,
    shards: IndexShardsOpt = None,
    local_cluster: IndexLocalClusterOpt = None,
    scheduler: IndexSchedulerOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a FAISS index of a feature set, tuned for a target recall."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.index import IndexConfig

    require_existing_store(store)  # the index stage opens the store for writing
    params = {"nlist": nlist, "m": m, "bits": bits, "M": hnsw_m}
    config = IndexConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, split=split,
        kind=kind, metric=metric, max_memory=max_memory, target_recall=target_recall, k=k,
        name=name, params={p: v for p, v in params.items() if v is not None}, gpu=gpu,
        force=force, quiet=quiet or as_json, shards=shards, local_cluster=local_cluster,
        scheduler=scheduler,
    )  # fmt: skip
    _print_index(get_stage("index")(config), as_json)


@handle_errors
def index_update(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    split: SplitOpt = "train",
    index: IndexNameOpt = None,
    shards: IndexShardsOpt = None,
    local_cluster: IndexLocalClusterOpt = None,
    scheduler: IndexSchedulerOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Add the feature set's newly committed rows to an existing index."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.index import IndexConfig

    require_existing_store(store)  # the index stage opens the store for writing
    config = IndexConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, split=split,
        name=index, update=True, quiet=quiet or as_json, shards=shards,
        local_cluster=local_cluster, scheduler=scheduler,
    )  # fmt: skip
    _print_index(get_stage("index")(config), as_json)


@handle_errors
def index_ls(
    store: StoreArg,
    as_json: JsonOpt = False,
) -> None:
    """List the indexes in a store."""
    from bob_cache.stores import open_store
    from bob_cache.stores.index_store import list_indexes

    require_existing_store(store)
    rows = [
        {"group": fs.path, **r.to_dict()}
        for fs in open_store(store).feature_sets()
        for r in list_indexes(fs)
    ]
    if as_json:
        print_json(rows)
    elif not rows:
        out.print(f"Store '{store}' holds no indexes yet. Build one with `bob-cache index build`.")
    else:
        print_table(rows, ("group", *INDEX_COLUMNS, "bytes"))


def _print_index(summary: Any, as_json: bool) -> None:
    if as_json:
        print_json(summary.to_dict())
        return
    r = summary.record
    verb = {
        "exists": "already exists (pass --force to rebuild)",
        "up-to-date": "is up to date",
    }.get(summary.action, summary.action)
    out.print(
        f"Index [bold]{r['name']}[/] ({r['kind']}, {r['metric']}) of {summary.group} {verb}: "
        f"{r['rows']} rows, {r['bytes'] / 2**20:.1f} MiB, {summary.seconds:.1f} s.",
        highlight=False,
    )
    if r["search_param"]:
        reached = (
            ""
            if r["recall"] >= r["target_recall"]
            else " [bold red](target not reached: the index's ceiling; give it more memory, "
            "e.g. a larger --max-memory for auto, or --sq-bits 8 / a larger --pq-bytes)[/]"
        )
        out.print(
            f"  {r['search_param']}={r['search_value']}: recall@{r['recall_k']} "
            f"{r['recall']:.3f} on {r['recall_queries']} queries drawn from the stored rows "
            f"(target {r['target_recall']}){reached}",
            highlight=False,
        )
    if r.get("rerank"):
        depths = ", ".join(
            f"{depth}: {r['search_param']}={t['value']} ({t['recall']:.3f}"
            f"{'' if t['reached'] else ', below target'})"
            for depth, t in r["rerank"].items()
        )
        out.print(f"  with --rerank K, recall@{r['recall_k']} by K: {depths}", highlight=False)
    if r.get("reason") and r["reason"] != "requested":
        out.print(f"  auto: {r['reason']}", highlight=False)


@handle_errors
def query(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    image: Annotated[list[Path] | None, typer.Option(help="Query image file (repeatable).")] = None,
    id_: Annotated[
        list[str] | None, typer.Option("--id", help="Stored row id (repeatable).")
    ] = None,
    vectors: Annotated[Path | None, typer.Option(help=".npy file of (N, D) query vectors.")] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 10,
    feature: FeatureOpt = None,
    split: SplitOpt = "train",
    index: IndexNameOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "cpu",
    rerank: RerankOpt = None,
    index_cache: IndexCacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the nearest stored images to query images, stored ids or vectors."""
    from bob_cache.errors import QueryError
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.query import QueryConfig

    given = [o for o, v in (("--image", image), ("--id", id_), ("--vectors", vectors)) if v]
    if len(given) != 1:
        raise QueryError(
            f"Pass exactly one of --image, --id or --vectors (got {', '.join(given) or 'none'})."
        )
    require_existing_store(store)
    config = QueryConfig(
        store, dataset, backbone, feature, split, index, weights, device,
        rerank=rerank, index_cache=index_cache,
    )  # fmt: skip
    searcher = get_stage("query")(config)
    if image:
        table = searcher.search_images([str(p) for p in image], k)
        names = [str(p) for p in image]
    elif id_:
        table = searcher.search_ids(id_, k)
        names = list(id_)
    else:
        table = searcher.search_vectors(_load_vectors(vectors), k)
        names = [f"vector {i}" for i in range(int(table["query"].max()) + 1)]
    _print_notes(searcher)
    table["query"] = [names[q] for q in table["query"]]
    records = table.drop(columns=["query_id"], errors="ignore").to_dict(orient="records")
    if as_json:
        print_json(records)
    else:
        print_table(records, (*RESULT_COLUMNS[:2], "id", "label", "class", "score"))


def _print_notes(searcher: Any) -> None:
    if searcher.note:
        err.print(f"  note: {searcher.note}", highlight=False)
    if searcher.pending_shards:
        err.print(
            f"  note: {len(searcher.pending_shards)} committed shard(s) are not indexed yet; "
            "run `bob-cache index update` to search them too."
        )


def _load_vectors(path: Path | None) -> Any:
    import numpy as np

    from bob_cache.errors import DataNotFoundError, QueryError

    if path is None or not path.is_file():
        raise DataNotFoundError(f"Vectors file '{path}' does not exist. Pass a .npy file.")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise QueryError(
            f"Cannot read '{path}' as a .npy array ({exc}). Save vectors with numpy.save."
        ) from exc


@handle_errors
def serve(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    split: SplitOpt = "train",
    index: IndexNameOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "cpu",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body.")] = 20.0,
    max_batch: Annotated[
        int, typer.Option(help="Most queries per request (it also sizes the JSON body limit).")
    ] = 256,
    max_image_mp: Annotated[
        float,
        typer.Option(
            help="Largest image (megapixels, from its header) a request may hold or a "
            "thumbnail be made from."
        ),
    ] = 40.0,
    max_request_mp: Annotated[
        float, typer.Option(help="Most megapixels decoded for one request, all images together.")
    ] = 200.0,
    images_root: Annotated[
        Path | None,
        typer.Option(help="Where the images are now, if moved (the search page's thumbnails)."),
    ] = None,
    rerank: RerankOpt = None,
    index_cache: IndexCacheOpt = None,
    warm: Annotated[
        bool,
        typer.Option(
            help="Page the memory-mapped index files (on-disk lists, the --rerank vectors) "
            "in while serving, when they fit in memory: the first queries then skip the disk."
        ),
    ] = True,
) -> None:
    """Serve nearest-neighbour queries over HTTP: JSON endpoints and a search page at /."""
    require("serve", "The query service")
    from bob_cache.data.thumbnails import thumbnail_problem
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.query import QueryConfig
    from bob_cache.pipelines.serve import serve as run_server

    require_existing_store(store)
    config = QueryConfig(
        store, dataset, backbone, feature, split, index, weights, device,
        rerank=rerank, index_cache=index_cache,
    )  # fmt: skip
    searcher = get_stage("query")(config)
    err.print(
        f"Serving {searcher.fs.path} ({searcher.index_kind}, {searcher.n_indexed} rows) "
        f"on http://{host}:{port} — search page at /, GET /health, "
        "POST /query/image|id|vector. Ctrl-C stops.",
        highlight=False,
    )
    _print_notes(searcher)
    warmer = searcher.warmer()
    if warm:
        _print_warm_plan(warmer)
    problem = thumbnail_problem(searcher.fs.attrs.get("dataset", {}), images_root)
    if problem:
        err.print(f"  note: {problem}", highlight=False)
    run_server(
        searcher, host=host, port=port, max_upload_mb=max_upload_mb, max_batch=max_batch,
        max_image_mp=max_image_mp, max_request_mp=max_request_mp, images_root=images_root,
        warm=warm, warmer=warmer,
    )  # fmt: skip


def _print_warm_plan(warmer: Warmer) -> None:
    """Say whether the mapped index files will be paged in while serving, and why not."""
    from bob_cache.units import size_text

    if not warmer.regions:
        return
    reason = warmer.plan()
    if reason:
        err.print(f"  note: not warming: {reason}", highlight=False)
    else:
        err.print(
            f"  Paging in {size_text(warmer.total)} of memory-mapped index files in the "
            "background (GET /health: warm); queries are answered meanwhile.",
            highlight=False,
        )


@handle_errors
def retrieval_eval(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    split: SplitOpt = "train",
    protocol: Annotated[str, typer.Option(help="classes or gnd.")] = "classes",
    gnd: Annotated[
        str | None,
        typer.Option(
            help='Ground truth (JSON {"imlist", "qimlist", "gnd": [{"easy","hard","junk"}]} '
            "or a revisitop gnd_*.pkl) for --protocol gnd (default: the file a "
            "revisitop:NAME:ROOT set recorded at extraction)."
        ),
    ] = None,
    query_split: Annotated[
        str | None,
        typer.Option(
            help="gnd: split holding the query images (default: the query split a revisitop "
            "set recorded, else --split)."
        ),
    ] = None,
    query_fraction: Annotated[
        float, typer.Option(help="classes: share of each class used as queries.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="classes: seed of the query draw.")] = 0,
    metric: MetricOpt = "cosine",
    metrics_definition: Annotated[
        str | None,
        typer.Option(
            help="How AP and precision@k are computed: sklearn (scikit-learn's AP, hits in "
            "top k / k; the classes default) or revisitop (revisitop's compute_map as in BoB's "
            "published numbers: trapezoidal AP, k capped at the last positive's rank; the gnd "
            "default). Recorded in every row."
        ),
    ] = None,
    results: ResultsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun a config already in results.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retrieval mAP, precision/recall@{1,5,10} and MRR from cached features."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.retrieval_eval import RetrievalEvalConfig

    require_existing_store(store)
    config = RetrievalEvalConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, split=split,
        protocol=protocol, gnd=gnd, query_split=query_split, query_fraction=query_fraction,
        seed=seed, metric=metric, metrics_definition=metrics_definition or "", results=results,
        force=force,
    )  # fmt: skip
    s = get_stage("retrieval-eval")(config)
    if as_json:
        print_json(s.to_dict())
        return
    state = "already in" if s.skipped else "added to"
    out.print(
        f"Retrieval on [bold]{s.dataset}[/] × [bold]{s.backbone}[/] ({s.protocol}, "
        f"{s.metrics_definition} metrics, {s.database_rows} database rows): {state} "
        f"{s.results} ({s.seconds:.1f} s).",
        highlight=False,
    )
    rows = [
        {"method": method, "queries": s.queries.get(method, "—"), **{
            m: f"{v:.4f}" for m, v in values.items()}}
        for method, values in s.metrics.items()
    ]  # fmt: skip
    metrics = ("map", "precision@1", "precision@5", "precision@10", "recall@10", "mrr")
    print_table(rows, ("method", "queries", *metrics))


def register(app: typer.Typer) -> None:
    """Add the retrieval family's commands (and the ``index`` sub-app) to ``app``."""
    index_app = typer.Typer(
        help="Build and update FAISS indexes stored beside their feature sets.",
        no_args_is_help=True,
    )
    index_app.command(
        "build",
        epilog="Example: bob-cache index build --store ./bob-store --dataset digits "
        "--backbone resnet18 --kind auto --max-memory 4GB",
    )(index_build)
    index_app.command(
        "update",
        epilog="Example: bob-cache index update --store ./bob-store --dataset digits "
        "--backbone resnet18",
    )(index_update)
    index_app.command("ls", epilog="Example: bob-cache index ls ./bob-store")(index_ls)
    app.add_typer(index_app, name="index")
    app.command(
        epilog="Example: bob-cache query --store ./bob-store --dataset digits --backbone "
        "resnet18 --image cat.jpg -k 5"
    )(query)
    app.command(
        epilog="Example: bob-cache serve --store ./bob-store --dataset digits --backbone "
        "resnet18 --port 8000"
    )(serve)
    app.command(
        "retrieval-eval",
        epilog="Example: bob-cache retrieval-eval --store ./bob-store --dataset digits "
        "--backbone resnet18 --protocol classes",
    )(retrieval_eval)
