"""The probe stage: classification from cached features, on CPU or GPU, no model needed.

For the chosen feature key it evaluates each method (``linear``: C chosen then a converged
fit, or the BoB recipe; ``knn``: DINO-style weighted votes for several k) on the full
training split and on few-shot subsets (``--shots`` per class, ``--fraction`` of the rows,
several seeds), and appends long-format rows to the results table. A unit (method × setting ×
seed) whose configuration is already in the table is skipped unless ``force``, except a linear
unit whose head is not stored in *this* store (the rows may describe another store holding the
same features): it is fitted again, so that what later commands need exists.

Protocols, per setting (each row records ``train_rows``, ``val_rows`` and ``protocol``):

* ``full``: the linear probe chooses C on the validation split and is refit on train + val;
  kNN votes over train. Scored on test.
* ``K-shot`` / ``F-fraction``: a subset of train drawn by a hash of the row ids and the seed.
  Every method sees only the subset's labels: the linear probe chooses C by cross-validation
  inside it (or uses a fixed C when a class has one row) and is refit on it.

Each linear unit of a single-label set stores its head (the model that produced the reported
test numbers) beside the training split's feature set, named by the unit's config hash
(:mod:`bob_cache.stores.head_store`), before its rows are appended: a kill in between leaves
a unit that the next run fits again, replacing the head.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from bob_cache.data.splits import rule_text
from bob_cache.device import resolve_device
from bob_cache.errors import SpecError, StoreNotWritableError
from bob_cache.hashing import stable_hash
from bob_cache.metrics import classification_metrics, multilabel_metrics
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.probes import (
    DEFAULT_KS,
    DEFAULT_TEMPERATURE,
    BobRecipe,
    Features,
    bob_scores,
    cv_folds,
    holdout,
    knn_scores,
    sample_fraction,
    sample_shots,
    sweep,
    sweep_cv,
    train_bob_probe,
)
from bob_cache.probes.features import load_rows
from bob_cache.probes.knn import split_ks
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.head_store import HeadParams, HeadRecord, list_heads, write_head
from bob_cache.stores.results import ResultsTable, config_columns, summarize

METHODS = ("linear", "knn")
SUBSET_DRAW = "subset drawn by id hash from the whole train split"  # in few-shot protocols
RECIPES = ("sweep", "bob")


@dataclass
class ProbeConfig:
    """Options of ``bob-cache probe`` (see ``bob-cache probe --help``)."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    methods: tuple[str, ...] = METHODS
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.1
    seeds: tuple[int, ...] = (0,)
    shots: tuple[int, ...] = ()
    fractions: tuple[float, ...] = ()
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    recipe: str = "sweep"
    epochs: int = 90
    device: str = "auto"
    results: str | None = None
    force: bool = False
    include_full: bool = True  # False: only the few-shot settings (the battle's few-shot task)
    stream: bool | None = None  # None: stream when the splits exceed max_memory_gb
    max_memory_gb: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise SpecError(
                f"Unknown probe method(s) {unknown}. Expected {', '.join(METHODS)} or all "
                "(segmentation from dense grids: --method dense-linear, stage 'dense-probe')."
            )
        if self.recipe not in RECIPES:
            raise SpecError(f"Unknown --recipe '{self.recipe}'. Expected {' or '.join(RECIPES)}.")
        if not 0 < self.val_fraction < 1:
            raise SpecError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}.")
        if not self.seeds:
            raise SpecError("--seeds is empty; pass at least one seed, e.g. --seeds 0,1,2.")
        if not (self.include_full or self.shots or self.fractions):
            raise SpecError("Nothing to probe: no full setting and no --shots or --fraction.")


@dataclass
class ProbeData:
    """Train/val/test rows and what the methods need to know about the labels."""

    train: Features
    y_train: np.ndarray
    ids_train: np.ndarray
    val: Features
    y_val: np.ndarray
    test: Features
    y_test: np.ndarray
    n_outputs: int
    multilabel: bool
    feature_key: str
    backbone: str
    unseen_test_classes: list[int]
    unlabeled_rows_dropped: int = 0
    sets: dict[str, FeatureSet] = field(default_factory=dict)  # by split
    generations: dict[str, dict[str, str]] = field(default_factory=dict)  # by set path, at load
    class_names: list[str] = field(default_factory=list)
    # Few-shot subsets are drawn from the whole labelled train split, before any validation
    # hold-out, so a subset depends only on the ids (None: the same rows as ``train``).
    pool: tuple[Features, np.ndarray, np.ndarray] | None = None

    @property
    def shot_pool(self) -> tuple[Features, np.ndarray, np.ndarray]:
        """``(rows, labels, ids)`` that few-shot and fraction subsets are drawn from."""
        return self.pool or (self.train, self.y_train, self.ids_train)

    def metrics(self, scores: np.ndarray) -> dict[str, float]:
        if self.multilabel:
            return multilabel_metrics(self.y_test, scores)
        return classification_metrics(self.y_test, scores, n_classes=self.n_outputs)

    def val_score(self, y: np.ndarray, scores: np.ndarray) -> float:
        if self.multilabel:
            return multilabel_metrics(y, scores)["roc_auc"]  # raises when no label scores
        return float((scores.argmax(1) == y).mean())


@dataclass
class ProbeSummary:
    """What a probe run did; ``table`` is the pivoted results of this feature key."""

    dataset: str
    backbone: str
    feature_key: str
    results: str
    units_run: int = 0
    units_skipped: int = 0
    unseen_test_classes: list[int] = field(default_factory=list)
    unlabeled_rows_dropped: int = 0
    table: list[dict[str, Any]] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)  # names of the heads stored by this run
    heads_note: str = ""  # why heads were not stored, if they were not
    # kNN ks refused per setting (k above its training rows): setting, ks, train_rows, reason
    skipped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Setting:
    """One training set of a probe: the full split or a few-shot subset of it."""

    name: str
    seed: int
    train: Features
    y: np.ndarray
    ids: np.ndarray

    @property
    def is_full(self) -> bool:
        return self.name == "full"


@dataclass
class UnitResult:
    """What one method reported for one setting, and which rows trained and chose it."""

    name: str
    metrics: dict[str, float]
    train_rows: int
    val_rows: int
    protocol: str
    head: HeadParams | None = None  # the linear model that produced ``metrics``


Unit = Callable[[ProbeData, Setting], list[UnitResult]]


@register_stage("probe")
def probe(config: ProbeConfig) -> ProbeSummary:
    """Run every (method × setting × seed) unit not yet in the results table."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    data = load_probe_data(config)
    settings = list(_settings(config, data))  # validates every subset before any work
    table = ResultsTable.open(config.results)
    summary = ProbeSummary(config.dataset, data.backbone, data.feature_key, str(table.directory))
    summary.unseen_test_classes = data.unseen_test_classes
    summary.unlabeled_rows_dropped = data.unlabeled_rows_dropped
    context = {"run_id": uuid.uuid4().hex[:12], "versions": library_versions()}
    done = table.config_hashes()
    heads = _HeadSink(config, data, summary, context["versions"])
    for method in config.methods:
        unit = _linear_unit(config, device) if method == "linear" else _knn_unit(config, device)
        for setting in settings:
            if not _runs(config, method, setting.name, setting.seed):
                continue
            if method == "knn" and not _usable_ks(config, setting, summary):
                continue  # every k above the setting's rows: listed in summary.skipped
            config_hash = _unit_hash(config, data.feature_key, method, setting.name, setting.seed)
            if not config.force and config_hash in done and heads.has(method, config_hash):
                summary.units_skipped += 1
                continue
            results = unit(data, setting)
            if not setting.is_full:
                results = [replace(r, protocol=f"{r.protocol}; {SUBSET_DRAW}") for r in results]
            heads.store(results, setting, config_hash)  # before the rows: see the module doc
            table.append(_rows(config, data, results, setting, config_hash, context))
            summary.units_run += 1
    frame = table.read(dataset=config.dataset, backbone=data.backbone, feature_key=data.feature_key)
    summary.table = summarize(frame).to_dict(orient="records")
    summary.seconds = time.perf_counter() - started
    return summary


def _usable_ks(config: ProbeConfig, setting: Setting, summary: ProbeSummary) -> tuple[int, ...]:
    """The ks a setting's training rows can vote with; the others are listed once per
    setting in ``summary.skipped`` (with the reason) and get no row."""
    usable, too_large = split_ks(config.ks, setting.train.n)
    if too_large and not any(s["setting"] == setting.name for s in summary.skipped):
        n, named = setting.train.n, ", ".join(map(str, too_large))
        what = f"every k ({named})" if not usable else f"k={named}"
        summary.skipped.append({
            "method": "knn", "setting": setting.name, "ks": list(too_large), "train_rows": n,
            "reason": f"{what} is above the {n} training rows of {setting.name}: a vote over "
            "every row, not that k; no row written (use a smaller --k)",
        })  # fmt: skip
    return usable


def _rows(
    config: ProbeConfig,
    data: ProbeData,
    results: list[UnitResult],
    setting: Setting,
    config_hash: str,
    context: dict[str, Any],
) -> list[dict[str, Any]]:
    base = {
        **context, "stage": "probe", "dataset": config.dataset, "split": config.test_split,
        "backbone": data.backbone, "feature_key": data.feature_key, "setting": setting.name,
        "seed": setting.seed, "config_hash": config_hash, "time": utc_now(),
        "split_rule": rule_text(data.sets[config.train_split].attrs.get("dataset", {})),
    }  # fmt: skip
    return [
        {
            **base,
            **_row_config(config, data, r.name),
            "method": r.name,
            "metric": metric,
            "value": float(value),
            "train_rows": r.train_rows,
            "val_rows": r.val_rows,
            "protocol": r.protocol,
        }
        for r in results
        for metric, value in r.metrics.items()
    ]


def _row_config(config: ProbeConfig, data: ProbeData, method: str) -> dict[str, str]:
    """The row's ``config`` (its unit's identity without seed, dataset and feature key, with
    the feature spec; kNN: the temperature, not the list of ks) and dataset fingerprint."""
    ident = _config_identity(config, data.feature_key, method)
    options = {k: v for k, v in ident.items() if k not in ("stage", "dataset", "feature_key")}
    if "knn" in options:
        options["knn"] = {"temperature": config.temperature}
    spec = data.sets[config.train_split].attrs.get("spec")
    return config_columns(spec, stage="probe", **options)


def load_probe_data(config: ProbeConfig) -> ProbeData:
    """Select the feature sets, load valid labeled rows, and check the labels are usable."""
    store = open_store(config.store, storage_options=config.storage_options or None)
    sets = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
        splits=(config.train_split, config.test_split), optional=(config.val_split,),
    )  # fmt: skip
    stream = _should_stream(config, sets)
    generations = {  # read before the rows, so a shard recomputed meanwhile reads as stale
        fs.path: {str(s): g for s, g in fs.generations().items()} for fs in sets.values()
    }
    dropped = 0

    def labeled(split: str) -> tuple[Features, np.ndarray, np.ndarray]:
        nonlocal dropped
        rows, y, ids = load_rows(sets[split], stream=stream)
        keep = np.flatnonzero(y >= 0) if y.ndim == 1 else np.arange(len(y))
        dropped += len(y) - len(keep)
        return (rows, y, ids) if len(keep) == len(y) else (rows.take(keep), y[keep], ids[keep])

    train, y_train, ids_train = labeled(config.train_split)
    test, y_test, _ = labeled(config.test_split)
    pool = None
    if config.val_split in sets and config.val_split != config.train_split:
        val, y_val, _ = labeled(config.val_split)
    else:  # no validation split: a part of each class of train, drawn by id hash
        keep, held = holdout(y_train, ids_train, config.val_fraction)
        val, y_val, ids_val = train.take(held), y_train[held], ids_train[held]
        train, y_train, ids_train = train.take(keep), y_train[keep], ids_train[keep]
        # few-shot subsets ignore the hold-out: both parts joined (concat copies no rows)
        pool = (train.concat(val), np.r_[y_train, y_val], np.r_[ids_train, ids_val])
    first = sets[config.train_split]
    multilabel = y_train.ndim == 2
    _check_labels(first.path, y_train, multilabel)
    named = len(first.attrs.get("dataset", {}).get("class_names") or [])
    top = max(int(y.max(initial=-1)) for y in (y_train, y_val, y_test))
    n_outputs = y_train.shape[1] if multilabel else max(named, top + 1)
    unseen = (
        []
        if multilabel
        else sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
    )
    return ProbeData(
        train, y_train, ids_train, val, y_val, test, y_test, n_outputs, multilabel, first.key,
        first.attrs["backbone"]["slug"], [int(c) for c in unseen], dropped, sets, generations,
        list(first.attrs.get("dataset", {}).get("class_names") or []), pool,
    )  # fmt: skip


def _check_labels(path: str, y: np.ndarray, multilabel: bool) -> None:
    if len(y) == 0:
        raise SpecError(
            f"The training split of '{path}' has no labeled rows. Probes need labels: use a "
            "folder with class sub-folders or a manifest with a label column."
        )
    if not multilabel and len(np.unique(y)) < 2:
        raise SpecError(
            f"The training split of '{path}' has a single class ({int(y[0])}); a classifier "
            "needs at least two. Check the labels or the split names."
        )


def _should_stream(config: ProbeConfig, sets: dict[str, Any]) -> bool:
    if config.stream is not None:
        return config.stream
    need = sum(fs.nbytes for fs in sets.values())
    budget = (config.max_memory_gb or _default_budget_gb()) * 2**30
    return need > budget


def _default_budget_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 4
    except (ValueError, OSError):
        return 4.0


def _settings(config: ProbeConfig, data: ProbeData) -> Iterator[Setting]:
    """The full split and every few-shot subset (drawn from the train split only, by id hash,
    whether or not a validation part of it was held out for the full setting)."""
    if (config.shots or config.fractions) and data.multilabel:
        raise SpecError(
            "Few-shot subsets need single-label data; drop --shots/--fraction for multi-label sets."
        )
    for seed in config.seeds if config.include_full else ():
        yield Setting("full", seed, data.train, data.y_train, data.ids_train)
    draws = [(f"{k}-shot", partial(sample_shots, shots=k)) for k in config.shots] + [
        (f"{f:g}-fraction", partial(sample_fraction, fraction=f)) for f in config.fractions
    ]
    pool, y_pool, ids_pool = data.shot_pool
    for name, draw in draws:
        for seed in config.seeds:
            rows = draw(y_pool, ids_pool, seed=seed)
            yield Setting(name, seed, pool.take(rows), y_pool[rows], ids_pool[rows])


def _linear_unit(config: ProbeConfig, device: Any) -> Unit:
    def run(data: ProbeData, s: Setting) -> list[UnitResult]:
        if config.recipe == "bob":
            recipe = BobRecipe(epochs=config.epochs)
            net = train_bob_probe(
                s.train, s.y, n_outputs=data.n_outputs, seed=s.seed, recipe=recipe, device=device
            )
            metrics = data.metrics(bob_scores(net, data.test))
            how = f"BoB recipe ({config.epochs} epochs) fitted on train_rows"
            return [UnitResult("linear-bob", metrics, s.train.n, 0, how, _bob_head(net))]
        kw = {"n_outputs": data.n_outputs, "score": data.val_score, "device": device}
        if s.is_full:
            result = sweep(s.train, s.y, data.val, data.y_val, **kw)
        else:
            result = sweep_cv(s.train, s.y, cv_folds(s.y, s.ids, s.seed), **kw)
        metrics = {**data.metrics(result.model.scores(data.test)), "C": result.C}
        if not np.isnan(result.val_score):  # few-shot: the mean over folds inside the subset
            metrics["val_score" if s.is_full else "cv_score"] = result.val_score
        model = result.model
        head = HeadParams(model.weight, model.bias, model.standardizer.mean, model.standardizer.std)
        return [
            UnitResult("linear", metrics, result.train_rows, result.val_rows, result.protocol, head)
        ]

    return run


def _bob_head(net: Any) -> HeadParams:
    """The BoB probe (non-affine BatchNorm, then linear) as a head: its running statistics are
    the standardization (it predicts what the net does, up to float rounding)."""
    scale = (net.norm.running_var + net.norm.eps).sqrt()
    return HeadParams(
        *(t.detach().float().cpu().numpy() for t in (net.head.weight, net.head.bias)),
        net.norm.running_mean.float().cpu().numpy(), scale.float().cpu().numpy(),
    )  # fmt: skip


class _HeadSink:
    """Stores each linear unit's head beside the training split's feature set (single-label
    sets only). A store this run may not write gets no heads, and the summary says why."""

    def __init__(
        self, config: ProbeConfig, data: ProbeData, summary: ProbeSummary, versions: dict
    ) -> None:
        self.config, self.data, self.summary, self.versions = config, data, summary, versions
        self.home: FeatureSet | None = None  # a writable handle, opened at the first head
        self._stored: set[str] | None = None

    def has(self, method: str, config_hash: str) -> bool:
        """Whether a unit whose rows are in the table needs nothing more here: it keeps no
        head, or its head is stored beside *this* store's training set (the rows may come
        from another store with the same feature key)."""
        if method != "linear" or self.data.multilabel:
            return True
        if self._stored is None:
            self._stored = {r.name for r in list_heads(self.data.sets[self.config.train_split])}
        return config_hash in self._stored

    def store(self, results: list[UnitResult], setting: Setting, config_hash: str) -> None:
        if self.data.multilabel or self.summary.heads_note:
            return
        for r in results:
            if r.head is None:
                continue
            try:
                write_head(self._home(), self._record(r, setting, config_hash), r.head)
            except StoreNotWritableError as exc:
                self.summary.heads_note = f"probe heads were not stored: {exc}"
                return
            self.summary.heads.append(config_hash)

    def _home(self) -> FeatureSet:
        if self.home is None:
            c = self.config
            store = open_store(c.store, mode="a", storage_options=c.storage_options or None)
            path = self.data.sets[c.train_split].path
            self.home = FeatureSet(store.root[path], location=store.location)
        return self.home

    def _record(self, r: UnitResult, setting: Setting, config_hash: str) -> HeadRecord:
        c, d = self.config, self.data
        used = [d.sets[c.train_split]]
        chose = setting.is_full and r.val_rows and c.val_split != c.train_split
        if chose and c.val_split in d.sets:
            used.append(d.sets[c.val_split])  # C was chosen on it
        return HeadRecord(
            name=config_hash, method=r.name, setting=setting.name, seed=setting.seed,
            C=r.metrics.get("C"), classes=d.class_names, n_classes=d.n_outputs, dim=used[0].dim,
            dataset=c.dataset, backbone=d.backbone, feature_key=d.feature_key,
            feature_set=used[0].path, generations={fs.path: d.generations[fs.path] for fs in used},
            sets_created={fs.path: str(fs.attrs.get("created", "")) for fs in used},
            train_rows=r.train_rows, val_rows=r.val_rows, protocol=r.protocol,
            splits={"train": c.train_split, "val": c.val_split, "test": c.test_split},
            metrics={k: float(v) for k, v in r.metrics.items() if k != "C"},
            versions=self.versions,
        )  # fmt: skip


def _knn_unit(config: ProbeConfig, device: Any) -> Unit:
    def run(data: ProbeData, s: Setting) -> list[UnitResult]:
        ks, _ = split_ks(config.ks, s.train.n)  # the others are refused (``_usable_ks``)
        scores = knn_scores(
            s.train, s.y, data.test, n_outputs=data.n_outputs, ks=ks,
            temperature=config.temperature, use_gpu=device.type == "cuda",
        )  # fmt: skip
        how = "neighbours among train_rows; no hyper-parameter chosen"
        return [
            UnitResult(f"knn@{k}", data.metrics(v), s.train.n, 0, how) for k, v in scores.items()
        ]

    return run


def unit_hashes(config: ProbeConfig, feature_key: str) -> set[str]:
    """The config hash of every unit ``probe(config)`` runs on the set ``feature_key``: when
    the results table holds them all, there is nothing left to do (the battle's check)."""
    names = (["full"] if config.include_full else []) + [f"{k}-shot" for k in config.shots]
    names += [f"{f:g}-fraction" for f in config.fractions]
    # a kNN unit whose every k is above its setting's rows writes no row (it is refused)
    refused = _knn_refused(config, feature_key) if "knn" in config.methods else set()
    return {
        _unit_hash(config, feature_key, method, name, seed)
        for method in config.methods
        for name in names
        for seed in config.seeds
        if _runs(config, method, name, seed) and not (method == "knn" and name in refused)
    }


def _knn_refused(config: ProbeConfig, feature_key: str) -> set[str]:
    """The settings whose training rows are fewer than every k: ``probe`` writes no kNN row
    for them. Counted from the train split's labels alone (no features or ids read for
    single-label sets), the same counts ``probe`` draws (checked in the tests)."""
    return {name for name, n in setting_rows(config, feature_key).items() if n < min(config.ks)}


def setting_rows(config: ProbeConfig, feature_key: str) -> dict[str, int]:
    """Training rows of each setting ``probe(config)`` fits on the set ``feature_key``."""
    store = open_store(config.store, storage_options=config.storage_options or None)
    sets = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=feature_key,
        splits=(config.train_split,), optional=(config.val_split,),
    )  # fmt: skip
    train = sets[config.train_split]
    valid = np.flatnonzero(train.array("valid")[:])
    y = train.array("labels")[:][valid]
    if y.ndim == 1:
        y = y[y >= 0]
    has_val = config.val_split in sets and config.val_split != config.train_split
    if y.ndim == 2:  # multi-label: full only; the hold-out is drawn by id hash
        held = 0 if has_val else len(holdout(y, np.asarray(train.array("ids")[:])[valid],
                                            config.val_fraction)[1])  # fmt: skip
        return {"full": len(y) - held} if config.include_full else {}
    counts = np.unique(y, return_counts=True)[1]
    held = (
        0 if has_val else int(np.minimum(np.round(config.val_fraction * counts), counts - 1).sum())
    )
    rows = {"full": len(y) - held} if config.include_full else {}
    rows.update({f"{k}-shot": k * len(counts) for k in config.shots})
    rows.update({
        f"{f:g}-fraction": int(np.floor(f * counts + 1e-9).sum()) for f in config.fractions
    })  # fmt: skip
    return rows


def missing_heads(config: ProbeConfig, feature_key: str) -> set[str]:
    """The linear units of ``unit_hashes`` whose head is not stored beside the training set of
    ``feature_key`` in ``config.store`` (none for multi-label sets, which keep no heads)."""
    if "linear" not in config.methods:
        return set()
    store = open_store(config.store, storage_options=config.storage_options or None)
    train = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=feature_key,
        splits=(config.train_split,),
    )[config.train_split]  # fmt: skip
    if train.array("labels").ndim == 2:
        return set()
    linear = unit_hashes(replace(config, methods=("linear",)), feature_key)
    return linear - {r.name for r in list_heads(train)}


def _runs(config: ProbeConfig, method: str, setting: str, seed: int) -> bool:
    """Whether a (method, setting, seed) unit runs: the full split is deterministic except
    for the BoB recipe, so one seed is enough there."""
    if setting != "full":
        return True
    seeded = method == "linear" and config.recipe == "bob"
    return config.include_full and (seeded or seed == config.seeds[0])


def _unit_hash(config: ProbeConfig, feature_key: str, method: str, setting: str, seed: int) -> str:
    spec = {"method": method, "setting": setting, "seed": seed,
            **_config_identity(config, feature_key, method)}  # fmt: skip
    return stable_hash(spec)


def _config_identity(config: ProbeConfig, feature_key: str, method: str) -> dict[str, Any]:
    """Everything that changes a unit's numbers (the results-table config hash)."""
    ident: dict[str, Any] = {
        "stage": "probe",
        "dataset": config.dataset,
        "feature_key": feature_key,
        "splits": [config.train_split, config.val_split, config.test_split, config.val_fraction],
        "subsets": "id-hash",  # few-shot subsets and hold-outs drawn by a hash of the row ids
    }
    if method == "linear":
        ident["recipe"] = (
            [config.recipe, config.epochs] if config.recipe == "bob" else [config.recipe, 2]
        )  # 2: protocol version (few-shot C by cross-validation, converged refit)
    else:
        ident["knn"] = [list(config.ks), config.temperature]
    return ident
