"""The ood stage: generalization under shift and post-hoc OOD detection, from cached features.

Protocol (stated per setting in every results row):

* **Head.** The ID set's stored linear probe head (full setting: C chosen on val, refit on
  train + val; see ``bob-cache probe``), fitted with that protocol first when none is stored.
* **Generalization** (``setting = shift:<dataset>``, ``method = linear``): top-1 of the head
  on the shift set's rows whose class is shared with the ID set, the logits restricted to the
  shared ID classes (:mod:`bob_cache.ood.class_map`); ``drop`` is the head's top-1 on the ID
  test rows of those same classes, scored the same way, minus the shift top-1. ``shift:mean``
  averages top-1 and drop over the shift sets. ``setting = id`` holds the ID test top-1.
* **Detection** (``setting = detect:<dataset>``, ``method = <detector>``): each detector is
  fitted on the ID *train* split's labelled rows (and the head), scores the ID test split and
  the detect set (higher = more in-distribution), and AUROC, AUPR-in, AUPR-out and FPR at 95%
  TPR come from scikit-learn (:func:`bob_cache.ood.ood_metrics`; ID is the positive class).

Fitted detector state is stored beside the ID train set (:mod:`bob_cache.stores.detector_store`)
and reused while the shards it covers are unchanged. Rows are streamed shard by shard when the
splits exceed ``max_memory_gb``; the kNN bank then stays on disk and is searched block by block.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from bob_cache.data.splits import rule_text
from bob_cache.errors import HeadNotFoundError, SpecError, StoreNotWritableError
from bob_cache.hashing import stable_hash
from bob_cache.ood import (
    Detector,
    LinearHead,
    create_detector,
    get_detector_class,
    list_detectors,
    ood_metrics,
    restore_detector,
)
from bob_cache.ood.class_map import ClassMap, read_class_map, resolve_class_map
from bob_cache.pipelines.ood_sets import Rows, load, other_set
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores import FeatureSet, FeatureStore, open_store
from bob_cache.stores.detector_store import (
    DetectorRecord,
    bank_sink,
    begin_detector,
    find_detector,
    finish_detector,
    is_current,
    read_state,
)  # fmt: skip
from bob_cache.stores.head_store import HeadParams, HeadRecord, check_head, open_set, read_head
from bob_cache.stores.results import ResultsTable, config_columns

DETECTORS = tuple(list_detectors())
DETECT_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")
DEFAULT_KNN_K = 50  # Sun et al. 2022's k for ImageNet-scale ID sets


@dataclass
class OODConfig:
    """Options of ``bob-cache ood`` (see ``bob-cache ood --help``)."""

    store: str
    backbone: str
    dataset: str  # the ID dataset
    shifts: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    detectors: tuple[str, ...] = DETECTORS
    feature: str | None = None
    head: str | None = None
    class_map: str | None = None
    knn_k: int | None = None  # None: DEFAULT_KNN_K, or every ID train row when fewer
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_memory_gb: float | None = None
    results: str | None = None
    refit: bool = False
    force: bool = False
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.shifts or self.detect):
            raise SpecError(
                "Nothing to evaluate: pass --shift DATASET[,...] (generalization) and/or "
                "--detect DATASET[,...] (OOD detection)."
            )
        for name in self.detectors:
            get_detector_class(name)  # unknown names: the valid ones are listed
        if not self.detectors and self.detect:
            raise SpecError(f"--detector is empty; pick from {', '.join(DETECTORS)}.")
        if self.knn_k is not None and self.knn_k < 1:
            raise SpecError(f"--knn-k must be at least 1, got {self.knn_k}.")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise SpecError(f"--max-memory must be positive, got {self.max_memory_gb} GB.")
        for role, names in (("shift", self.shifts), ("detect", self.detect)):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise SpecError(f"--{role} names {twice} more than once; name each dataset once.")

    def detector_options(self, name: str) -> dict[str, Any]:
        """The options that identify a detector (its units and stored state)."""
        return {"k": self.knn_k or DEFAULT_KNN_K} if name == "knn" else {}

    def build_options(self, name: str) -> dict[str, Any]:
        """:meth:`detector_options` and how to build it: the default k of the kNN detector
        becomes the ID train rows when there are fewer (a small dataset still runs; each row's
        protocol states the k used); an explicit ``--knn-k`` above them is an error."""
        extra = {"at_most_rows": True} if name == "knn" and self.knn_k is None else {}
        return {**self.detector_options(name), **extra}

    @property
    def budget(self) -> int:
        from bob_cache.pipelines.probe import _default_budget_gb

        return int((self.max_memory_gb or _default_budget_gb()) * 2**30)


@dataclass
class OODReport:
    """What an ood run measured (the same numbers as its results rows)."""

    dataset: str
    backbone: str
    feature_key: str
    head: str
    results: str
    id_top1: float | None = None
    generalization: list[dict[str, Any]] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    detection: list[dict[str, Any]] = field(default_factory=list)
    rows_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("ood")
def ood(config: OODConfig) -> OODReport:
    """Evaluate the ID head on every shift set and every detector against every detect set."""
    started = time.perf_counter()
    store = open_store(config.store, storage_options=config.storage_options or None)
    splits = (config.train_split, config.test_split)
    sets = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
        splits=splits, optional=(config.val_split,),
    )  # fmt: skip
    train_fs, test_fs = sets[config.train_split], sets[config.test_split]
    others = {  # resolved before any work, so a missing set fails fast
        (role, name): other_set(store, name, like=train_fs, backbone=config.backbone, role=role)
        for role, names in (("shift", config.shifts), ("detect", config.detect))
        for name in names
    }
    mapping = read_class_map(config.class_map) if config.class_map else None
    maps = {n: _class_map(train_fs, others[("shift", n)], mapping) for n in config.shifts}
    for name in config.detect:
        fs = others[("detect", name)]
        if fs.n_rows - fs.n_invalid <= 0:
            raise SpecError(
                f"Detect set '{name}' ('{fs.path}') has no valid rows; extract images into it, "
                "or leave it out of --detect."
            )
    record, params = _head(store, config, train_fs, test_fs)  # may fit one: checks come first
    stream = _should_stream(config, [train_fs, test_fs, *others.values()])
    id_test = load(test_fs, stream=stream)
    report = OODReport(config.dataset, record.backbone, train_fs.key, record.name, "")
    rows: list[dict[str, Any]] = []
    if config.shifts:
        shifted = {n: load(others[("shift", n)], stream=stream) for n in config.shifts}
        rows += _generalization(config, record, params, id_test, shifted, maps, report)
    if config.detect:
        detected = {n: load(others[("detect", n)], stream=stream) for n in config.detect}
        rows += _detection(store, config, record, params, train_fs, id_test, detected, report)
    table = ResultsTable.open(config.results)
    report.results = str(table.directory)
    report.rows_written = _append_new(table, rows, force=config.force)
    report.seconds = time.perf_counter() - started
    return report


def _head(
    store: FeatureStore, config: OODConfig, train_fs: FeatureSet, test_fs: FeatureSet
) -> tuple[HeadRecord, HeadParams]:
    """The stored head (fitted with the probe protocol first when there is none)."""
    from bob_cache.pipelines.predict import PredictConfig, choose

    ask = PredictConfig(
        store=config.store, dataset=config.dataset, backbone=config.backbone,
        feature=train_fs.key, head=config.head, split=config.test_split,
        storage_options=config.storage_options,
    )  # fmt: skip
    try:
        home, record, _ = choose(store, ask)
    except HeadNotFoundError:
        if config.head:
            raise
        _fit_head(config, train_fs)
        home, record, _ = choose(open_store(config.store, storage_options=config.storage_options
                                            or None), ask)  # fmt: skip
    check_head(test_fs, record, open_set=lambda path: open_set(store, path))
    return record, read_head(home, record)


def _fit_head(config: OODConfig, train_fs: FeatureSet) -> None:
    from bob_cache.pipelines.probe import ProbeConfig, probe

    probe(ProbeConfig(
        store=config.store, dataset=config.dataset, backbone=config.backbone,
        feature=train_fs.key, methods=("linear",), train_split=config.train_split,
        val_split=config.val_split, test_split=config.test_split, results=config.results,
        device=config.device, max_memory_gb=config.max_memory_gb,
        storage_options=config.storage_options,
    ))  # fmt: skip


def _should_stream(config: OODConfig, sets: list[FeatureSet]) -> bool:
    """Stream when the sets' float32 size passes half the budget: the other half is for the
    process (torch, FAISS), the blocks being converted and the detectors' work arrays."""
    return sum(fs.n_rows * fs.dim * 4 for fs in sets) > config.budget // 2


def _class_map(id_fs: FeatureSet, fs: FeatureSet, mapping: dict[str, str] | None) -> ClassMap:
    return resolve_class_map(_class_names(id_fs), _class_names(fs), mapping=mapping,
                             what=f"shift set '{fs.attrs['dataset']['name']}'")  # fmt: skip


def _class_names(fs: FeatureSet) -> list[str]:
    """The set's class names; label numbers when it has none."""
    names = [str(c) for c in fs.attrs["dataset"].get("class_names") or []]
    if names or not fs.n_rows:
        return names
    top = int(np.max(fs.array("labels")[:], initial=-1))
    return [str(i) for i in range(top + 1)]


def _logits(params: HeadParams, rows: Rows) -> np.ndarray:
    blocks = [params.scores(b) for b in rows.features.blocks()]
    return np.concatenate(blocks) if blocks else np.zeros((0, len(params.bias)), np.float32)


def _generalization(
    config: OODConfig,
    record: HeadRecord,
    params: HeadParams,
    id_test: Rows,
    shifted: dict[str, Rows],
    maps: dict[str, ClassMap],
    report: OODReport,
) -> list[dict[str, Any]]:
    id_logits, y_id = _logits(params, id_test), id_test.labels
    known = y_id >= 0
    report.id_top1 = float((id_logits[known].argmax(1) == y_id[known]).mean())
    base = _base(config, record, id_test.fs)
    unit = _unit_hash(config, record, "linear", "id")
    how = "ID test, all classes"
    rows = [_row(base, "linear", "id", "top1", report.id_top1, unit, record, how)]
    for name, shift in shifted.items():
        cmap = maps[name]
        y = np.where(shift.labels >= 0, cmap.to_id[np.clip(shift.labels, 0, None)], -1)
        scored = y >= 0
        if not scored.any():
            raise SpecError(
                f"Shift set '{name}' has no labelled rows of a class shared with the ID set; "
                "its top-1 is undefined. Check its labels or the class map."
            )
        top1 = float((cmap.predict(_logits(params, shift)[scored]) == y[scored]).mean())
        same = known & np.isin(y_id, cmap.id_labels)
        id_shared = float((cmap.predict(id_logits[same]) == y_id[same]).mean())
        entry = {"set": name, "feature_set": shift.fs.path, "rows": int(scored.sum()),
                 "rows_left_out": int(len(y) - scored.sum()), "classes_shared": cmap.n_shared,
                 "top1": top1, "id_top1_shared": id_shared, "drop": id_shared - top1}  # fmt: skip
        report.generalization.append(entry)
        setting = f"shift:{name}"
        unit = _unit_hash(config, record, "linear", setting)
        how = (f"{cmap.n_shared} shared classes, logits restricted to them; "
               f"{entry['rows']} shift rows scored, {entry['rows_left_out']} left out")  # fmt: skip
        rows += [_row(base, "linear", setting, m, entry[m], unit, record, how)
                 for m in ("top1", "drop", "id_top1_shared")]  # fmt: skip
    if report.generalization:
        report.mean = {m: float(np.mean([g[m] for g in report.generalization]))
                       for m in ("top1", "drop")}  # fmt: skip
        unit = _unit_hash(config, record, "linear", "shift:mean")
        how = f"mean over {len(report.generalization)} shift set(s): {', '.join(shifted)}"
        rows += [_row(base, "linear", "shift:mean", m, v, unit, record, how)
                 for m, v in report.mean.items()]  # fmt: skip
    return rows


def _detection(
    store: FeatureStore,
    config: OODConfig,
    record: HeadRecord,
    params: HeadParams,
    train_fs: FeatureSet,
    id_test: Rows,
    detected: dict[str, Rows],
    report: OODReport,
) -> list[dict[str, Any]]:
    stream = id_test.features.is_streamed
    train = load(train_fs, stream=stream, labelled=True)
    head = raw_head(params)
    base = _base(config, record, id_test.fs)
    rows = []
    for name in config.detectors:
        detector, how = _detector(store, config, record, train, head, name)
        id_scores = score_rows(detector, id_test, config.budget)
        for dataset, ood_rows in detected.items():
            m = ood_metrics(id_scores, score_rows(detector, ood_rows, config.budget))
            values = {"auroc": m.auroc, "aupr_in": m.aupr_in, "aupr_out": m.aupr_out,
                      "fpr95": m.fpr_at_tpr}  # fmt: skip
            report.detection.append({"detector": name, "set": dataset, **values,
                                     "n_id": m.n_id, "n_ood": m.n_ood, "state": how})  # fmt: skip
            setting = f"detect:{dataset}"
            unit = _unit_hash(config, record, name, setting)
            fitted = f"fit on {detector.n_fit} ID train rows" if detector.passes else "no fit"
            protocol = (f"{fitted}{' + the head' if detector.needs_head else ''}; ID test "
                        f"({m.n_id}) vs {dataset} ({m.n_ood}); higher score = ID"
                        f"{_knn_note(config, detector) if name == 'knn' else ''}"
                        f"{'; ' + detector.note if detector.note else ''}")  # fmt: skip
            if detector.note:
                report.detection[-1]["note"] = detector.note
            # rows seen: the head's when the detector scores through it, else its own fit's
            seen = {} if detector.needs_head else {"train_rows": detector.n_fit, "val_rows": 0}
            rows += [
                {**_row(base, name, setting, metric, value, unit, record, protocol), **seen}
                for metric, value in values.items()
            ]  # fmt: skip
    return rows


def _knn_note(config: OODConfig, detector: Detector) -> str:
    """The k the kNN detector used, and why when it is not the one asked for."""
    k = detector.k  # type: ignore[attr-defined]
    asked = config.knn_k or DEFAULT_KNN_K
    return f"; k={k}" + (f" (every ID train row, default {asked})" if k < asked else "")


def raw_head(params: HeadParams) -> LinearHead:
    """The head on raw features: ``((x - mean) / scale) @ W.T + b == x @ W'.T + b'``."""
    weight = params.weight.astype(np.float64)
    bias = params.bias.astype(np.float64)
    if params.mean is None:
        return LinearHead(weight, bias)
    scaled = weight / params.scale.astype(np.float64)[None, :]
    return LinearHead(scaled, bias - scaled @ params.mean.astype(np.float64))


def score_rows(detector: Detector, rows: Rows, budget: int) -> np.ndarray:
    """Scores of every row of ``rows``, in blocks of at most a quarter of ``budget`` (float64)."""
    limit = max(1024, budget // 4 // max(1, rows.features.dim * 8))
    out, pending, held = [], [], 0
    for block in rows.features.blocks():
        pending.append(block)
        held += len(block)
        if held >= limit:
            out.append(detector.score(np.concatenate(pending)))
            pending, held = [], 0
    if pending:
        out.append(detector.score(np.concatenate(pending)))
    return np.concatenate(out) if out else np.zeros(0)


def _detector(
    store: FeatureStore,
    config: OODConfig,
    record: HeadRecord,
    train: Rows,
    head: LinearHead,
    name: str,
) -> tuple[Detector, str]:
    """The fitted detector ``name``: stored state when current, else a fresh fit (stored
    unless it has no statistics of its own). Returns it and ``stored``/``fitted``."""
    options = config.build_options(name)
    cls = get_detector_class(name)
    fs = train.fs
    key = {"detector": name, "options": config.detector_options(name), "feature_key": fs.key,
           "split": fs.attrs["split"], "head": record.name if cls.needs_head else "",
           **({"state_version": cls.state_version} if cls.state_version > 1 else {})}  # fmt: skip
    group_name = f"{name}-{stable_hash(key, length=12)}"
    opener = _opener(store)
    found = None if config.refit else find_detector(fs, group_name)
    if cls.passes and found is not None and is_current(found, open_set=opener):
        hint = _refit_hint(config)
        state = read_state(fs, found, max_in_memory=config.budget // 4, refit=hint)
        return restore_detector(name, state), "stored"
    blocks = train.labelled_blocks if cls.needs_labels else _unlabelled(train)
    if not cls.passes:
        return create_detector(name, **options).fit(blocks, head=head), "computed"
    try:
        home = _writable(config, fs)
        group = begin_detector(home, group_name)
    except StoreNotWritableError as exc:  # a read-only store: fit, score, keep nothing
        detector = create_detector(name, **options).fit(blocks, head=head)
        return detector, f"fitted, not stored ({exc})"
    if name == "knn":
        options = {**options, "bank_sink": bank_sink(group)}
    detector = create_detector(name, **options).fit(blocks, head=head)
    finish_detector(home, group, DetectorRecord(
        name=group_name, detector=name, options=config.detector_options(name),
        head=key["head"], feature_key=fs.key, feature_set=fs.path,
        generations={fs.path: {str(s): g for s, g in fs.generations().items()}},
        sets_created={fs.path: fs.attrs.get("created", "")}, n_fit=detector.n_fit,
        dim=int(detector.dim or 0),
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    ), detector.state())  # fmt: skip
    if name == "knn" and detector.bank_rows.nbytes <= config.budget // 4:
        detector.bank_rows = np.asarray(detector.bank_rows[...])  # small: search in memory
    return detector, "fitted"


def _writable(config: OODConfig, fs: FeatureSet) -> FeatureSet:
    store = open_store(config.store, mode="a", storage_options=config.storage_options or None)
    return FeatureSet(store.root[fs.path], location=store.location)


def _unlabelled(train: Rows) -> Callable[[], Any]:
    return lambda: ((x, None) for x in train.features.blocks())


def _opener(store: FeatureStore) -> Callable[[str], FeatureSet | None]:
    return lambda path: open_set(store, path)


def _refit_hint(config: OODConfig) -> str:
    return (f"rerun `bob-cache ood --store {config.store} --backbone {config.backbone} --id "
            f"{config.dataset} ... --refit`")  # fmt: skip


def _base(config: OODConfig, record: HeadRecord, test_fs: FeatureSet) -> dict[str, Any]:
    # `_config`: what `_row` needs for the row's configuration (not a column itself)
    identity = {"spec": test_fs.attrs.get("spec"), "knn": config.detector_options("knn"),
                "splits": [config.train_split, config.val_split, config.test_split],
                "head": {"method": record.method, "setting": record.setting},
                "class_map": _file_digest(config.class_map)}  # fmt: skip
    return {
        "run_id": uuid.uuid4().hex[:12], "versions": library_versions(), "stage": "ood",
        "dataset": config.dataset, "split": test_fs.attrs["split"], "backbone": record.backbone,
        "feature_key": record.feature_key, "seed": record.seed, "time": utc_now(),
        "split_rule": rule_text(test_fs.attrs.get("dataset", {})), "_config": identity,
    }  # fmt: skip


def _row(
    base: dict[str, Any],
    method: str,
    setting: str,
    metric: str,
    value: float,
    unit: str,
    record: HeadRecord,
    how: str,
) -> dict[str, Any]:
    common = {k: v for k, v in base.items() if k != "_config"}
    ident = base["_config"]
    columns = config_columns(
        ident["spec"], stage="ood", splits=ident["splits"], head=ident["head"],
        options=ident["knn"] if method == "knn" else {},
        class_map=ident["class_map"] if setting.startswith("shift") else "",
    )  # fmt: skip
    return {**common, **columns, "method": method, "setting": setting, "metric": metric,
            "value": float(value), "config_hash": unit, "train_rows": record.train_rows,
            "val_rows": record.val_rows,
            "protocol": f"head {record.name} ({record.setting}, C={record.C}); {how}"}  # fmt: skip


def _unit_hash(config: OODConfig, record: HeadRecord, method: str, setting: str) -> str:
    return unit_hash(config, record.feature_key, method, setting)


def unit_hash(config: OODConfig, feature_key: str, method: str, setting: str) -> str:
    """The results-table config hash of one (method, setting) of an ood run on ``feature_key``."""
    identity = {"stage": "ood", "feature_key": feature_key, "method": method, "setting": setting,
                "splits": [config.train_split, config.val_split, config.test_split],
                "head": config.head or "", "options": config.detector_options(method),
                "class_map": _file_digest(config.class_map) if setting.startswith("shift")
                else ""}  # fmt: skip
    return stable_hash(identity)


def unit_hashes(config: OODConfig, feature_key: str) -> set[str]:
    """Every config hash an ood run of ``config`` on ``feature_key`` writes (its done check)."""
    units = {("linear", "id")} if config.shifts else set()
    units |= {("linear", f"shift:{s}") for s in config.shifts}
    units |= {("linear", "shift:mean")} if config.shifts else set()
    units |= {(d, f"detect:{s}") for d in config.detectors for s in config.detect}
    return {unit_hash(config, feature_key, m, s) for m, s in units}


def _file_digest(path: str | None) -> str:
    from bob_cache.hashing import file_sha256

    return file_sha256(path) if path else ""


def _append_new(table: ResultsTable, rows: list[dict[str, Any]], *, force: bool) -> int:
    done = set() if force else table.config_hashes()
    new = [r for r in rows if r["config_hash"] not in done]
    table.append(new)
    return len(new)
