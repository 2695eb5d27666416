"""The dense probe stage: frozen-backbone semantic segmentation from stored grids, on a CPU.

For a dense feature set (``extract --dense`` of a segmentation folder) it trains per-patch
linear heads (:mod:`bob_cache.probes.dense`) on the training split's grids, one per learning
rate, chooses the learning rate by mIoU on the validation split, scores the chosen head on the
test split (on the validation split when there is no test split, and the protocol says so),
and appends long-format rows to the results table (stage ``probe``, method ``dense-linear``).
A unit whose configuration hash is already in the table is skipped unless ``force``.

Grids stream from Zarr a few shards at a time (shuffled by shard order, then within the
buffer), converted to float32 one mini-batch at a time; masks are read once per split, in the
network's geometry, and kept compressed. Memory is therefore bounded by the buffer, never by
the split: 10,000 ViT-B grids (3 GB of float16) train in a few hundred MB.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from bob_cache.data.segfolder import MaskBank, load_masks, mask_path
from bob_cache.data.splits import rule_text
from bob_cache.errors import FeatureSetNotFoundError, SpecError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import matches_backbone, select_feature_sets
from bob_cache.probes.dense import (
    DEFAULT_LRS,
    DenseHeads,
    DenseRecipe,
    predict_batches,
    score_heads,
    train_dense_heads,
)
from bob_cache.probes.features import require_complete, valid_rows
from bob_cache.probes.fewshot import hash_holdout
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores import FeatureSet, FeatureStore, open_store
from bob_cache.stores.results import ResultsTable, config_columns, summarize

METHOD = "dense-linear"
PROTOCOL_VERSION = 1
BUFFER_ROWS = 256  # rows (whole shards, at least one) read and shuffled together


@dataclass
class DenseProbeConfig:
    """Options of ``bob-cache probe --method dense-linear``."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.1
    epochs: int = 10
    batch_size: int = 16
    lrs: tuple[float, ...] = DEFAULT_LRS
    weight_decay: float = 1e-4
    seed: int = 0
    pixels: int = 1024  # mask pixels drawn per image and step (0: all)
    masks: str | None = None  # the dataset's folder now, when it moved since extraction
    results: str | None = None
    force: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise SpecError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}.")
        _ = self.recipe  # validates epochs, batch size and learning rates

    @property
    def recipe(self) -> DenseRecipe:
        return DenseRecipe(
            epochs=self.epochs, batch_size=self.batch_size, lrs=tuple(self.lrs),
            weight_decay=self.weight_decay, seed=self.seed, pixels=self.pixels,
        )  # fmt: skip


@dataclass
class DenseProbeSummary:
    """What a dense probe run did and found (``head``: the chosen head, when trained)."""

    dataset: str
    backbone: str
    feature_key: str
    results: str
    units_run: int = 0
    units_skipped: int = 0
    scored_split: str = ""
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_class_iou: dict[str, float] = field(default_factory=dict)
    val_miou: dict[str, float] = field(default_factory=dict)  # by learning rate
    train_rows: int = 0
    val_rows: int = 0
    protocol: str = ""
    split_rule: str = ""
    table: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    head: DenseHeads | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "head"}


@dataclass(frozen=True)
class GridRows:
    """Rows ``rows`` of a dense feature set with their masks (``masks[i]`` is row ``rows[i]``'s)."""

    fs: FeatureSet
    rows: np.ndarray
    masks: MaskBank

    @property
    def n(self) -> int:
        return len(self.rows)

    def batches(
        self, *, batch_size: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Mini-batches in row order, or with ``rng`` shuffled: shards in random order, read
        :data:`BUFFER_ROWS` rows at a time and shuffled within that buffer."""
        shard_rows = self.fs.layout.shard_rows
        shard_of = self.rows // shard_rows
        shards = np.unique(shard_of)
        if rng is not None:
            shards = rng.permutation(shards)
        per_buffer = max(1, BUFFER_ROWS // shard_rows)
        for at in range(0, len(shards), per_buffer):
            positions = np.concatenate(
                [np.flatnonzero(shard_of == s) for s in shards[at : at + per_buffer]]
            )
            grids = self._read(positions)
            order = (
                rng.permutation(len(positions)) if rng is not None else np.arange(len(positions))
            )
            for start in range(0, len(order), batch_size):
                pick = order[start : start + batch_size]
                yield grids[pick], self.masks.get(positions[pick])

    def _read(self, positions: np.ndarray) -> np.ndarray:
        """The stored grids (float16 stays float16) of ``positions`` (whose rows ascend
        within each shard), one shard read at a time, in the order of ``positions``."""
        array, layout = self.fs.array("features"), self.fs.layout
        rows = self.rows[positions]
        shard_of = rows // layout.shard_rows
        parts = []
        for shard in dict.fromkeys(shard_of.tolist()):  # shards in order of appearance
            start, stop = layout.shard_bounds(shard, self.fs.n_rows)
            mine = rows[shard_of == shard]
            whole = len(mine) == stop - start  # every row, ascending: no copy to select
            parts.append(array[start:stop] if whole else array[start:stop][mine - start])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class _Splits:
    """The rows that train, choose the learning rate, and score."""

    train: GridRows
    val: GridRows
    test: GridRows
    names: dict[str, str]  # role -> where its rows come from, in words


@register_stage("dense-probe")
def dense_probe(config: DenseProbeConfig) -> DenseProbeSummary:
    """Train, choose, score and record one dense-linear unit (skipped when already done)."""
    started = time.perf_counter()
    sets, ids, config_hash = _unit(config)
    first = sets[config.train_split]
    table = ResultsTable.open(config.results)
    summary = DenseProbeSummary(
        config.dataset, first.attrs["backbone"]["slug"], first.key, str(table.directory)
    )
    summary.split_rule = rule_text(first.attrs.get("dataset", {}))
    if not config.force and config_hash in table.config_hashes():
        summary.units_skipped = 1
    else:
        splits = _load_splits(config, sets, ids)
        _run_unit(config, splits, summary)
        table.append(_rows(config, summary, config_hash, spec=first.attrs.get("spec")))
        summary.units_run = 1
    frame = table.read(dataset=config.dataset, backbone=summary.backbone, feature_key=first.key)
    frame = frame[frame["method"] == METHOD]
    summary.table = summarize(frame).to_dict(orient="records") if len(frame) else []
    summary.seconds = time.perf_counter() - started
    return summary


def unit_hashes(config: DenseProbeConfig, feature_key: str) -> set[str]:
    """The config hash ``dense_probe(config)`` would record on the sets of ``feature_key``
    (the battle's done check; it reads the valid rows and the masks' sizes, not the grids)."""
    return {_unit(replace(config, feature=feature_key))[2]}


def _unit(
    config: DenseProbeConfig,
) -> tuple[dict[str, FeatureSet], dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The unit's feature sets, each split's ``(valid rows, ids)``, and its config hash."""
    store = open_store(config.store, storage_options=config.storage_options or None)
    sets = select_dense_sets(store, config)
    ids = {split: valid_rows(fs) for split, fs in sets.items()}
    key = sets[config.train_split].key
    return sets, ids, unit_hash(config, key, _masks_fingerprint(config, sets, ids))


def select_dense_sets(store: FeatureStore, config: DenseProbeConfig) -> dict[str, FeatureSet]:
    """The dense feature sets of one key: the training split, and validation and test when
    extracted. Without ``--feature`` the only dense key of the dataset and backbone is taken.

    Raises:
        FeatureSetNotFoundError: no dense set (the fix: extract with --dense), or several.
        SpecError: ``--feature`` names a set of pooled vectors.
    """
    listed = store.feature_sets()  # one walk of the store serves both lookups
    feature = config.feature
    if feature is None:
        candidates = [
            fs for fs in listed
            if fs.attrs.get("dataset", {}).get("name") == config.dataset
            and matches_backbone(fs, config.backbone)
        ]  # fmt: skip
        dense = sorted({fs.key for fs in candidates if fs.is_dense})
        if candidates and not dense:
            raise FeatureSetNotFoundError(
                f"'{config.dataset}' with '{config.backbone}' has only pooled feature sets in "
                f"'{store.location}'. Fix: extract it with --dense (from a segmentation folder "
                "with images/ and masks/), then rerun the dense probe."
            )
        feature = dense[0] if len(dense) == 1 else None
    sets = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=feature,
        splits=(config.train_split,), optional=(config.val_split, config.test_split),
        listed=listed,
    )  # fmt: skip
    for fs in sets.values():
        _check_usable(fs)
    return sets


def _check_usable(fs: FeatureSet) -> None:
    if not fs.is_dense:
        raise SpecError(
            f"Feature set '{fs.path}' holds one {fs.dim}-d vector per image, not dense grids; "
            "the dense probe needs grids. Fix: extract with --dense and pass that key with "
            "--feature (or use --method linear on this set)."
        )
    require_complete(fs)
    if not fs.attrs.get("dataset", {}).get("segmentation"):
        kind = fs.attrs.get("dataset", {}).get("kind", "?")
        raise SpecError(
            f"Feature set '{fs.path}' was extracted from a '{kind}' source, which has no masks. "
            "Fix: extract with --dense from a segmentation folder (images/ + masks/, optionally "
            "under train/ val/ test/, classes in classes.json)."
        )


def _masks_fingerprint(
    config: DenseProbeConfig, sets: dict[str, FeatureSet], ids: dict[str, tuple]
) -> str:
    """Names and sizes of every mask the unit reads (a changed mask makes a new unit)."""
    facts = []
    for split, fs in sets.items():
        seg = fs.attrs["dataset"]["segmentation"]
        for i in ids[split][1]:
            path = mask_path(seg, split, str(i), root=config.masks)
            facts.append((split, str(i), path.stat().st_size if path.is_file() else -1))
    return stable_hash(facts, length=16)


def _load_splits(
    config: DenseProbeConfig, sets: dict[str, FeatureSet], ids: dict[str, tuple]
) -> _Splits:
    """Masks for every row, and the train / validation / scored rows with their names."""
    c = config
    first = sets[c.train_split]
    attrs = first.attrs["dataset"]
    preprocessing = first.attrs["spec"]["preprocessing"]
    n_classes = len(attrs.get("class_names") or [])

    def rows_of(split: str) -> GridRows:
        rows, row_ids = ids[split]
        masks = load_masks(
            sets[split].attrs["dataset"]["segmentation"], split, [str(i) for i in row_ids],
            preprocessing=preprocessing, num_classes=n_classes, root=c.masks,
        )  # fmt: skip
        return GridRows(sets[split], rows, masks)

    train = rows_of(c.train_split)
    names = {"train": f"'{c.train_split}'", "val": f"'{c.val_split}'"}
    if c.val_split in sets and c.val_split != c.train_split:
        val = rows_of(c.val_split)
    else:  # no validation split: a share of train, drawn by a hash of the row ids
        train, val = _hold_out(train, ids[c.train_split][1], c.val_fraction)
        names = {
            "train": f"'{c.train_split}' (the rest)",
            "val": f"{c.val_fraction:g} of '{c.train_split}' held out by id hash",
        }
    has_test = c.test_split in sets and c.test_split not in (c.train_split, c.val_split)
    names["test"] = f"'{c.test_split}'" if has_test else names["val"]
    return _Splits(train, val, rows_of(c.test_split) if has_test else val, names)


def _hold_out(rows: GridRows, ids: np.ndarray, fraction: float) -> tuple[GridRows, GridRows]:
    keep, out = hash_holdout(ids, fraction, "dense-holdout")
    if not len(keep) or not len(out):
        raise SpecError(
            f"Holding out {fraction:g} of {len(ids)} training rows leaves no "
            f"{'validation' if len(keep) else 'training'} rows. Extract a val split, or "
            "change --val-fraction."
        )
    return (
        GridRows(rows.fs, rows.rows[keep], rows.masks.take(keep)),
        GridRows(rows.fs, rows.rows[out], rows.masks.take(out)),
    )


def _run_unit(config: DenseProbeConfig, splits: _Splits, summary: DenseProbeSummary) -> None:
    """Train every learning rate, choose on validation, score the chosen head."""
    fs = splits.train.fs
    seg = fs.attrs["dataset"]["segmentation"]
    names = list(fs.attrs["dataset"].get("class_names") or [])
    recipe = config.recipe
    kw = {"ignore_index": int(seg["ignore_index"]), "class_names": names}
    heads = train_dense_heads(
        splits.train, num_classes=len(names), ignore_index=kw["ignore_index"], recipe=recipe
    )
    on_val = score_heads(heads, splits.val, batch_size=recipe.batch_size, **kw)
    if all(np.isnan(r["mIoU"]) for r in on_val):
        raise SpecError(
            f"Every mask pixel of the validation rows ({splits.names['val']}) is the ignore "
            "index, so no learning rate can be chosen. Check the masks of that split."
        )
    best = int(np.nanargmax([r["mIoU"] for r in on_val]))
    chosen = heads.select(best)
    scored_on_val = splits.test is splits.val
    result = (
        on_val[best]
        if scored_on_val
        else score_heads(chosen, splits.test, batch_size=recipe.batch_size, **kw)[0]
    )
    summary.lr, summary.head = recipe.lrs[best], chosen
    summary.val_miou = {f"{lr:g}": r["mIoU"] for lr, r in zip(recipe.lrs, on_val, strict=True)}
    summary.per_class_iou = result["per_class_iou"]
    summary.metrics = {k: float(result[k]) for k in ("mIoU", "pixel_accuracy", "mean_accuracy")}
    summary.train_rows, summary.val_rows = splits.train.n, splits.val.n
    summary.scored_split = config.test_split if not scored_on_val else config.val_split
    summary.protocol = _protocol(recipe, splits, scored_on_val)


def _protocol(recipe: DenseRecipe, splits: _Splits, scored_on_val: bool) -> str:
    grid = ", ".join(f"{lr:g}" for lr in recipe.lrs)
    scored = (
        f"scored on {splits.names['test']}"
        if not scored_on_val
        else f"scored on {splits.names['val']}: no test split, so the rows that chose the "
        "learning rate also scored it (optimistic)"
    )
    pixels = f"{recipe.pixels} pixels drawn per image and step" if recipe.pixels else "all pixels"
    return (
        f"dense linear (per-patch D→C, no BatchNorm, channels standardized on train_rows; "
        f"logits bilinearly upsampled to each mask in the network's crop, the loss on {pixels}); "
        f"AdamW, cosine schedule, {recipe.epochs} epochs, {recipe.batch_size} images per step, "
        f"weight decay "
        f"{recipe.weight_decay:g}, seed {recipe.seed}; fitted on train_rows images of "
        f"{splits.names['train']}; learning rate chosen from [{grid}] by mIoU on val_rows "
        f"images of {splits.names['val']}; {scored}"
    )


def _rows(
    config: DenseProbeConfig,
    summary: DenseProbeSummary,
    config_hash: str,
    *,
    spec: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    values = {
        **summary.metrics,
        "lr": summary.lr,
        "val_mIoU": summary.val_miou[f"{summary.lr:g}"],
        **{f"iou:{name}": v for name, v in summary.per_class_iou.items()},
    }
    base = {
        "run_id": uuid.uuid4().hex[:12], "versions": library_versions(), "stage": "probe",
        "dataset": config.dataset, "split": summary.scored_split, "backbone": summary.backbone,
        "feature_key": summary.feature_key, "method": METHOD, "setting": "full",
        "seed": config.seed, "config_hash": config_hash, "time": utc_now(),
        "train_rows": summary.train_rows, "val_rows": summary.val_rows,
        "protocol": summary.protocol, "split_rule": summary.split_rule,
        **config_columns(spec, stage="probe", protocol=PROTOCOL_VERSION,
                         splits=[config.train_split, config.val_split, config.test_split,
                                 config.val_fraction],
                         recipe=config.recipe.to_dict()),
    }  # fmt: skip
    return [{**base, "metric": m, "value": float(v)} for m, v in values.items()]


def unit_hash(config: DenseProbeConfig, feature_key: str, masks: str = "") -> str:
    """The results-table config hash of the unit ``dense_probe(config)`` runs."""
    return stable_hash(
        {
            "stage": "probe", "method": METHOD, "protocol": PROTOCOL_VERSION,
            "dataset": config.dataset, "feature_key": feature_key,
            "splits": [config.train_split, config.val_split, config.test_split,
                       config.val_fraction],
            "recipe": config.recipe.to_dict(), "masks": masks,
        }
    )  # fmt: skip


def predict_split(
    config: DenseProbeConfig, head: DenseHeads, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted labels, masks)``, each ``(N, h, w)``, of ``head`` on every valid row of
    ``split`` in the network's geometry (for checks and small sets: it holds them all)."""
    store = open_store(config.store, storage_options=config.storage_options or None)
    sets = select_dense_sets(store, config)
    if split not in sets:
        raise FeatureSetNotFoundError(
            f"Split '{split}' of '{config.dataset}' is not extracted; it has "
            f"{', '.join(sets)}. Pass one of those."
        )
    fs = sets[split]
    rows, ids = valid_rows(fs)
    masks = load_masks(
        fs.attrs["dataset"]["segmentation"], split, [str(i) for i in ids],
        preprocessing=fs.attrs["spec"]["preprocessing"], num_classes=head.num_classes,
        root=config.masks,
    )  # fmt: skip
    pairs = list(predict_batches(head, GridRows(fs, rows, masks)))
    return np.concatenate([p[:, 0] for p, _ in pairs]), np.concatenate([m for _, m in pairs])
