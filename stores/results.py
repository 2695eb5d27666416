"""The results table: long-format evaluation rows in a directory of parquet files.

Every evaluation appends rows (one metric value each) as a new parquet file, so concurrent
runs never rewrite each other's output; readers see the union. An append holds the table's
lock (a claim in ``.claims/``) while it leaves out rows another writer already wrote, and
readers drop a row written twice anyway (equal in :data:`DUPLICATE_KEY`: its unit key and
value), so one number is never counted twice. Reports are built only from
this table. Each row says which labelled rows produced it: ``train_rows`` (training rows),
``val_rows`` (validation rows that chose hyper-parameters; disjoint from ``train_rows``) and
``protocol`` (how each was used, in words: e.g. the ``full`` linear probe refits on both once
C is chosen). Rows imported from elsewhere (``bob-cache
results import``) carry their ``source``; own rows have ``source == ""``. A row may name its
``task`` (``linear``, ``knn``, ...); empty means the ranking's rules decide. ``split_rule``
says how the dataset's rows came to be in their splits (``as distributed``, ``id-hash
0.6/0.2/0.2`` for a source without splits; :mod:`bob_cache.data.splits`).

``config`` is the row's configuration without its seed, as canonical JSON (the feature spec
less its dataset, and the method's options: :func:`config_columns`); rows that differ in it
are never averaged (:mod:`bob_cache.ranking.identity`). ``dataset_fingerprint`` names the
dataset's source (its content fingerprint, ``/limit=N`` for a ``--limit`` extraction): rows
of two sources of one dataset name are never mixed. Both are empty in rows written before
they existed (then the feature key stands for the configuration).
"""

from __future__ import annotations

import functools
import io
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bob_cache.errors import StoreError
from bob_cache.provenance import utc_now
from bob_cache.stores.claims import ClaimBoard
from bob_cache.stores.location import is_url, translate_remote_errors, translate_write_errors

COLUMNS = (
    "run_id", "stage", "dataset", "split", "backbone", "feature_key", "method", "setting",
    "metric", "value", "seed", "config_hash", "versions", "time", "train_rows", "val_rows",
    "protocol", "source", "task", "split_rule", "config", "dataset_fingerprint",
)  # fmt: skip
# Columns a writer may leave out (and tables written before they existed lack): their fill.
OPTIONAL = {"source": "", "task": "", "split_rule": "", "config": "", "dataset_fingerprint": ""}
SUMMARY_KEYS = ("dataset", "data", "backbone", "configuration", "method", "setting")
# A row's unit key (the config hash names the unit's run; the rest, which of its numbers).
UNIT_KEY = ("config_hash", "method", "setting", "metric", "seed", "split")
# Rows equal in these are one number written twice (two runs of one unit): readers keep one.
DUPLICATE_KEY = ("stage", "dataset", "backbone", "feature_key", "source", *UNIT_KEY, "value")
CLAIMS = ".claims"  # the folder of claims beside the parts (:mod:`bob_cache.stores.claims`)
APPEND_LEASE = 120.0  # seconds an append may hold the table's lock
DEFAULT_RESULTS = "bob-results"


@dataclass(frozen=True)
class ResultsTable:
    """A results directory, local or any fsspec URL (``s3://bucket/results``); created on
    first write. ``storage_options`` go to fsspec (credentials, ``endpoint_url``); without
    them s3fs reads the usual ``AWS_*`` environment variables."""

    directory: Path | str  # a Path for local directories, else the URL as given
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def open(
        cls, directory: str | Path | None = None, *, storage_options: dict[str, Any] | None = None
    ) -> ResultsTable:
        location = str(directory or DEFAULT_RESULTS)
        if is_url(location):
            return cls(location.rstrip("/"), dict(storage_options or {}))
        return cls(Path(location).expanduser())

    @property
    def is_local(self) -> bool:
        return isinstance(self.directory, Path)

    @functools.cached_property
    def _fs(self) -> tuple[Any, str]:
        import fsspec

        if self.is_local:
            return fsspec.filesystem("file"), str(Path(self.directory).resolve())
        try:
            fs, root = fsspec.core.url_to_fs(str(self.directory), **self.storage_options)
        except ImportError as exc:  # fsspec names the package its protocol needs
            raise StoreError(
                f"Cannot open the results table '{self.directory}': {exc}. For s3:// install "
                "the s3 extra (pip install 'bob-cache[s3]')."
            ) from exc
        return fs, root

    def path(self, name: str) -> str:
        """The full path (local) or URL of file ``name`` in the table's directory."""
        return f"{str(self.directory).rstrip('/')}/{name}"

    @functools.cached_property
    def claims(self) -> ClaimBoard:
        """The claims beside this table (who is computing what; the append lock)."""
        fs, root = self._fs
        return ClaimBoard(f"{root}/{CLAIMS}", fs=None if self.is_local else fs)

    def append(self, rows: Sequence[dict[str, Any]]) -> str | None:
        """Write ``rows`` as one new parquet file; returns its path (None when nothing is new).

        Under the table's lock, rows another writer already wrote (equal in
        :data:`DUPLICATE_KEY`) are left out, so two runs of one unit never add a row twice.
        """
        if not rows:
            return None
        missing = set(COLUMNS) - set(OPTIONAL) - set(rows[0])
        if missing:
            raise ValueError(f"result rows lack columns {sorted(missing)}")
        frame = _fill_optional(pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows]))
        frame["versions"] = frame["versions"].map(
            lambda v: v if isinstance(v, str) else json.dumps(v)
        )
        self._known_rows()  # read what is there before taking the lock: held briefly
        with (
            translate_remote_errors(self.directory),
            self.claims.claim("append", owner="results append", lease=APPEND_LEASE, poll=0.05),
        ):
            data = _parquet(frame)
            keys = _row_keys(pd.read_parquet(io.BytesIO(data)))  # as a reader will see them
            new = [k not in self._known_rows() for k in keys]
            if not any(new):
                return None
            if not all(new):
                frame = frame[new].reset_index(drop=True)
                data, keys = _parquet(frame), [k for k, n in zip(keys, new, strict=True) if n]
            name = f"part-{utc_now().replace(':', '')}-{uuid.uuid4().hex[:8]}.parquet"
            self.write_bytes(name, data)
            self._part_keys[name] = frozenset(keys)
        return self.path(name)

    @functools.cached_property
    def _part_keys(self) -> dict[str, frozenset[tuple[str, ...]]]:
        """Each part's row keys, read once (parts are written whole and never rewritten)."""
        return {}

    def _known_rows(self) -> set[tuple[str, ...]]:
        """The row keys of every part now in the table (new parts read, the rest cached)."""
        names = self.files("part-*.parquet")
        for name in names:
            if name not in self._part_keys:
                try:
                    part = pd.read_parquet(io.BytesIO(self.read_bytes(name)))
                except (OSError, ValueError):  # damaged: read() names it; nothing to match
                    continue
                self._part_keys[name] = frozenset(_row_keys(part))
        return set().union(*(self._part_keys[n] for n in names if n in self._part_keys))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write file ``name`` whole: readers see the old file or the new one, never a part
        (local: a temporary file renamed; object stores: one PUT)."""
        fs, root = self._fs
        with (
            translate_write_errors(str(self.directory), f"results file '{name}'"),
            translate_remote_errors(self.directory),
        ):
            if self.is_local:
                Path(root).mkdir(parents=True, exist_ok=True)
                tmp = Path(root) / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, Path(root) / name)
                except BaseException:  # a full disk keeps no partial file taking its space
                    tmp.unlink(missing_ok=True)
                    raise
            else:
                fs.pipe_file(f"{root}/{name}", data)

    def read_bytes(self, name: str) -> bytes:
        fs, root = self._fs
        with translate_remote_errors(self.directory):
            return fs.cat_file(f"{root}/{name}")

    def files(self, pattern: str) -> list[str]:
        """Names of the table directory's files matching ``pattern`` (a glob), sorted."""
        fs, root = self._fs
        with translate_remote_errors(self.directory):
            if not fs.exists(root):
                return []
            return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/{pattern}"))

    def read(self, **filters: str | None) -> pd.DataFrame:
        """All rows, optionally filtered by column equality (``dataset="digits"``)."""
        files = self.files("part-*.parquet")
        if not files:
            return pd.DataFrame(columns=list(COLUMNS))
        try:
            frame = pd.concat(
                [pd.read_parquet(io.BytesIO(self.read_bytes(f))) for f in files],
                ignore_index=True,
            )
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"Cannot read the results table in '{self.directory}': {exc}. Remove or move "
                "the damaged part-*.parquet file it names."
            ) from exc
        for column in COLUMNS:  # tables written before a column existed
            if column not in frame:
                frame[column] = None
        frame = _fill_optional(frame)
        frame = frame[~frame.duplicated(list(DUPLICATE_KEY), keep="last")]
        for column, value in filters.items():
            if value is not None:
                frame = frame[frame[column] == value]
        return frame.reset_index(drop=True)

    def has_config(self, config_hash: str) -> bool:
        """Whether a run with this configuration hash has already written rows."""
        return config_hash in self.config_hashes()

    def config_hashes(self) -> set[str]:
        """The configuration hashes of every run that has written rows."""
        return set(self.read()["config_hash"])


def config_columns(spec: Mapping[str, Any] | None = None, **options: Any) -> dict[str, str]:
    """A row's ``config`` and ``dataset_fingerprint`` columns.

    Args:
        spec: the feature set's spec (its ``spec`` attribute), or None (fine-tuning).
        options: everything else that changes the row's number, except the seed, the
            dataset and what the row's method and setting already say.
    """
    spec = dict(spec or {})
    data = spec.pop("dataset", None) or {}
    config = {"feature": spec, **options} if spec else dict(options)
    fingerprint = str(data.get("fingerprint") or "")
    if fingerprint and data.get("limit") is not None:
        fingerprint += f"/limit={data['limit']}"
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return {"config": text, "dataset_fingerprint": fingerprint}


def summarize(frame: pd.DataFrame, *, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Pivot long rows to one line per (dataset, backbone, configuration, method, setting)
    with ``mean ± std`` over seeds for each metric (the latest run of each config wins),
    ``seeds``, and the labelled rows each fit used (``train_rows``, ``val_rows``: a range
    when seeds differ).

    Rows that differ by more than their seed are never averaged
    (:mod:`bob_cache.ranking.identity`): a backbone with several configurations in one
    setting gets one line each, ``configuration`` saying what differs. A dataset name with
    rows of several sources gets one line per source (``data``: its fingerprint). Both
    columns are left out when nothing differs.
    """
    from bob_cache.ranking.identity import resolve_configurations

    if frame.empty:
        return frame
    latest = frame.sort_values("time").drop_duplicates(
        ["config_hash", "method", "setting", "metric", "seed", "split"], keep="last"
    )
    latest = _fill_optional(latest.assign(**{c: latest.get(c) for c in OPTIONAL}))
    latest["data"] = _sources(latest)
    keys = ["dataset", "data", "method", "setting", "metric"]
    latest = resolve_configurations(latest.reset_index(drop=True), keys).rows
    group = list(SUMMARY_KEYS)
    rows = latest.groupby(group)[["train_rows", "val_rows"]].agg(_span).reset_index()
    if metrics:
        latest = latest[latest["metric"].isin(metrics)]
    stats = latest.groupby([*group, "metric"])["value"].agg(["mean", "std", "count"])
    stats = stats.reset_index()
    stats["cell"] = [
        f"{m:.4f}" if n < 2 else f"{m:.4f} ± {s:.4f}"
        for m, s, n in zip(stats["mean"], stats["std"], stats["count"], strict=True)
    ]
    table = stats.pivot(index=group, columns="metric", values="cell").reset_index()
    table.columns.name = None
    seeds = stats.groupby(group)["count"].max().rename("seeds").reset_index()
    table = table.merge(seeds, on=group, how="left").merge(rows, on=group, how="left")
    unused = [c for c in ("data", "configuration") if (table[c] == "").all()]
    return table.drop(columns=unused)


def _sources(frame: pd.DataFrame) -> pd.Series:
    """A row's dataset source (fingerprint, 12 characters) where its dataset has several."""
    fingerprint = frame["dataset_fingerprint"].str[:12]
    several = fingerprint.groupby(frame["dataset"]).transform("nunique") > 1
    return fingerprint.where(several, "")


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _row_keys(frame: pd.DataFrame) -> list[tuple[str, ...]]:
    """Each row's :data:`DUPLICATE_KEY` as text (one part's rows, as stored)."""
    for column in DUPLICATE_KEY:  # parts written before a column existed
        if column not in frame:
            frame = frame.assign(**{column: OPTIONAL.get(column)})
    columns = [frame[c].map(str) for c in DUPLICATE_KEY]
    return list(zip(*columns, strict=True)) if len(frame) else []


def _fill_optional(frame: pd.DataFrame) -> pd.DataFrame:
    """Optional columns as text, their fill where a row (or an older table) has none."""
    for column, fill in OPTIONAL.items():
        frame[column] = frame[column].astype(object).where(frame[column].notna(), fill).astype(str)
    return frame


def _span(values: pd.Series) -> str:
    """``"120"`` or ``"118-120"`` (rows a fit used, over seeds); empty for rows from before."""
    known = pd.to_numeric(values, errors="coerce").dropna().astype(int)
    if known.empty:
        return ""
    low, high = known.min(), known.max()
    return str(low) if low == high else f"{low}-{high}"
