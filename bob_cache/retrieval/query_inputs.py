"""Query inputs checked at the boundary, before any search or decode: vectors that must form
a finite ``(N, D)`` array, and images whose headers must stay under pixel limits.

PIL's ``Image.open`` reads only the header, so an image's size is known (and a
decompression bomb, a few KB that would decode to gigabytes, refused) before any pixel is
decoded. PIL's own ceiling (``DecompressionBombError`` at twice ``Image.MAX_IMAGE_PIXELS``)
is reported the same way.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import DataNotFoundError, ImageTooLargeError, QueryError

MAX_IMAGE_PIXELS = 40_000_000  # one query image: ~7700 × 5200; larger headers are refused
MAX_REQUEST_PIXELS = 200_000_000  # all images of one call together


def parse_vectors(
    vectors: np.ndarray | Sequence[Sequence[float]], dim: int, *, where: str
) -> np.ndarray:
    """``(N, dim)`` finite float32 query vectors from an array or nested lists.

    Raises:
        QueryError: ragged or non-numeric rows, another dimension, NaN or inf (values
            beyond float32's range included).
    """
    fix = f"Pass (N, {dim}) vectors from the same backbone and layer as '{where}'."
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
            x = np.asarray(vectors, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        why = _ragged(vectors, exc)
        raise QueryError(
            f"Query vectors do not form an (N, D) array of numbers: {why}. {fix}"
        ) from exc
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != dim:
        raise QueryError(
            f"Query vectors have shape {tuple(np.shape(vectors))}, but the index holds "
            f"{dim}-dimensional features of '{where}'. {fix}"
        )
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise QueryError(
            f"Query vector(s) {', '.join(map(str, bad[:5].tolist()))} contain NaN or inf (or "
            "values beyond float32's range); pass finite values."
        )
    return x


def _ragged(vectors: Any, exc: Exception) -> str:
    """Why ``vectors`` is not a rectangular array: its row lengths, else numpy's reason."""
    try:
        lengths = sorted({len(v) for v in vectors})
    except TypeError:
        return f"{type(exc).__name__}: {exc}"
    if len(lengths) > 1:
        return f"rows of different lengths ({', '.join(map(str, lengths[:5]))})"
    return f"{type(exc).__name__}: {exc}"


def image_size(image: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from an image's header, without decoding its pixels.

    Raises:
        DataNotFoundError: a path that does not exist.
        ImageTooLargeError: a header claiming more than ``max_pixels`` pixels.
        QueryError: not an image PIL can open.
    """
    with _open_image(image, max_pixels) as img:
        return img.size


def check_request_pixels(sizes: Sequence[tuple[int, int]], max_pixels: int) -> None:
    """Refuse images whose headers together claim more than ``max_pixels`` pixels."""
    total = sum(w * h for w, h in sizes)
    if total > max_pixels:
        raise ImageTooLargeError(
            f"The {len(sizes)} images of this request hold {total / 1e6:.1f} MP together, over "
            f"the {max_pixels / 1e6:g} MP per-request limit (--max-request-mp). Send fewer or "
            "smaller images per request."
        )


def group_by_pixels(sizes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive positions of ``sizes`` (``(w, h)``) grouped so that each group's pixels
    stay within ``budget`` (an image alone over it forms its own group)."""
    groups: list[list[int]] = []
    pixels = budget + 1
    for i, (w, h) in enumerate(sizes):
        if pixels + w * h > budget:
            groups.append([])
            pixels = 0
        groups[-1].append(i)
        pixels += w * h
    return groups


def decode_image(image: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """A PIL RGB image from a path or encoded bytes, with a clear error when it is not one.

    The header's size is checked against ``max_pixels`` before any pixel is decoded.
    """
    with _open_image(image, max_pixels) as img:
        try:
            img.load()
            return img.convert("RGB")
        except Exception as exc:  # PIL raises many types for undecodable input
            raise _undecodable(image, exc) from exc


def _open_image(image: str | Path | bytes, max_pixels: int) -> Any:
    """The lazily opened PIL image (header read, pixels not decoded), its size checked."""
    from PIL import Image

    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise DataNotFoundError(f"Query image '{image}' does not exist. Check the path.")
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, above any sane limit
        raise ImageTooLargeError(
            f"{_subject(image)} is too large to decode ({exc}): over the {max_pixels / 1e6:g} "
            "MP per-image limit (--max-image-mp); downscale it first."
        ) from exc
    except Exception as exc:  # PIL raises many types for undecodable input
        raise _undecodable(image, exc) from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{_subject(image)} is {w} × {h} = {w * h / 1e6:.1f} MP, over the "
            f"{max_pixels / 1e6:g} MP per-image limit (--max-image-mp); downscale it first."
        )
    return img


def _what(image: str | Path | bytes) -> str:
    return f"'{image}'" if isinstance(image, (str, Path)) else "the uploaded file"


def _subject(image: str | Path | bytes) -> str:
    return f"Image '{image}'" if isinstance(image, (str, Path)) else "The uploaded image"


def _undecodable(image: str | Path | bytes, exc: Exception) -> QueryError:
    return QueryError(
        f"Cannot decode {_what(image)} as an image ({type(exc).__name__}: {exc}). Pass a JPEG, "
        "PNG, WebP, BMP, TIFF or GIF file."
    )
