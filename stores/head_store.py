"""Linear probe heads persisted beside the feature set they were fitted on.

A head lives in the training split's feature-set group at ``heads/<name>``, ``name`` being
the probe unit's config hash (the results table's ``config_hash``). Arrays: ``weight``
(K × D float32, over standardized features), ``bias`` (K) and, when the features were
standardized, ``mean`` and ``scale`` (D): ``logits = ((x - mean) / scale) @ weight.T + bias``,
the very expression the probe scored its test split with. Its attributes (a
:class:`HeadRecord`) say what it is (method, setting, seed, chosen C, class names), what it was
fitted from (feature key, the sets whose rows trained it or chose C, their creation times and
shard generations) and what it measured on test.

Writing deletes a head of the same name, writes the arrays, and writes the attributes last,
so a killed write leaves a head without attributes: never listed, and named as incomplete
(with the refit command) when asked for. Replacing a head is therefore not atomic: between
the delete and the attributes it is absent, never half-present. Every backend (local
directory, ``s3://``, zarr's ``MemoryStore``) holds heads alike: they are plain Zarr arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import zarr

from bob_cache.errors import HeadDamagedError, HeadMismatchError, StaleHeadError
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.feature_set import MARKER, FeatureSet
from bob_cache.stores.feature_store import FeatureStore
from bob_cache.stores.location import translate_write_errors

HEAD_GROUP = "heads"
HEAD_FORMAT = 1
_DIMS = {"weight": ("class", "feature"), "bias": ("class",), "mean": ("feature",),
         "scale": ("feature",)}  # fmt: skip


@dataclass
class HeadRecord:
    """What a head is, what it was fitted from, and what it measured (its attributes)."""

    name: str
    method: str
    setting: str
    seed: int
    C: float | None
    classes: list[str]
    n_classes: int
    dim: int
    dataset: str
    backbone: str
    feature_key: str
    feature_set: str  # the group it is stored beside (the training split's set)
    generations: dict[str, dict[str, str]]  # per set that trained it or chose C: shard → gen
    sets_created: dict[str, str]  # per such set: its creation time (re-created: stale)
    train_rows: int
    val_rows: int
    protocol: str
    splits: dict[str, str] = field(default_factory=dict)  # train, val, test split names
    metrics: dict[str, float] = field(default_factory=dict)  # on the test split
    standardized: bool = True
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: int = HEAD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)


@dataclass
class HeadParams:
    """A head's numbers: logits of float32 rows are ``((x - mean) / scale) @ weight.T + bias``."""

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def scores(self, block: np.ndarray) -> np.ndarray:
        """Logits of ``block`` (N × D float32), computed exactly as the probe computed them."""
        x = block if self.mean is None else (block - self.mean) / self.scale
        return x @ self.weight.T + self.bias

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items() if v is not None}


def write_head(fs: FeatureSet, record: HeadRecord, params: HeadParams) -> None:
    """Store ``heads/<record.name>`` beside ``fs`` (replacing one of that name), the record
    last so that only a finished write looks complete."""
    arrays = params.arrays()
    _check_shapes(arrays, record, standardized=params.mean is not None, where=record.name)
    record.standardized = params.mean is not None
    # microseconds: heads fitted within one second still order (the newest is the default)
    record.created = record.created or datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with translate_write_errors(fs.location, f"probe head '{record.name}' of '{fs.path}'"):
        parent = fs.group.require_group(HEAD_GROUP)
        if record.name in parent:
            del parent[record.name]
        group = parent.create_group(record.name)
        for name, value in arrays.items():
            group.create_array(
                name, data=value, chunks=value.shape, compressors=None, dimension_names=_DIMS[name]
            )
            feature_set_module.crash_point(f"head-{name}")
        group.attrs.update({"record": record.to_dict(), "complete": True})


def list_heads(fs: FeatureSet) -> list[HeadRecord]:
    """Records of the complete heads beside ``fs``, newest first."""
    return sorted(
        (HeadRecord(**attrs["record"]) for _, attrs in _head_attrs(fs) if attrs.get("complete")),
        key=lambda r: r.created,
        reverse=True,
    )


def incomplete_heads(fs: FeatureSet) -> list[str]:
    """Names of head groups beside ``fs`` whose write never finished (no record)."""
    return [name for name, attrs in _head_attrs(fs) if not attrs.get("complete")]


def count_heads(fs: FeatureSet) -> int:
    """How many complete heads ``fs`` holds (a ``bob-cache ls`` column)."""
    return sum(1 for _, attrs in _head_attrs(fs) if attrs.get("complete"))


def _head_attrs(fs: FeatureSet) -> list[tuple[str, dict[str, Any]]]:
    if HEAD_GROUP not in fs.group:
        return []
    return [(name, dict(node.attrs)) for name, node in fs.group[HEAD_GROUP].groups()]


def read_head(fs: FeatureSet, record: HeadRecord) -> HeadParams:
    """The arrays of head ``record.name`` beside ``fs``, checked against its record.

    Raises:
        HeadDamagedError: an array is missing, malformed or holds NaN/inf.
    """
    fix = refit_hint(record, fs.location)
    where = f"Probe head '{record.name}' beside '{fs.path}'"
    names = ("weight", "bias", "mean", "scale") if record.standardized else ("weight", "bias")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        try:
            node = fs.group[f"{HEAD_GROUP}/{record.name}/{name}"]
            arrays[name] = np.asarray(node[...], dtype=np.float32)
        except (KeyError, ValueError, OSError, zarr.errors.BaseZarrError) as exc:
            raise HeadDamagedError(
                f"{where} is damaged: its '{name}' array cannot be read "
                f"({type(exc).__name__}: {exc}). Refit it with `{fix}`."
            ) from exc
    _check_shapes(arrays, record, standardized=record.standardized, where=where, fix=fix)
    return HeadParams(**arrays)


def _check_shapes(
    arrays: dict[str, np.ndarray],
    record: HeadRecord,
    *,
    standardized: bool,
    where: str,
    fix: str = "",
) -> None:
    k, d = record.n_classes, record.dim
    want = {"weight": (k, d), "bias": (k,)}
    if standardized:
        want |= {"mean": (d,), "scale": (d,)}
    for name, shape in want.items():
        value = arrays.get(name)
        if value is None or value.shape != shape or not np.isfinite(value).all():
            got = "missing" if value is None else f"shape {value.shape}"
            raise HeadDamagedError(
                f"{where} is damaged: '{name}' should be a finite {shape} array, found {got}."
                + (f" Refit it with `{fix}`." if fix else "")
            )


def check_head(
    target: FeatureSet, record: HeadRecord, *, open_set: Callable[[str], FeatureSet | None]
) -> None:
    """Refuse a head for ``target`` when it was fitted on another feature key, or when a set
    it was fitted from was re-created or had shards uncommitted or recomputed since.

    Args:
        open_set: the feature set at a group path of the same store (None when gone).

    Raises:
        HeadMismatchError: ``target`` holds other features than the head was fitted on.
        StaleHeadError: its training rows changed after it was fitted.
    """
    if record.feature_key != target.key:
        spec = target.attrs.get("spec", {})
        raise HeadMismatchError(
            f"Probe head '{record.name}' was fitted on feature key {record.feature_key} "
            f"('{record.feature_set}', {record.dim}-d), not on '{target.path}' (key "
            f"{target.key}: layer {spec.get('layer')}, pool {spec.get('pool')}, {target.dim}-d). "
            "Its weights mean nothing for other features. Predict with "
            f"--feature {record.feature_key}, or fit a head on this key with `bob-cache probe "
            f"--feature {target.key}`."
        )
    why = stale_reason(record, open_set=open_set)
    if why:
        raise StaleHeadError(
            f"Probe head '{record.name}' is stale: {why} after it was fitted. Refit it "
            f"with `{refit_hint(record, target.location)}`."
        )


def stale_reason(record: HeadRecord, *, open_set: Callable[[str], FeatureSet | None]) -> str:
    """Why the rows ``record`` was fitted on changed since ('' when they did not)."""
    for path, recorded in record.generations.items():
        fs = open_set(path)
        if fs is None:
            return f"the feature set '{path}' it was fitted from is gone"
        if record.sets_created.get(path) != fs.attrs.get("created"):
            return f"'{path}' was re-created (--overwrite)"
        why = _changed_shards(fs, recorded)
        if why:
            return why
    return ""


def _changed_shards(fs: FeatureSet, recorded: dict[str, str]) -> str:
    now = {str(s): g for s, g in fs.generations().items()}
    changed = sorted(int(s) for s in {*now, *recorded} if now.get(s) != recorded.get(s))
    return f"shards {changed[:5]} of '{fs.path}' were uncommitted or recomputed" if changed else ""


def open_set(store: FeatureStore, path: str) -> FeatureSet | None:
    """The feature set at group ``path`` of ``store``, or None when there is none."""
    try:
        node = store.root[path]
    except KeyError:
        return None
    if not isinstance(node, zarr.Group) or MARKER not in node.attrs:
        return None
    return FeatureSet(node, location=store.location)


def list_store_heads(store: FeatureStore) -> list[dict[str, Any]]:
    """One row per head in ``store`` (``bob-cache ls --heads``): where, what, and its state
    (``ok``, ``stale: why`` or ``incomplete``)."""
    rows: list[dict[str, Any]] = []
    for fs in store.feature_sets():
        for r in list_heads(fs):
            why = stale_reason(r, open_set=lambda p: open_set(store, p))
            state = f"stale: {why}" if why else "ok"
            rows.append({
                "group": fs.path, "name": r.name, "method": r.method, "setting": r.setting,
                "seed": r.seed, "C": r.C, "top1": r.metrics.get("top1"), "classes": r.n_classes,
                "train_rows": r.train_rows, "val_rows": r.val_rows, "created": r.created,
                "state": state,
            })  # fmt: skip
        rows += [{"group": fs.path, "name": n, "state": "incomplete"} for n in incomplete_heads(fs)]
    return rows


def refit_hint(record: HeadRecord, location: str) -> str:
    """The ``bob-cache probe`` command that fits ``record``'s unit again."""
    parts = [
        f"bob-cache probe --store {location} --dataset {record.dataset}",
        f"--backbone {record.backbone} --feature {record.feature_key} --method linear",
    ]
    defaults = {"train": "train", "val": "val", "test": "test"}
    parts += [f"--{s}-split {v}" for s, v in record.splits.items() if defaults.get(s, v) != v]
    if record.setting.endswith("-shot"):
        parts.append(f"--shots {record.setting.removesuffix('-shot')}")
    elif record.setting.endswith("-fraction"):
        parts.append(f"--fraction {record.setting.removesuffix('-fraction')}")
    if record.method == "linear-bob":
        parts.append("--recipe bob")
    if record.setting != "full" or record.method == "linear-bob":
        parts.append(f"--seeds {record.seed}")
    return " ".join([*parts, "--force"])
