"""WebDataset tar shards, local or on object storage, read in place.

``--data`` names the shards by one ``.tar`` pattern (path or ``s3://`` URL) with brace ranges
(``{00000..00127}``, zero padding kept), ``{a,b}`` lists or a glob; ``wds:`` in front makes the
kind explicit. Options follow ``?`` (``shards/{00000..00009}.tar?label=json:label&split=train``):

- ``label``: ``auto`` (``.cls`` where any sample has one, else the ``label`` field of ``.json``),
  ``cls``, ``json:FIELD`` (dotted; an integer or a class name), ``txt`` (the text is the class
  name: LAION's ``.txt`` is a caption, so only on request) or ``none``. A sample without a
  label is an unlabeled row (-1), counted and logged.
- ``split``: every shard's split. Else a shard's ``train/``/``val/``/``test/`` folder or such a
  word in its name; else labelled rows are split by id hash (:mod:`bob_cache.data.splits`) and
  unlabelled ones stay whole (``train`` unless ``--split`` names another).
- ``image``: the image member's extension (default: the first of ``jpg, jpeg, png, ...``).
- ``classes``: a file with one class name per line (integer labels default to ``0``..``K-1``,
  names to sorted order).

Members group into samples by WebDataset's key (member path up to the file name's first dot),
the row id (``SHARD/KEY`` for every row when keys repeat across shards). Listing reads headers
and label members; an image is read by offset (a ranged GET on ``s3://``, fsspec configured
from the environment as the store is: ``AWS_ENDPOINT_URL``, ...), never unpacked. A key
without an image member is skipped and counted; an undecodable one is an invalid row. Rows keep
the tar order, so each ``--part`` (store shards ``s mod N``) reads only its rows' members.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bob_cache.data.images import IMAGE_EXTENSIONS, open_image_file
from bob_cache.data.shard_files import Shard, filesystem, list_shards, read_range, tar_members
from bob_cache.data.source import (
    AS_DISTRIBUTED,
    DataSource,
    Sample,
    SplitFractions,
    default_name,
    register_source,
)
from bob_cache.data.splits import DEFAULT_SPLIT, split_rows
from bob_cache.errors import AnnotationError, DataNotFoundError, DataSourceError

logger = logging.getLogger(__name__)

PREFIX = "wds:"
OPTION_KEYS = ("label", "split", "image", "classes")
SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_OPTIONS = re.compile(r"^[a-z]+=[^&]*(&[a-z]+=[^&]*)*$")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's base_plus_ext


@dataclass(frozen=True)
class ShardSpec:
    """A parsed ``--data`` value: the shard pattern and the options after ``?``."""

    pattern: str
    label: str = "auto"
    split: str | None = None
    image: str | None = None
    classes: str | None = None

    @property
    def origin(self) -> str:
        """The canonical ``--data`` value (absolute pattern, options that differ from default)."""
        options = {k: getattr(self, k) for k in OPTION_KEYS}
        options["label"] = None if self.label == "auto" else self.label
        query = "&".join(f"{k}={v}" for k, v in options.items() if v)
        return PREFIX + self.pattern + (f"?{query}" if query else "")


@dataclass
class WebDatasetSource(DataSource):
    """Samples in tar shards; ``location`` is ``(shard url, data offset, size)``."""

    shards: list[Shard] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    kind = "webdataset"

    def read_bytes(self, sample: Sample) -> bytes:
        url, offset, size = sample.location
        return read_range(url, offset, size)

    def open_image(self, sample: Sample) -> Image.Image:
        return open_image_file(io.BytesIO(self.read_bytes(sample)), name=str(sample.id))

    def fingerprint_rows(self) -> list[Any]:
        rows: list[Any] = [
            (split, s.id, s.label, s.location[2])
            for split, part in self.splits.items()
            for s in part
        ]
        return rows + [("shard", s.name, s.size) for s in self.shards]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shards": len(self.shards), **self.counts}


def _is_webdataset(spec: str) -> bool:
    if spec.startswith(PREFIX):
        return True
    head = _split_options(spec)[0].lower()
    if not head.endswith((".tar", *_COMPRESSED)):
        return False
    return "://" in head or not os.path.isdir(os.path.expanduser(head))


@register_source(
    "webdataset",
    _is_webdataset,
    syntax="SHARDS.tar[?label=cls|json:FIELD|txt|none&split=NAME&image=EXT&classes=FILE]",
    layout="WebDataset tar shards (KEY.jpg with KEY.cls / KEY.json / KEY.txt), local or "
    "s3://, named by brace ranges {00000..00127} or a glob; read in place.",
    example="shards/{00000..00127}.tar?label=json:label",
)
def load_webdataset(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> WebDatasetSource:
    """List the samples of every shard the pattern names (see the module docstring)."""
    parsed = parse_shard_spec(spec)
    shards = list_shards(parsed.pattern)
    entries, skipped = _list_entries(parsed, shards)
    mode = _resolve_label_mode(parsed.label, entries)
    raw = [_raw_label(mode, e) for e in entries]
    labels, class_names = _label_indices(raw, parsed, mode)
    ids = _unique_ids(entries)
    samples = [
        Sample(i, lab, (e.shard.url, e.offset, e.size))
        for i, lab, e in zip(ids, labels, entries, strict=True)
    ]
    splits, rule = _make_splits(parsed, entries, samples, split=split, fractions=fractions)
    unlabeled = sum(lab == -1 for lab in labels) if mode != "none" else 0
    if unlabeled:
        logger.warning(
            "%d of %d samples in '%s' have no label (%s); they are kept as unlabeled rows (-1).",
            unlabeled, len(samples), parsed.pattern, mode,
        )  # fmt: skip
    return WebDatasetSource(
        name=name or default_name(_default_stem(shards)),
        origin=parsed.origin,
        splits=splits,
        class_names=class_names,
        split_rule=rule,
        shards=shards,
        counts={"unlabeled": unlabeled, "keys_without_image": skipped},
    )


def parse_shard_spec(spec: str) -> ShardSpec:
    """Split a ``--data`` value into the shard pattern and its options."""
    head, query = _split_options(spec.removeprefix(PREFIX))
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        if key not in OPTION_KEYS:
            raise DataSourceError(
                f"Unknown WebDataset option '{key}' in '{spec}'. Expected "
                f"{', '.join(OPTION_KEYS)}, e.g. 'shards/{{00000..00009}}.tar?label=json:label'."
            )
        options[key] = value
    if head.lower().endswith(_COMPRESSED):
        raise DataSourceError(
            f"WebDataset shards must be uncompressed .tar files to be read in place, got "
            f"'{head}'. Recompress them as plain tar (e.g. `gunzip` each shard)."
        )
    label = options.get("label") or "auto"
    if label not in ("auto", "cls", "txt", "none") and not label.startswith("json:"):
        raise DataSourceError(
            f"Unknown label '{label}' in '{spec}'. Expected label=auto, cls, txt, none or "
            "json:FIELD (e.g. label=json:label)."
        )
    head = head.removeprefix("file://")
    if "://" not in head:
        head = os.path.abspath(os.path.expanduser(head))
    return ShardSpec(
        head,
        label=label,
        split=options.get("split") or None,
        image=(options.get("image") or "").lstrip(".").lower() or None,
        classes=options.get("classes") or None,
    )


def _split_options(spec: str) -> tuple[str, str]:
    head, sep, tail = spec.rpartition("?")
    return (head, tail) if sep and _OPTIONS.match(tail) else (spec, "")


@dataclass(frozen=True)
class Entry:
    """One sample of a shard: key, image member's data offset and size, label payloads."""

    shard: Shard
    key: str
    offset: int
    size: int
    payloads: dict[str, bytes]


_INDEX_CACHE: dict[tuple[str, int, str, str, tuple[str, ...]], tuple[list[Entry], int]] = {}


def _list_entries(spec: ShardSpec, shards: list[Shard]) -> tuple[list[Entry], int]:
    """Every shard's samples in tar order, and how many keys had no image member."""
    wanted = _label_exts(spec.label)
    entries: list[Entry] = []
    skipped = 0
    for shard in shards:
        cache_key = (shard.url, shard.size, shard.version, spec.image or "", wanted)
        if cache_key not in _INDEX_CACHE:
            _INDEX_CACHE[cache_key] = _index_shard(shard, image=spec.image, wanted=wanted)
        found, no_image = _INDEX_CACHE[cache_key]
        entries += found
        skipped += no_image
    if skipped:
        logger.warning(
            "%d sample key(s) in '%s' have no image member (%s); they are skipped.",
            skipped, spec.pattern, spec.image or "/".join(_IMAGE_EXTS[:4]) + "/...",
        )  # fmt: skip
    if not entries:
        raise DataSourceError(
            f"The shards named by '{spec.pattern}' hold no image members ({skipped} sample "
            f"key(s) without one). Expected KEY.jpg (or {', '.join(_IMAGE_EXTS[1:5])}, ...) "
            "members beside KEY.cls/KEY.json; pass ?image=EXT if the images use another "
            "extension."
        )
    return entries, skipped


def _label_exts(label: str) -> tuple[str, ...]:
    if label == "auto":
        return ("cls", "json")
    return () if label == "none" else (label.split(":")[0],)


def _index_shard(shard: Shard, *, image: str | None, wanted: tuple[str, ...]) -> tuple[list, int]:
    """Read one tar's headers (and its label members): its entries and keys without image."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    payloads: dict[str, dict[str, bytes]] = {}
    fs = filesystem(shard.url)
    try:
        with fs.open(shard.url, "rb") if fs else open(shard.url, "rb") as raw:
            for name, offset, size in tar_members(raw):
                match = _KEY.match(name)
                if not match or posixpath.basename(name).startswith("."):
                    continue
                key, ext = match.group(1), match.group(2).lower()
                members = groups.setdefault(key, {})
                if ext in members:
                    raise DataSourceError(
                        f"Shard '{shard.url}' holds member '{name}' twice. Each sample key must "
                        "have one member per extension; rewrite the shard."
                    )
                members[ext] = (offset, size)
                if ext in wanted:
                    raw.seek(offset)
                    payloads.setdefault(key, {})[ext] = raw.read(size)
    except tarfile.TarError as exc:
        raise DataSourceError(
            f"Shard '{shard.url}' is not a readable tar file ({exc}). Expected an uncompressed "
            "WebDataset .tar; re-download or rewrite the shard, or leave it out of the pattern."
        ) from exc
    entries, skipped = [], 0
    for key, members in groups.items():
        ext = _pick_image(members, image)
        if ext is None:
            skipped += 1
            continue
        offset, size = members[ext]
        entries.append(Entry(shard, key, offset, size, payloads.get(key, {})))
    return entries, skipped


def _pick_image(members: dict[str, tuple[int, int]], image: str | None) -> str | None:
    if image:
        return image if image in members else None
    return next((e for e in _IMAGE_EXTS if e in members), None)


def _resolve_label_mode(label: str, entries: list[Entry]) -> str:
    """``auto`` → ``cls`` if any sample has one, else ``json:label`` if any JSON has that
    field, else ``none``."""
    if label != "auto":
        return label
    if any("cls" in e.payloads for e in entries):
        return "cls"
    if any(_json_field(e, "label", strict=False) is not None for e in entries):
        return "json:label"
    return "none"


def _raw_label(mode: str, entry: Entry) -> int | str | None:
    """The label text or number of one sample in ``mode`` (None where it has none)."""
    if mode == "none":
        return None
    if mode.startswith("json:"):
        return _json_field(entry, mode[5:], strict=True)
    data = entry.payloads.get(mode)
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace").strip()
    if mode == "cls" and not re.fullmatch(r"-?\d+", text):
        raise AnnotationError(
            f"'{entry.key}.cls' in '{entry.shard.url}' holds {text[:40]!r}; expected an integer "
            "class index. If the shards keep class names in .txt, pass ?label=txt."
        )
    return text or None


def _json_field(entry: Entry, path: str, *, strict: bool) -> int | str | None:
    data = entry.payloads.get("json")
    if data is None:
        return None
    try:
        value: Any = json.loads(data)
    except ValueError as exc:
        if not strict:
            return None
        raise AnnotationError(
            f"'{entry.key}.json' in '{entry.shard.url}' is not valid JSON ({exc}). Fix the "
            "member, or pick the label elsewhere (?label=cls, ?label=txt, ?label=none)."
        ) from exc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    if not strict:
        return None
    raise AnnotationError(
        f"Field '{path}' of '{entry.key}.json' in '{entry.shard.url}' is {value!r}; expected an "
        "integer class index or a class name. Pick another field with ?label=json:FIELD."
    )


def _label_indices(
    raw: list[int | str | None], spec: ShardSpec, mode: str
) -> tuple[list[int], list[str]]:
    """Integer labels (-1 unlabeled) and class names from the raw labels."""
    text = ["" if v is None else str(v) for v in raw]
    names = _read_class_names(spec.classes) if spec.classes else None
    if all(re.fullmatch(r"-?\d+", t) for t in text if t):
        values = [int(t) if t else -1 for t in text]
        if any(v < -1 for v in values):
            raise AnnotationError(
                f"Labels ({mode}) in '{spec.pattern}' go below -1 (min {min(values)}); expected "
                "class indices 0..K-1, or -1 for unlabeled."
            )
        top = max(values, default=-1)
        if names is not None and top >= len(names):
            raise AnnotationError(
                f"Class index {top} in '{spec.pattern}' is beyond the {len(names)} names in "
                f"'{spec.classes}'. Give one class name per line for indices 0..{top}."
            )
        return values, names if names is not None else [str(i) for i in range(top + 1)]
    found = sorted({t for t in text if t})
    order = names if names is not None else found
    unknown = [t for t in found if t not in set(order)]
    if unknown:
        raise AnnotationError(
            f"Class name(s) {', '.join(unknown[:3])} in '{spec.pattern}' are not in "
            f"'{spec.classes}'. Add them to the class list (one name per line)."
        )
    index = {c: i for i, c in enumerate(order)}
    return [index[t] if t else -1 for t in text], list(order)


def _read_class_names(location: str) -> list[str]:
    fs = filesystem(location)
    try:
        with fs.open(location, "rt") if fs else open(os.path.expanduser(location)) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"Class list '{location}' (from ?classes=) does not exist. Give a text file with "
            "one class name per line, or drop the option."
        ) from exc


def _unique_ids(entries: list[Entry]) -> list[str]:
    """The sample keys; every one qualified by its shard (``SHARD/KEY``) when keys repeat."""
    keys = [e.key for e in entries]
    if len(set(keys)) == len(keys):
        return keys
    ids = [f"{e.shard.name}/{e.key}" for e in entries]
    if len(set(ids)) != len(ids):  # only possible when one shard repeats in the pattern
        raise DataSourceError(
            "The shard pattern names the same shard twice, so its samples would repeat. "
            "Name each shard once."
        )
    return ids


def _shard_split(shard: Shard) -> str | None:
    """The split a shard's path names: its folder (``train/``, ``val/``, ``test/``), or the one
    such word in its file name (``imagenet-val-000012.tar``)."""
    folder = posixpath.basename(posixpath.dirname(shard.url.split("://")[-1]))
    if folder in SPLIT_WORDS:
        return SPLIT_WORDS[folder]
    words = re.split(r"[-_.]", posixpath.basename(shard.name))
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def _make_splits(
    spec: ShardSpec,
    entries: list[Entry],
    samples: list[Sample],
    *,
    split: str,
    fractions: SplitFractions | None,
) -> tuple[dict[str, list[Sample]], Any]:
    if spec.split:
        return {spec.split: samples}, AS_DISTRIBUTED
    per_shard = {e.shard.url: _shard_split(e.shard) for e in entries}
    named = {u for u, s in per_shard.items() if s}
    if named and len(named) < len(per_shard):
        example = next(u for u, s in per_shard.items() if not s)
        raise DataSourceError(
            f"Some shards of '{spec.pattern}' name their split (train/val/test in the path) "
            f"and others do not (e.g. {example}). Give each split its own --data, or add "
            "?split=NAME to put every shard in one split."
        )
    if named:
        splits: dict[str, list[Sample]] = {}
        for entry, sample in zip(entries, samples, strict=True):
            splits.setdefault(per_shard[entry.shard.url] or DEFAULT_SPLIT, []).append(sample)
        return splits, AS_DISTRIBUTED
    return split_rows(samples, split=split, fractions=fractions)


def _default_stem(shards: list[Shard]) -> str:
    """The dataset name: the shards' folder (or bucket prefix) name."""
    parent = posixpath.dirname(shards[0].url.split("://")[-1].rstrip("/"))
    stem = posixpath.basename(parent)
    if stem in SPLIT_WORDS:
        stem = posixpath.basename(posixpath.dirname(parent)) or stem
    return stem or posixpath.basename(shards[0].name)
