"""The query service: a FastAPI app over one opened :class:`Searcher`.

The index, the row metadata and the backbone are loaded once at start-up; each request
costs the embedding (image queries), the index search, and O(k) metadata lookups. Queries
are serialized by the searcher's lock, so concurrent requests never oversubscribe the CPU.

Endpoints: ``GET /health``; ``POST /query/vector`` (JSON ``{"vectors": [[...]], "k": 10}``);
``POST /query/id`` (JSON ``{"ids": [...], "k": 10}``); ``POST /query/image`` (multipart
``files``, one or more images; ``?k=10``). Bad input gets a 4xx with a ``detail`` message.
``GET /`` is a search page over those (upload an image or type an id, see the neighbours as
thumbnails); ``GET /thumb/{id}`` is a row's JPEG thumbnail, read only from under the images
root (anything else, whatever the id spells, gets 404).

Bad requests cannot hurt the service: request bodies are counted as they arrive (chunked
ones too) and refused with 413 the moment they pass ``max_upload_mb``; image headers are
checked against per-image and per-request pixel limits before anything is decoded; ragged
or non-finite vectors and ids of rows without features get 4xx before any search. A feature
set without a built index is searched exactly, and ``/health`` and every answer say so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bob_cache.data.thumbnails import Thumbnails
from bob_cache.errors import (
    BobCacheError,
    ImageTooLargeError,
    QueryError,
    ThumbnailNotFoundError,
    UnknownIdError,
)
from bob_cache.pipelines.query import Searcher

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_IMAGE_MP = 40.0  # megapixels one uploaded image may decode to
DEFAULT_MAX_REQUEST_MP = 200.0  # megapixels all images of one request may decode to
THUMB_CACHE_CONTROL = "public, max-age=86400"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(
    searcher: Searcher,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_image_mp: float = DEFAULT_MAX_IMAGE_MP,
    max_request_mp: float = DEFAULT_MAX_REQUEST_MP,
    load_model: bool = True,
    images_root: str | Path | None = None,
) -> FastAPI:
    """A FastAPI app answering nearest-neighbour queries against ``searcher``.

    Args:
        searcher: the opened feature set and index.
        max_upload_mb: request bodies get 413 as soon as they pass this size (a declared
            ``Content-Length`` before any byte is read; a chunked body as it arrives).
        max_batch: most vectors, ids or images in one request.
        max_image_mp: an uploaded image whose header claims more megapixels gets 413
            before it is decoded.
        max_request_mp: the same for all images of one request together.
        load_model: build the backbone now (image queries then pay no start-up cost); when
            it cannot be rebuilt, image queries answer 503 with the reason.
        images_root: the folder the images are in now, when they moved since extraction
            (default: the one in the feature set's provenance).
    """
    app = FastAPI(title="bob-cache query service", version="1")
    limit = int(max_upload_mb * 2**20)
    pixels = {
        "max_image_pixels": int(max_image_mp * 1e6),
        "max_request_pixels": int(max_request_mp * 1e6),
    }
    model_error = _preload(searcher) if load_model else None
    thumbs = Thumbnails(
        searcher.fs.attrs.get("dataset", {}), frozenset(map(str, searcher.ids)),
        images_root=images_root,
    )  # fmt: skip
    page = files("bob_cache.pipelines").joinpath("static", "search.html").read_text("utf-8")
    app.add_middleware(BodyLimit, limit=limit, limit_mb=max_upload_mb)

    @app.exception_handler(BobCacheError)
    async def user_error(request: Request, exc: BobCacheError) -> JSONResponse:
        return JSONResponse(status_code=_status(exc), content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        r = searcher.record
        return {
            "status": "ok", "feature_set": searcher.fs.path, "index": searcher.index_name,
            "kind": searcher.index_kind, "metric": r.metric, "rows": searcher.n_indexed,
            "dim": searcher.fs.dim, "recall": r.recall,
            "backbone": searcher.fs.attrs["backbone"].get("slug"),
            "image_queries": model_error is None, "pending_shards": len(searcher.pending_shards),
            "thumbnails": thumbs.available, **_note(searcher),
            **({"thumbnails_note": thumbs.problem} if thumbs.problem else {}),
        }  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/thumb/{row_id:path}", response_class=Response, responses={404: {}})
    def thumbnail(row_id: str) -> Response:
        data = thumbs.jpeg(row_id)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": THUMB_CACHE_CONTROL})  # fmt: skip

    @app.post("/query/vector")
    def by_vector(
        vectors: list[list[float]] = Body(..., embed=True), k: int = Body(10, embed=True)
    ) -> dict[str, Any]:
        _check_batch(len(vectors), max_batch)
        return _answer(searcher, lambda: searcher.search(vectors, k))

    @app.post("/query/id")
    def by_id(ids: list[str] = Body(..., embed=True), k: int = Body(10, embed=True)) -> dict:
        _check_batch(len(ids), max_batch)
        return _answer(searcher, lambda: searcher.search_by_ids(ids, k))

    @app.post("/query/image")
    def by_image(files: list[UploadFile] = File(...), k: int = Query(10)) -> dict[str, Any]:
        if model_error is not None:
            raise _ServiceUnavailable(model_error)
        _check_batch(len(files), max_batch)
        blobs = [_read_upload(f, limit) for f in files]
        return _answer(searcher, lambda: searcher.search_by_images(blobs, k, **pixels))

    return app


class _BodyTooLarge(Exception):
    """Raised into the app when a request body passes the limit (the app never answers it)."""


class BodyLimit:
    """Pure ASGI middleware refusing request bodies over ``limit`` bytes with 413.

    A declared ``Content-Length`` over the limit is refused before any byte is read. Every
    body (chunked ones have no length) is counted as ``receive()`` hands it to the app: the
    moment the count passes the limit, the app's read fails, whatever it answers is dropped,
    and the client gets 413 with ``Connection: close`` (the rest of the body is never read).
    """

    def __init__(self, app: ASGIApp, *, limit: int, limit_mb: float) -> None:
        self.app, self.limit, self.limit_mb = app, limit, limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await self._refuse(send, f"Request body of {length} bytes is")
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over:  # the app's own answer to a body cut short
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, f"Request body (more than {self.limit} bytes so far) is")

    async def _refuse(self, send: Send, what: str) -> None:
        detail = f"{what} over the {self.limit_mb:g} MB limit (--max-upload-mb)."
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the unread rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class _ServiceUnavailable(BobCacheError):
    """Image queries are off because the backbone could not be rebuilt."""


class _TooLarge(QueryError):
    """An upload or batch over the service's limits."""


def _status(exc: BobCacheError) -> int:
    if isinstance(exc, (_TooLarge, ImageTooLargeError)):
        return 413
    if isinstance(exc, _ServiceUnavailable):
        return 503
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


def _answer(searcher: Searcher, run: Any) -> dict[str, Any]:
    started = time.perf_counter()
    hits = run()
    took = (time.perf_counter() - started) * 1000
    return {"took_ms": round(took, 3), "results": hits.records(), **_note(searcher)}


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
) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(
        searcher, max_upload_mb=max_upload_mb, max_batch=max_batch,
        max_image_mp=max_image_mp, max_request_mp=max_request_mp, images_root=images_root,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
