"""The transferability stage: cheap estimates from cached features, beside the measured battle.

For one feature key it scores the training split's labelled rows with each requested
estimator (``logme``, ``hscore``, ``leep``, ``nce``, ``knn-loo``; :mod:`bob_cache.transfer`)
and appends one results row per estimate (``stage = transferability``, ``method`` = the
estimator, ``setting = full``, ``split`` = the training split, ``train_rows`` = the rows it
read, ``protocol`` in words). These rows are never ranked as a task
(:mod:`bob_cache.ranking.tasks`); the report compares them with the measured outcomes
(:func:`bob_cache.transfer.agreement_table`). A unit (one estimator with its options on one
feature key) already in the table is skipped unless ``force``.

Rows are streamed shard by shard when the set exceeds ``max_memory_gb`` (as the probes do);
LogME and H-score share one pass, LEEP and NCE one pass of source logits (LEEP a second).

**The source-task classifier of LEEP and NCE** is the backbone's own classifier (timm's
``get_classifier()``, torchvision's last ``Linear``), which reads exactly the stored
pre-logit features of the default output (``--layers final``, default ``--pool``). It is taken
from the backbone rebuilt on CPU from the feature set's provenance (the check that ``predict
--image`` makes: the rebuilt model must reproduce the recorded spec); no image is read. A set
of another layer or pooling, or a backbone without a classifier (official self-supervised
checkpoints, the Stable Diffusion encoder), is refused with what to use instead. A
random-init backbone's classifier is random too: its rows say so in their protocol.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bob_cache.data.splits import rule_text
from bob_cache.errors import SpecError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.probes.features import load_rows
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.results import ResultsTable, config_columns
from bob_cache.transfer import (
    Estimator,
    TransferInputs,
    check_labels,
    create_estimator,
    get_estimator_class,
    labelled_rows,
    list_estimators,
)
from bob_cache.transfer.knn_loo import DEFAULT_K, DEFAULT_MAX_ROWS

logger = logging.getLogger(__name__)
STAGE = "transferability"
METHODS = ("logme", "hscore", "leep", "nce", "knn-loo")
DEFAULT_METHODS = ("logme", "hscore", "knn-loo")  # those that need no source classifier
VERSION = 1  # of the estimators' definitions (part of every unit's identity)


@dataclass
class TransferConfig:
    """Options of ``bob-cache probe --method logme,...`` (see ``bob-cache probe --help``)."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    train_split: str = "train"
    knn_k: int = DEFAULT_K
    knn_max_rows: int = DEFAULT_MAX_ROWS
    weights: str | None = None  # the backbone's checkpoint, when its recorded file moved
    results: str | None = None
    force: bool = False
    stream: bool | None = None  # None: stream when the set exceeds max_memory_gb
    max_memory_gb: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise SpecError(f"No transferability method given; pick from {', '.join(METHODS)}.")
        for name in self.methods:
            get_estimator_class(name)  # unknown names: the valid ones are listed
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if twice:
            raise SpecError(f"--method names {twice} more than once; name each method once.")
        self.estimators()  # options checked before any work

    def estimators(self) -> dict[str, Estimator]:
        options = {"knn-loo": {"k": self.knn_k, "max_rows": self.knn_max_rows}}
        return {m: create_estimator(m, **options.get(m, {})) for m in self.methods}


@dataclass
class TransferSummary:
    """What a transferability run did; ``table`` holds this feature key's estimates."""

    dataset: str
    backbone: str
    feature_key: str
    results: str
    split: str
    units_run: int = 0
    units_skipped: int = 0
    unlabeled_rows_dropped: int = 0
    source: str = ""  # the source classifier LEEP and NCE read, when they ran
    table: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage(STAGE)
def transferability(config: TransferConfig) -> TransferSummary:
    """Run every estimator unit of ``config`` not yet in the results table."""
    started = time.perf_counter()
    fs = _training_set(config)
    _check_labels(fs)
    estimators = config.estimators()
    table = ResultsTable.open(config.results, storage_options=config.storage_options or None)
    summary = TransferSummary(config.dataset, fs.attrs["backbone"]["slug"], fs.key,
                              str(table.directory), config.train_split)  # fmt: skip
    done = table.config_hashes()
    todo = {}
    for name, estimator in estimators.items():
        if not config.force and unit_hash(config, fs.key, estimator) in done:
            summary.units_skipped += 1
        else:
            todo[name] = estimator
    if todo:
        inputs = _inputs(config, fs, need_source=any(e.needs_source for e in todo.values()))
        summary.unlabeled_rows_dropped, summary.source = inputs.rows.dropped, inputs.source_note
        context = {"run_id": uuid.uuid4().hex[:12], "versions": library_versions()}
        for name, estimator in todo.items():
            began = time.perf_counter()
            estimate = estimator.estimate(inputs)
            logger.info("%s of %s: %.6g (%.1f s)", name, fs.path, estimate.value,
                        time.perf_counter() - began)  # fmt: skip
            table.append(_rows(config, fs, estimator, estimate, context))
            summary.units_run += 1
    frame = table.read(dataset=config.dataset, backbone=summary.backbone, feature_key=fs.key)
    summary.table = _table(frame[frame["stage"] == STAGE], config.train_split)
    summary.seconds = time.perf_counter() - started
    return summary


def unit_hash(config: TransferConfig, feature_key: str, estimator: Estimator) -> str:
    """The results-table config hash of one estimator on one feature key."""
    return stable_hash({
        "stage": STAGE, "version": VERSION, "dataset": config.dataset,
        "feature_key": feature_key, "split": config.train_split, "method": estimator.name,
        "options": estimator.options(),
    })  # fmt: skip


def unit_hashes(config: TransferConfig, feature_key: str) -> set[str]:
    """Every unit's config hash: when the table holds them all, nothing is left to do."""
    return {unit_hash(config, feature_key, e) for e in config.estimators().values()}


def _training_set(config: TransferConfig) -> FeatureSet:
    store = open_store(config.store, storage_options=config.storage_options or None)
    sets = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
        splits=(config.train_split,),
    )  # fmt: skip
    return sets[config.train_split]


def _check_labels(fs: FeatureSet) -> None:
    """Refuse multi-label, unlabelled and one-class sets before any work (labels only)."""
    valid = np.asarray(fs.array("valid")[:], dtype=bool)
    check_labels(np.asarray(fs.array("labels")[:])[valid], what=f"The rows of '{fs.path}'")


def _inputs(config: TransferConfig, fs: FeatureSet, *, need_source: bool) -> TransferInputs:
    source, note = _source_head(config, fs) if need_source else (None, "")
    features, labels, ids = load_rows(fs, stream=_should_stream(config, fs))
    rows = labelled_rows(features, labels, ids, what=f"The rows of '{fs.path}'")
    return TransferInputs(rows, source=source, source_note=note)


def _should_stream(config: TransferConfig, fs: FeatureSet) -> bool:
    from bob_cache.pipelines.probe import _default_budget_gb

    if config.stream is not None:
        return config.stream
    return fs.nbytes > (config.max_memory_gb or _default_budget_gb()) * 2**30


def _source_head(config: TransferConfig, fs: FeatureSet) -> tuple[Any, str]:
    """The backbone's own classifier over the set's features, and how rows describe it."""
    spec = fs.attrs.get("spec", {})
    asked = ", ".join(m for m in config.methods if get_estimator_class(m).needs_source)
    if spec.get("layer") != "final" or spec.get("pool") != "head":
        raise SpecError(
            f"{asked} read the backbone's source-task classifier, which takes its pre-logit "
            f"features; '{fs.path}' holds layer {spec.get('layer')} pooled by "
            f"{spec.get('pool')}. Extract the default output (--layers final, default --pool) "
            "and pass its key with --feature, or use logme, hscore or knn-loo on this set."
        )
    import torch

    from bob_cache.backbones.rebuild import embedder_from_provenance
    from bob_cache.ood import LinearHead

    embedder = embedder_from_provenance(dict(fs.attrs), weights=config.weights, device="cpu")
    head = embedder.backbone.head
    if (
        not isinstance(head, torch.nn.Linear)
        or head.in_features != fs.dim
        or not _head_in_checkpoint(embedder.backbone, head)
    ):
        raise SpecError(
            f"{asked} need the backbone's source-task classifier, and "
            f"'{fs.attrs['backbone']['slug']}' has none over its {fs.dim}-d features (e.g. an "
            "official self-supervised checkpoint, or a weights file without a head). Use "
            "logme, hscore or knn-loo for this backbone."
        )
    weight = head.weight.detach().double().numpy()
    bias = None if head.bias is None else head.bias.detach().double().numpy()
    weights = spec["backbone"]["weights"]
    origin = {"random": f"random init, seed {weights.get('seed')}: no source task",
              "file": f"weights file sha256 {str(weights.get('sha256', ''))[:12]}",
              "pretrained": f"pretrained weights {weights.get('tag')}"}  # fmt: skip
    note = (
        f"the backbone's own {len(weight)}-class classifier "
        f"({origin.get(weights.get('kind'), weights.get('kind'))})"
    )
    return LinearHead(weight, bias), note


def _head_in_checkpoint(backbone: Any, head: Any) -> bool:
    """Whether the classifier came from the weights (a weights file may lack one, leaving the
    architecture's random head): the file holds a tensor equal to its weight."""
    if backbone.weights.kind != "file" or backbone.weights.file is None:
        return True
    from bob_cache.backbones.weights import load_state_dict

    weight = head.weight.detach().float()
    return any(
        tuple(t.shape) == tuple(weight.shape) and bool((t.float() == weight).all())
        for t in load_state_dict(backbone.weights.file).values()
        if hasattr(t, "shape")
    )


def _rows(
    config: TransferConfig, fs: FeatureSet, estimator: Estimator, estimate: Any,
    context: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    base = {
        **context, "stage": STAGE, "dataset": config.dataset, "split": config.train_split,
        "backbone": fs.attrs["backbone"]["slug"], "feature_key": fs.key,
        "method": estimator.name, "setting": "full", "seed": 0,
        "config_hash": unit_hash(config, fs.key, estimator), "time": utc_now(),
        "train_rows": estimate.rows, "val_rows": 0, "protocol": estimate.protocol, "task": "",
        "split_rule": rule_text(fs.attrs.get("dataset", {})),
        **config_columns(fs.attrs.get("spec"), stage=STAGE, version=VERSION,
                         options=estimator.options()),
    }  # fmt: skip
    return [{**base, "metric": k, "value": float(v)} for k, v in estimate.metrics.items()]


def _table(frame: Any, split: str) -> list[dict[str, Any]]:
    """One record per method of this key (its newest rows): the estimate, its metric, the
    rows it read, and its other metrics as ``details``."""
    frame = frame[frame["split"] == split].sort_values("time")
    records = []
    present = set(frame["method"])
    for method in dict.fromkeys(m for m in (*METHODS, *list_estimators()) if m in present):
        rows = frame[frame["method"] == method].drop_duplicates("metric", keep="last")
        values = dict(zip(rows["metric"], rows["value"].astype(float), strict=True))
        metric = get_estimator_class(method).metric
        if metric not in values:
            continue
        details = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != metric)
        n = int(rows["train_rows"].iloc[-1])
        records.append({"method": method, "metric": metric, "estimate": values[metric],
                        "train_rows": n, "details": details})  # fmt: skip
    return records
