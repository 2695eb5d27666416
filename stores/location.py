"""Where a store lives: local directory (the default), any fsspec URL, or a zarr Store.

Loose inputs are converted once here; everything else receives a zarr ``Store``. OS errors
from writes are translated into bob-cache errors that say how to recover.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from bob_cache.errors import StoreError, StoreFullError, StoreNotFoundError, StoreNotWritableError

StoreLike = str | Path | Store

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def is_url(location: StoreLike) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def open_zarr_store(
    location: StoreLike, *, mode: str = "r", storage_options: dict[str, Any] | None = None
) -> Store:
    """Return a zarr Store for ``location``.

    Args:
        location: local path, ``file://`` path, fsspec URL (``s3://bucket/prefix``,
            ``memory://name``) or an existing zarr Store.
        mode: ``r`` (must exist, read-only) or ``a`` (created if missing, must be writable).
        storage_options: passed to fsspec for URLs (credentials, endpoint_url, ...).
    """
    if isinstance(location, Store):
        return location
    read_only = mode == "r"
    if is_url(location):
        try:
            return FsspecStore.from_url(
                location, storage_options=storage_options, read_only=read_only
            )
        except (ImportError, ValueError) as exc:
            raise StoreError(
                f"Cannot open store URL '{location}': {exc}. For s3:// install the s3 extra "
                "(pip install 'bob-cache[s3]'); pass credentials via storage options or the "
                "usual environment variables."
            ) from exc
    path = Path(str(location).removeprefix("file://")).expanduser()
    if read_only:
        if not path.is_dir():
            raise StoreNotFoundError(
                f"No feature store at '{location}'. Create one with `bob-cache extract --store "
                f"{location} ...`, or check the path."
            )
    else:
        _check_writable(path, location)
    return KeyedLocalStore(path.resolve(), read_only=read_only)


class KeyedLocalStore(LocalStore):
    """zarr's LocalStore with its listings' keys taken relative to the root.

    zarr 3.1's ``list``/``list_prefix`` strip the root by string replacement, which also cuts
    every later occurrence: a store at ``st`` lists ``.../digest/c/0`` as ``.../digec/0`` (and
    one at ``test`` mangles every ``test`` split), so a committed object would read as missing.
    """

    async def list(self) -> AsyncIterator[str]:
        for p in list(self.root.rglob("*")):
            if p.is_file():
                yield p.relative_to(self.root).as_posix()

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for p in (self.root / prefix.rstrip("/")).rglob("*"):
            if p.is_file():
                yield p.relative_to(self.root).as_posix()


def _check_writable(path: Path, location: StoreLike) -> None:
    probe = path / f".bob-cache-write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreNotWritableError(
            f"Store location '{location}' is not writable ({os.strerror(exc.errno or 0) or exc}). "
            "Pass --store with a directory you can write to (it is created if missing), or "
            "fix its permissions."
        ) from exc


@contextlib.contextmanager
def translate_write_errors(location: str, what: str) -> Iterator[None]:
    """Turn OS errors raised while writing ``what`` into errors that name the recovery."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, StoreError):
            raise
        code = exc.errno
        if code in _FULL:
            raise StoreFullError(
                f"The store at '{location}' ran out of space while writing {what} "
                f"({os.strerror(code)}). Everything committed before it is intact. Free some "
                "space (or raise the quota), then rerun the same command: it resumes from the "
                "first uncommitted shard."
            ) from exc
        if code in _DENIED:
            raise StoreNotWritableError(
                f"The store at '{location}' refused a write of {what} ({os.strerror(code)}). "
                "Fix the permissions or pass a writable --store; rerun to resume."
            ) from exc
        raise StoreError(f"Writing {what} to the store at '{location}' failed: {exc}.") from exc


@contextlib.contextmanager
def translate_remote_errors(location: StoreLike) -> Iterator[None]:
    """Failures to reach an object store (endpoint, credentials, bucket) → one
    :class:`StoreError` that names the settings to check. Local paths pass through."""
    if not is_url(location):
        yield
        return
    try:
        yield
    except (StoreError, KeyError):
        raise
    except Exception as exc:  # botocore/s3fs/aiohttp raise many kinds; all mean "cannot reach"
        if type(exc).__module__.split(".")[0] not in _REMOTE_MODULES and not isinstance(
            exc, PermissionError | ConnectionError | TimeoutError
        ):
            raise
        raise StoreError(
            f"'{location}' cannot be reached ({type(exc).__name__}: {exc}). Check the URL, the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile) and the "
            "endpoint (AWS_ENDPOINT_URL for S3-compatible servers)."
        ) from exc


_REMOTE_MODULES = {"botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "adlfs", "fsspec"}


def remote_failure(exc: BaseException) -> BaseException | None:
    """The object-store client's error behind ``exc`` (itself, or one it was raised from),
    or None: how a failure mid-run (not at open) is told from a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.split(".")[0] in _REMOTE_MODULES:
            return current
        current = current.__cause__ or current.__context__
    return None


def remote_failure_message(exc: BaseException) -> str:
    """What to say when the object store stops answering mid-run."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return (
        f"The object store stopped answering ({detail}). Check the URL, the credentials "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile), the endpoint (AWS_ENDPOINT_URL "
        "for S3-compatible servers) and the network, then rerun the same command: committed "
        "shards, stored artifacts and results rows are kept."
    )


async def _put_exclusive(store: Store, key: str, data: bytes) -> bool:
    buffer = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, FsspecStore):
        path = f"{store.path.rstrip('/')}/{key}"
        try:
            await store.fs._pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # no conditional writes: best effort below
            pass
    if await store.exists(key):
        return False
    if isinstance(store, LocalStore):  # an exclusive link: exactly one racer creates it
        await store.set_if_not_exists(key, buffer)
        return (await store.get(key, default_buffer_prototype())).to_bytes() == data
    await store.set_if_not_exists(key, buffer)
    return True


def put_exclusive(store: Store, key: str, data: bytes) -> bool:
    """Create object ``key`` only if it does not exist yet; True when this call created it.

    Local directories use an exclusive link, object stores a conditional PUT
    (``If-None-Match: *``) where the backend supports it; others fall back to check-then-set.
    """
    return sync(_put_exclusive(store, key, data))
