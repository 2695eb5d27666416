"""The query service: a FastAPI app over one opened :class:`Searcher`.

The index, the row metadata and the backbone are loaded once at start-up; each request
costs the embedding (image queries), the index search, and O(k) metadata lookups. Queries
run on the searcher's one compute thread, so concurrent requests never oversubscribe the CPU.

Endpoints: ``GET /health``; ``GET /metrics`` (Prometheus: requests, latency by phase, what
is served; :mod:`~bob_cache.pipelines.serve_metrics`); ``POST /query/vector`` (JSON
``{"vectors": [[...]], "k": 10}``); ``POST /query/id`` (JSON ``{"ids": [...], "k": 10}``);
``POST /query/image`` (multipart ``files``, one or more images; ``?k=10``). Bad input gets a
4xx with a ``detail`` message. ``GET /`` is a search page over those (upload an image or type
an id, see the neighbours as thumbnails); ``GET /thumb/{id}`` is a row's JPEG thumbnail, read
only from under the images root (anything else, whatever the id spells, gets 404).

Bad requests cannot hurt the service, and heavy legal ones cost what the limits allow:
request bodies are counted as they arrive (chunked ones too) and refused with 413 the moment
they pass ``max_upload_mb``, or for the JSON endpoints a smaller limit sized to ``max_batch``
queries of the set's dimension (:func:`json_body_limit`); a refused body is drained, so a
streaming client reads the 413 rather than a reset (:mod:`~bob_cache.pipelines.body_limit`).
JSON is parsed with orjson on a worker thread, never on the event loop, straight into a
float32 array; image headers, uploads' and thumbnails' alike, are checked against
per-image and per-request pixel limits before anything is decoded; ragged or non-finite
vectors and ids of rows without features get 4xx before any search. A feature set without a
built index is searched exactly, and ``/health`` and every answer say so. A damaged set or
index (a missing object, one that fails its checksum) turns ``/health`` to ``"damaged"``
(503) and every query to 503, naming the shard and the repair
(:mod:`~bob_cache.pipelines.serve_health`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bob_cache.data.thumbnails import Thumbnails
from bob_cache.errors import (
    BobCacheError,
    DamagedDataError,
    ImageTooLargeError,
    QueryError,
    ThumbnailNotFoundError,
    UnknownIdError,
)
from bob_cache.pipelines.body_limit import BodyLimit, Limit
from bob_cache.pipelines.query import Searcher
from bob_cache.pipelines.serve_health import HEALTH_TTL, Integrity
from bob_cache.pipelines.serve_metrics import MetricsMiddleware, ServiceMetrics
from bob_cache.retrieval.warm import Warmer

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_IMAGE_MP = 40.0  # megapixels one uploaded image may decode to
DEFAULT_MAX_REQUEST_MP = 200.0  # megapixels all images of one request may decode to
THUMB_CACHE_CONTROL = "public, max-age=86400"
# The JSON endpoints' body limit: max_batch queries of this many bytes each, plus slack.
BYTES_PER_VALUE = 32  # a float as JSON text: up to 24 characters, a separator, indentation
BYTES_PER_ID = 4104  # an id: a path of up to 4096 bytes, quoted, and a separator
JSON_SLACK = 64 * 2**10
JSON_PATHS = ("/query/vector", "/query/id")


def create_app(
    searcher: Searcher,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_image_mp: float = DEFAULT_MAX_IMAGE_MP,
    max_request_mp: float = DEFAULT_MAX_REQUEST_MP,
    load_model: bool = True,
    images_root: str | Path | None = None,
    health_ttl: float = HEALTH_TTL,
    warm: bool = True,
    warmer: Warmer | None = None,
) -> FastAPI:
    """A FastAPI app answering nearest-neighbour queries against ``searcher``.

    Args:
        searcher: the opened feature set and index.
        max_upload_mb: request bodies get 413 as soon as they pass this size (a declared
            ``Content-Length`` before any byte is read; a chunked body as it arrives).
        max_batch: most vectors, ids or images in one request; it also sizes the JSON
            endpoints' body limit (:func:`json_body_limit`, never above ``max_upload_mb``).
        max_image_mp: an uploaded image, or a row's image for its thumbnail, whose header
            claims more megapixels gets 413 before it is decoded.
        max_request_mp: the same for all images of one request together.
        load_model: build the backbone now (image queries then pay no start-up cost); when
            it cannot be rebuilt, image queries answer 503 with the reason.
        images_root: the folder the images are in now, when they moved since extraction
            (default: the one in the feature set's provenance).
        health_ttl: seconds between two checks that the stored set and index are intact.
        warm: page the memory-mapped index files in while the service runs, when they fit
            in memory (:mod:`bob_cache.retrieval.warm`; ``/health`` shows how far).
        warmer: the :class:`~bob_cache.retrieval.warm.Warmer` to run (default: a new one
            from ``searcher``; the command line passes the one whose plan it printed).
    """
    warmer = warmer or searcher.warmer()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if warm:
            warmer.start()
        else:
            warmer.off("--no-warm: pages are read from disk as queries first touch them")
        try:
            yield
        finally:
            warmer.stop()

    app = FastAPI(title="bob-cache query service", version="1", lifespan=lifespan)
    upload = Limit(int(max_upload_mb * 2**20), "(--max-upload-mb)")
    pixels = {
        "max_image_pixels": int(max_image_mp * 1e6),
        "max_request_pixels": int(max_request_mp * 1e6),
    }
    model_error = _preload(searcher) if load_model else None
    integrity = Integrity(searcher, ttl=health_ttl)
    thumbs = Thumbnails(
        searcher.fs.attrs.get("dataset", {}), frozenset(map(str, searcher.ids)),
        images_root=images_root, max_pixels=pixels["max_image_pixels"],
    )  # fmt: skip
    page = files("bob_cache.pipelines").joinpath("static", "search.html").read_text("utf-8")
    json_limit = _json_limit(upload, max_batch, searcher.fs.dim)
    app.add_middleware(BodyLimit, default=upload, by_path=dict.fromkeys(JSON_PATHS, json_limit))
    metrics = ServiceMetrics(searcher)
    searcher.observe = metrics.observe
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too

    @app.exception_handler(BobCacheError)
    async def user_error(request: Request, exc: BobCacheError) -> JSONResponse:
        if isinstance(exc, DamagedDataError):
            integrity.seen(exc)
        return JSONResponse(status_code=_status(exc), content={"detail": str(exc)})

    @app.get("/health")
    def health() -> JSONResponse:
        damage, r = integrity.check(), searcher.record
        return JSONResponse(status_code=503 if damage else 200, content={
            "status": "damaged" if damage else "ok", **({"damage": damage} if damage else {}),
            "feature_set": searcher.fs.path, "index": searcher.index_name,
            "kind": searcher.index_kind, "metric": r.metric, "rows": searcher.n_indexed,
            "on_disk": searcher.on_disk, "rerank": searcher.rerank_depth,
            "dim": searcher.fs.dim, "recall": searcher.expected_recall,
            "search_param": r.search_param, "search_value": searcher.search_value,
            "coarse_graph": searcher.coarse_graph,
            "backbone": searcher.fs.attrs["backbone"].get("slug"),
            "image_queries": model_error is None, "pending_shards": len(searcher.pending_shards),
            "max_batch": max_batch, "max_json_bytes": json_limit.bytes,
            "thumbnails": thumbs.available, "warm": warmer.status(), **_note(searcher),
            **({"thumbnails_note": thumbs.problem} if thumbs.problem else {}),
        })  # fmt: skip

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/thumb/{row_id:path}", response_class=Response, responses={404: {}, 413: {}})
    def thumbnail(row_id: str) -> Response:
        data = thumbs.jpeg(row_id)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": THUMB_CACHE_CONTROL})  # fmt: skip

    def answer_json(
        body: bytes, field: str, search: Callable[[list, int], Any], endpoint: str
    ) -> Response:
        _check_intact(integrity)
        with _timed(metrics, "parse"):
            items, k = parse_json_query(body, field)
        _check_batch(len(items), max_batch)
        answer = _answer(searcher, lambda: search(items, k), metrics)
        with _timed(metrics, "encode"):
            encoded = orjson.dumps(answer)
        metrics.queries.labels(endpoint).inc(len(items))
        return Response(encoded, media_type="application/json")

    @app.post("/query/vector", openapi_extra=_json_schema("vectors", {"type": "number"}))
    async def by_vector(request: Request) -> Response:
        """``{"vectors": [[...], ...], "k": 10}``: neighbours of each vector."""
        body = await request.body()
        return await run_in_threadpool(
            answer_json, body, "vectors", searcher.search, "/query/vector"
        )

    @app.post("/query/id", openapi_extra=_json_schema("ids", {"type": "string"}))
    async def by_id(request: Request) -> Response:
        """``{"ids": ["..."], "k": 10}``: neighbours of stored rows (each leaves itself out)."""
        body = await request.body()
        return await run_in_threadpool(
            answer_json, body, "ids", searcher.search_by_ids, "/query/id"
        )

    @app.post("/query/image")
    def by_image(files: list[UploadFile] = File(...), k: int = Query(10)) -> dict[str, Any]:
        if model_error is not None:
            raise _ServiceUnavailable(model_error)
        _check_intact(integrity)
        _check_batch(len(files), max_batch)
        with _timed(metrics, "read"):
            blobs = [_read_upload(f, upload.bytes) for f in files]
        answer = _answer(searcher, lambda: searcher.search_by_images(blobs, k, **pixels), metrics)
        metrics.queries.labels("/query/image").inc(len(blobs))
        return answer

    return app


def json_body_limit(max_batch: int, dim: int) -> int:
    """Bytes of the largest legal JSON query: ``max_batch`` rows of ``dim`` numbers (or ids),
    written out in full precision, plus slack."""
    return max_batch * max(dim * BYTES_PER_VALUE, BYTES_PER_ID) + JSON_SLACK


def _json_limit(upload: Limit, max_batch: int, dim: int) -> Limit:
    size = json_body_limit(max_batch, dim)
    if size >= upload.bytes:
        return upload
    return Limit(size, f"for JSON queries (--max-batch {max_batch} queries of {dim} values); "
                       "send fewer queries per request")  # fmt: skip


def parse_json_query(body: bytes, field: str) -> tuple[list[Any], int]:
    """``(items, k)`` of a JSON query body ``{field: [...], "k": 10}``.

    Parsed with orjson (a 4 MB body in ~20 ms, no per-number Python work beyond one float);
    JSON has no NaN or Infinity, which careless clients send anyway: such a body is parsed
    by the standard library (bounded by the body limit), so the answer names the rows.

    Raises:
        QueryError: the body is not JSON (400); the wrong shape or types (422).
    """
    example = f'{{"{field}": [...], "k": 10}}'
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not _NON_FINITE.search(body):
            raise QueryError(f"The request body is not JSON ({exc}). Send {example}.") from exc
        data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise _Unprocessable(f"The request body must be a JSON object {example}, with "
                             f"'{field}' a list.")  # fmt: skip
    k = data.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool):
        raise _Unprocessable(f"'k' must be an integer, got {json.dumps(k)[:40]}.")
    items = data[field]
    if field == "ids" and not all(isinstance(i, str) for i in items):
        raise _Unprocessable("'ids' must be a list of strings (row ids).")
    return items, k


_NON_FINITE = re.compile(rb"NaN|Infinity")


def _json_schema(field: str, item: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a JSON query endpoint (parsed by hand, not by FastAPI)."""
    items = {"type": "array", "items": item} if field == "vectors" else item
    schema = {
        "type": "object",
        "required": [field],
        "properties": {
            field: {"type": "array", "items": items},
            "k": {"type": "integer", "default": 10},
        },
    }
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}  # fmt: skip


def _check_intact(integrity: Integrity) -> None:
    damage = integrity.check()
    if damage is not None:
        raise _Damaged(damage)


class _ServiceUnavailable(BobCacheError):
    """Image queries are off because the backbone could not be rebuilt."""


class _Damaged(BobCacheError):
    """The stored set or index is damaged (queries answer 503 until a restart)."""


class _TooLarge(QueryError):
    """An upload or batch over the service's limits."""


class _Unprocessable(QueryError):
    """A JSON body of the wrong shape or types (422, as FastAPI's own validation)."""


def _status(exc: BobCacheError) -> int:
    if isinstance(exc, (_TooLarge, ImageTooLargeError)):
        return 413
    if isinstance(exc, (_ServiceUnavailable, _Damaged, DamagedDataError)):
        return 503
    if isinstance(exc, _Unprocessable):
        return 422
    return 404 if isinstance(exc, (UnknownIdError, ThumbnailNotFoundError)) else 400


def _preload(searcher: Searcher) -> str | None:
    try:
        _ = searcher.embedder
    except BobCacheError as exc:
        return f"Image queries are unavailable: {exc}"
    except Exception as exc:  # a provenance this installation cannot rebuild
        return f"Image queries are unavailable: {type(exc).__name__}: {exc}"
    return None


def _check_batch(n: int, max_batch: int) -> None:
    if n == 0:
        raise QueryError("The request holds no queries; send at least one.")
    if n > max_batch:
        raise _TooLarge(f"{n} queries in one request is over the limit of {max_batch} "
                        "(--max-batch); split the batch.")  # fmt: skip


def _read_upload(upload: Any, limit: int) -> bytes:
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(
            f"Upload '{upload.filename}' is over the {limit / 2**20:g} MB limit (--max-upload-mb)."
        )
    if not data:
        raise QueryError(f"Upload '{upload.filename}' is empty; send an image file.")
    return data


def _answer(searcher: Searcher, run: Any, metrics: ServiceMetrics) -> dict[str, Any]:
    started = time.perf_counter()
    hits = run()
    with _timed(metrics, "records"):
        records = hits.records()
    took = (time.perf_counter() - started) * 1000
    return {"took_ms": round(took, 3), "results": records, **_note(searcher)}


@contextmanager
def _timed(metrics: ServiceMetrics, phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.observe(phase, time.perf_counter() - started)


def _note(searcher: Searcher) -> dict[str, str]:
    """``{"note": ...}`` when queries are answered in a way users should know (else {})."""
    return {"note": searcher.note} if searcher.note else {}


def serve(
    searcher: Searcher,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_image_mp: float = DEFAULT_MAX_IMAGE_MP,
    max_request_mp: float = DEFAULT_MAX_REQUEST_MP,
    images_root: str | Path | None = None,
    warm: bool = True,
    warmer: Warmer | None = None,
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(
        searcher, max_upload_mb=max_upload_mb, max_batch=max_batch,
        max_image_mp=max_image_mp, max_request_mp=max_request_mp, images_root=images_root,
        warm=warm, warmer=warmer,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
