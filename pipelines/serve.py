"""The query service: a FastAPI app over one opened :class:`Searcher`.

The index, the row metadata and the backbone are loaded once at start-up; each request
costs the embedding (image queries), the index search, and O(k) metadata lookups. Queries
are serialized by the searcher's lock, so concurrent requests never oversubscribe the CPU.

Endpoints: ``GET /health``; ``POST /query/vector`` (JSON ``{"vectors": [[...]], "k": 10}``);
``POST /query/id`` (JSON ``{"ids": [...], "k": 10}``); ``POST /query/image`` (multipart
``files``, one or more images; ``?k=10``). Bad input gets a 4xx with a ``detail`` message.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Body, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from bob_cache.errors import BobCacheError, QueryError, UnknownIdError
from bob_cache.pipelines.query import Searcher

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_BATCH = 256


def create_app(
    searcher: Searcher,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
    load_model: bool = True,
) -> FastAPI:
    """A FastAPI app answering nearest-neighbour queries against ``searcher``.

    Args:
        searcher: the opened feature set and index.
        max_upload_mb: larger request bodies get 413 before they are read.
        max_batch: most vectors, ids or images in one request.
        load_model: build the backbone now (image queries then pay no start-up cost); when
            it cannot be rebuilt, image queries answer 503 with the reason.
    """
    app = FastAPI(title="bob-cache query service", version="1")
    limit = int(max_upload_mb * 2**20)
    model_error = _preload(searcher) if load_model else None

    @app.middleware("http")
    async def refuse_oversized(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(
                status_code=413,
                content={"detail": f"Request body of {int(length)} bytes is over the "
                         f"{max_upload_mb:g} MB limit (--max-upload-mb)."},
            )  # fmt: skip
        return await call_next(request)

    @app.exception_handler(BobCacheError)
    async def user_error(request: Request, exc: BobCacheError) -> JSONResponse:
        return JSONResponse(status_code=_status(exc), content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        r = searcher.record
        return {
            "status": "ok", "feature_set": searcher.fs.path, "index": r.name, "kind": r.kind,
            "metric": r.metric, "rows": searcher.n_indexed, "dim": searcher.fs.dim,
            "recall": r.recall, "backbone": searcher.fs.attrs["backbone"].get("slug"),
            "image_queries": model_error is None, "pending_shards": len(searcher.pending_shards),
        }  # fmt: skip

    @app.post("/query/vector")
    def by_vector(
        vectors: list[list[float]] = Body(..., embed=True), k: int = Body(10, embed=True)
    ) -> dict[str, Any]:
        _check_batch(len(vectors), max_batch)
        return _answer(lambda: searcher.search(vectors, k))

    @app.post("/query/id")
    def by_id(ids: list[str] = Body(..., embed=True), k: int = Body(10, embed=True)) -> dict:
        _check_batch(len(ids), max_batch)
        return _answer(lambda: searcher.search_by_ids(ids, k))

    @app.post("/query/image")
    def by_image(files: list[UploadFile] = File(...), k: int = Query(10)) -> dict[str, Any]:
        if model_error is not None:
            raise _ServiceUnavailable(model_error)
        _check_batch(len(files), max_batch)
        blobs = [_read_upload(f, limit) for f in files]
        return _answer(lambda: searcher.search_by_images(blobs, k))

    return app


class _ServiceUnavailable(BobCacheError):
    """Image queries are off because the backbone could not be rebuilt."""


class _TooLarge(QueryError):
    """An upload or batch over the service's limits."""


def _status(exc: BobCacheError) -> int:
    if isinstance(exc, _TooLarge):
        return 413
    if isinstance(exc, _ServiceUnavailable):
        return 503
    return 404 if isinstance(exc, UnknownIdError) else 400


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
        raise _TooLarge(f"Upload '{upload.filename}' is over the {limit // 2**20} MB limit.")
    if not data:
        raise QueryError(f"Upload '{upload.filename}' is empty; send an image file.")
    return data


def _answer(run: Any) -> dict[str, Any]:
    started = time.perf_counter()
    hits = run()
    took = (time.perf_counter() - started) * 1000
    return {"took_ms": round(took, 3), "results": hits.records()}


def serve(
    searcher: Searcher,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(searcher, max_upload_mb=max_upload_mb, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="warning")
