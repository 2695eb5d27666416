"""Shard files, local or on object storage: brace patterns, listing, byte ranges, tar members.

A pattern names shards by brace ranges (``{00000..00127}``, zero padding kept), ``{a,b}``
lists or a glob, as a path or an fsspec URL (``s3://``, configured from the environment as the
store is). A shard is read by byte range (a ``pread``, or a ranged GET), never copied whole;
a tar's members are listed by :mod:`tarfile` from their headers alone.
"""

from __future__ import annotations

import glob
import itertools
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from bob_cache.errors import DataNotFoundError

_BRACES = re.compile(r"(\{[^{}]*\})")
_RANGE = re.compile(r"^\{(-?\d+)\.\.(-?\d+)\}$")


@dataclass(frozen=True)
class Shard:
    """One tar file: its path or URL, its name relative to the set's root, its size, and its
    version (mtime or ETag: a rewritten shard is listed again)."""

    url: str
    name: str
    size: int
    version: str = ""


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` → ``a00bx, a00by, a01bx, ...`` (no nesting; zero padding kept)."""
    parts = _BRACES.split(pattern)
    choices = [_brace_choices(p) if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _brace_choices(group: str) -> list[str]:
    ranged = _RANGE.match(group)
    if ranged:
        a, b = ranged.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    inner = group[1:-1]
    return inner.split(",") if "," in inner else [group]


def list_shards(pattern: str) -> list[Shard]:
    """Every shard the pattern names, in order, with its size; all must exist."""
    paths = expand_braces(pattern)
    fs = filesystem(pattern)
    scheme = pattern.split("://")[0] + "://" if fs else ""
    found: list[tuple[str, tuple[int, str]]] = []
    missing: list[str] = []
    for path in paths:
        if glob.has_magic(path):
            matched = sorted(fs.glob(path)) if fs else sorted(glob.glob(path))
            found += [(_full(scheme, m), _stat(fs, m)) for m in matched]
            continue
        try:
            found.append((path, _stat(fs, path)))
        except FileNotFoundError:
            missing.append(path)
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of the {len(paths)} shards named by '{pattern}' do not exist, "
            f"e.g. {', '.join(missing[:3])}. Check the range against the file names (written "
            "{00000..00127}, with their zero padding) and the folder or bucket."
        )
    if not found:
        raise DataNotFoundError(
            f"The shard pattern '{pattern}' matches no file. Expected WebDataset .tar "
            "files; check the folder or bucket and the pattern (a glob, or a brace range "
            "written {00000..00127} with the zero padding of the file names)."
        )
    root = posixpath.commonpath([posixpath.dirname(p.split("://")[-1]) for p, _ in found])
    return [
        Shard(p, posixpath.relpath(p.split("://")[-1], root or "/").removesuffix(".tar"), *stat)
        for p, stat in found
    ]


def _full(scheme: str, path: str) -> str:
    return path if not scheme or path.startswith(scheme) else scheme + path


def filesystem(url: str) -> Any:
    """The fsspec filesystem of a URL (None for a local path)."""
    if "://" not in url or url.startswith("file://"):
        return None
    import fsspec

    return fsspec.core.url_to_fs(url)[0]


def _stat(fs: Any, path: str) -> tuple[int, str]:
    """Size and version (mtime or ETag) of a shard; raises FileNotFoundError."""
    if fs is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        stat = os.stat(path)
        return stat.st_size, str(stat.st_mtime_ns)
    info = fs.info(path)
    return int(info["size"]), str(info.get("ETag") or info.get("mtime") or "")


def read_range(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``url`` from ``offset`` (a pread, or a ranged GET); short data raises."""
    fs = filesystem(url)
    if fs is None:
        fd = os.open(url, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
    else:
        data = fs.cat_file(url, start=offset, end=offset + size)
    if len(data) != size:
        raise OSError(f"tar member at byte {offset} of '{url}' is cut short (truncated shard)")
    return data


def tar_members(raw: Any) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar, as :mod:`tarfile` reads
    its headers (it seeks over the data, so only headers are read)."""
    raw.seek(0)
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        return [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]
