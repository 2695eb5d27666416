"""Small JPEG thumbnails of a feature set's rows, read from the images its provenance records.

A folder set's images are ``root / id`` under the folder given to ``--data``; a manifest
set's are the files its manifest lists (under their common folder); a built-in set's are
rendered in memory; any other source (a dataset as distributed: torchvision, WebDataset shards,
parquet, ...) is listed again from its recorded ``--data`` value and each row's image read
through it. ``images_root`` replaces the recorded folder when a folder's images moved.

Only ids of the feature set are served, and only from files whose real path (symlinks
resolved) lies inside the images root: anything else raises
:class:`~bob_cache.errors.ThumbnailNotFoundError`, whatever the id spells.

Memory is bounded whatever the images are: an image's header is read first and one that
would decode to more than ``max_pixels`` (after a JPEG's reduced-scale draft) is refused with
:class:`~bob_cache.errors.ImageTooLargeError`; decodes in flight share that same pixel budget
(one waits for another rather than both holding full-size pixels); concurrent requests for
one id decode it once; and the cache of finished thumbnails is bounded in count and bytes.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bob_cache.errors import ImageTooLargeError, ThumbnailNotFoundError

THUMB_SIZE = 160  # longest side, pixels
CACHE_SIZE = 1024  # thumbnails kept in memory (a few KB each)
CACHE_BYTES = 32 * 2**20  # and at most this many bytes of them
MAX_PIXELS = 40_000_000  # decoded pixels of one image (the uploads' --max-image-mp default)
JPEG_QUALITY = 85
FILE_KINDS = ("folder", "manifest")  # served from files under an images root


class Thumbnails:
    """JPEG thumbnails of the rows named by ``ids``, cached (bounded, least recently used).

    Args:
        dataset: the feature set's ``dataset`` provenance (``kind``, ``origin``).
        ids: the feature set's row ids; no other id is ever served.
        images_root: the folder the images are in now (default: the recorded one).
        size: longest side of a thumbnail.
        cache_size: most thumbnails kept in memory.
        cache_bytes: most bytes of thumbnails kept in memory.
        max_pixels: most pixels one image may decode to (and all decodes in flight
            together); a larger image's thumbnail is refused from its header.
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        ids: Collection[str],
        *,
        images_root: str | Path | None = None,
        size: int = THUMB_SIZE,
        cache_size: int = CACHE_SIZE,
        cache_bytes: int = CACHE_BYTES,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.size, self.max_pixels = size, max_pixels
        self._ids = ids
        self._kind = str(dataset.get("kind") or "")
        self._origin = str(dataset.get("origin") or "")
        images = _locate(dataset, images_root)
        self.root, self.problem, self._path_of = images.root, images.problem, images.path_of
        self._cache = _JpegCache(cache_size, cache_bytes)
        self._budget = _PixelBudget(max_pixels)

    @property
    def available(self) -> bool:
        """True when thumbnails can be served (else :attr:`problem` says why not)."""
        return self.problem is None

    def jpeg(self, id_: str) -> bytes:
        """The JPEG thumbnail of row ``id_`` (at most :attr:`size` pixels a side).

        Raises:
            ThumbnailNotFoundError: ``id_`` is not a row, its image lies outside the images
                root, or it is missing or unreadable.
            ImageTooLargeError: its image would decode to more than :attr:`max_pixels`.
        """
        if id_ not in self._ids:
            raise ThumbnailNotFoundError(f"No row with id '{id_}' in this feature set.")
        if self.problem is not None:
            raise ThumbnailNotFoundError(self.problem)
        return self._cache.get(id_, self._render)

    def _render(self, id_: str) -> bytes:
        try:
            out = io.BytesIO()
            self._thumbnail(id_).save(out, format="JPEG", quality=JPEG_QUALITY)
        except (ThumbnailNotFoundError, ImageTooLargeError):
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ThumbnailNotFoundError(
                f"The image of row '{id_}' cannot be read ({type(exc).__name__})."
            ) from exc
        return out.getvalue()

    def _thumbnail(self, id_: str) -> Image.Image:
        """The small RGB image; the full-size pixels live only inside the pixel budget."""
        if self._kind not in FILE_KINDS:
            return self._from_source(id_)
        path = self._find(id_)
        if path is None:
            raise ThumbnailNotFoundError(f"The image of row '{id_}' is not under the images root.")
        return self._reduce(id_, path)

    def _from_source(self, id_: str) -> Image.Image:
        """A row's image read through its source (listed again from the recorded origin)."""
        source, samples = _listed(self._origin)
        if id_ not in samples:
            raise ThumbnailNotFoundError(f"'{self._origin}' has no image '{id_}'.")
        data = source.read_bytes(samples[id_])
        if data is None:  # rendered from arrays in memory (CIFAR, digits): small
            image = source.open_image(samples[id_])
            image.thumbnail((self.size, self.size))
            return image.convert("RGB")
        return self._reduce(id_, io.BytesIO(data))

    def _reduce(self, id_: str, path: str | io.BytesIO) -> Image.Image:
        with Image.open(path) as image:  # the header only
            image.draft("RGB", (self.size, self.size))  # JPEGs decode at a reduced scale
            pixels = self._check_pixels(id_, image.size)
            with self._budget.held(pixels):
                image.thumbnail((self.size, self.size))  # decodes, reduces, resizes
                return image.convert("RGB")

    def _check_pixels(self, id_: str, size: tuple[int, int]) -> int:
        (w, h), limit = size, self.max_pixels
        if w * h > limit:
            raise ImageTooLargeError(
                f"The image of row '{id_}' is {w} × {h} = {w * h / 1e6:.1f} MP, over the "
                f"{limit / 1e6:g} MP thumbnail budget (--max-image-mp), so it has no "
                "thumbnail. Raise --max-image-mp to serve it."
            )
        return w * h

    def _find(self, id_: str) -> str | None:
        relative = self._path_of(id_) if self._path_of is not None else None
        if self.root is None or relative is None:
            return None
        return _inside(self.root, os.path.join(self.root, relative))


def thumbnail_problem(
    dataset: Mapping[str, Any], images_root: str | Path | None = None
) -> str | None:
    """Why a feature set's rows have no thumbnails (None: they have)."""
    return _locate(dataset, images_root).problem


PathOf = Callable[[str], str | None]


@dataclass(frozen=True)
class _Images:
    """Where a feature set's images are: the real root and each id's path under it."""

    root: Path | None = None
    path_of: PathOf | None = None
    problem: str | None = None


def _locate(dataset: Mapping[str, Any], images_root: str | Path | None) -> _Images:
    kind, origin = str(dataset.get("kind") or ""), str(dataset.get("origin") or "")
    if not origin:
        return _Images(problem=f"The feature set records no image source (data kind "
                       f"'{kind or 'unknown'}'), so results have no thumbnails.")  # fmt: skip
    if kind not in FILE_KINDS:
        return _Images()  # read through the source itself
    recorded, path_of = _folder(origin) if kind == "folder" else _manifest(origin)
    root = Path(os.path.realpath(Path(images_root).expanduser() if images_root else recorded))
    if not root.is_dir():
        how = "--images-root" if images_root else "recorded at extraction"
        return _Images(problem=(
            f"The images root '{root}' ({how}) does not exist, so results have no thumbnails. "
            "Pass --images-root DIR with the folder the images are in now."
        ))  # fmt: skip
    return _Images(root, path_of)


def _folder(origin: str) -> tuple[Path, PathOf]:
    return Path(origin), lambda id_: id_


def _manifest(origin: str) -> tuple[Path, PathOf]:
    """The manifest's listed files: under their common folder (ids → paths relative to it).

    A manifest that can no longer be read maps ids to paths under its folder.
    """
    from bob_cache.data import parse_source

    base = Path(origin).parent
    try:
        source = parse_source(origin)
    except Exception:  # moved or changed: ids are the relative paths of an id-less manifest
        return base, lambda id_: id_
    files = {s.id: str(s.location) for rows in source.splits.values() for s in rows}
    root = Path(os.path.commonpath([os.path.dirname(f) for f in files.values()] or [str(base)]))
    relative = {i: os.path.relpath(f, root) for i, f in files.items()}
    return root, relative.get


def _inside(root: Path, path: str) -> str | None:
    """``path`` with symlinks resolved when it is a file inside ``root`` (else None)."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None
    if os.path.commonpath([root, real]) != str(root) or not os.path.isfile(real):
        return None
    return real


class _PixelBudget:
    """Decoded pixels in flight across threads: a decode waits until its pixels fit."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()

    @contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


class _JpegCache:
    """Least-recently-used bytes by key, bounded in count and bytes; concurrent misses of
    one key run ``make`` once and share its result (or its error, which is not cached)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes, self.bytes = max_items, max_bytes, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._pending: dict[str, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[str], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()
        try:
            value = make(key)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._put(key, value)
        pending.set_result(value)
        return value

    def _put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        self._items[key] = value
        self.bytes += len(value)
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            self.bytes -= len(self._items.popitem(last=False)[1])


@functools.lru_cache(maxsize=4)
def _listed(origin: str) -> tuple[Any, dict[str, Any]]:
    """The source ``origin`` names, and its samples by id (every split)."""
    from bob_cache.data import parse_source

    try:
        source = parse_source(origin)
    except Exception as exc:  # moved, changed, unreadable: no thumbnails, with the reason
        raise ThumbnailNotFoundError(
            f"The images of this feature set cannot be listed from '{origin}' "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    return source, {s.id: s for rows in source.splits.values() for s in rows}
