"""The retrieval-eval stage: BoB's image-retrieval numbers from cached features.

``classes``: a deterministic stratified ``--query-fraction`` of each class of the split is
the query set, the rest the database; relevant = same class. ``gnd``: queries and database
are named by a Revisited Oxford/Paris ground-truth file; database rows it does not name act
as distractors (the R1M setting); Easy, Medium and Hard are reported. Ranking is exact
(every database row scored), so the numbers measure the features, not an index. A set extracted
from a revisitop source (:mod:`bob_cache.data.revisitop`) records its ground truth and its
query split (the queries cropped to their boxes): ``--gnd`` and ``--query-split`` then default
to them.

``--metrics-definition`` picks how AP and precision@k are computed (see
:mod:`bob_cache.retrieval.metrics`): ``sklearn`` (the classes default) or ``revisitop`` (the
gnd default; BoB's definitions for every dataset). The definition is part of each row's
``protocol`` text and of its config hash, so rows under different definitions never mix.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.data.splits import rule_text
from bob_cache.errors import DataNotFoundError, GroundTruthError, SpecError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.probes import holdout
from bob_cache.probes.features import load_rows
from bob_cache.provenance import library_versions, utc_now
from bob_cache.retrieval.faiss_ops import prepare
from bob_cache.retrieval.gnd import PROTOCOLS, GroundTruth, load_ground_truth, match_names
from bob_cache.retrieval.kinds import parse_metric
from bob_cache.retrieval.metrics import (
    classes_block_metrics,
    get_metrics_definition,
    gnd_query_metrics,
    mean_block_metrics,
    mean_metrics,
)
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.results import ResultsTable, config_columns

EVAL_PROTOCOLS = ("classes", "gnd")
# --metrics-definition when none is given: classes keeps scikit-learn's AP, which its rows used
# before the option existed; gnd uses revisitop's compute_map, the protocol's own definitions.
DEFAULT_METRICS_DEFINITION = {"classes": "sklearn", "gnd": "revisitop"}
_BLOCK = 256  # queries scored per matrix product


@dataclass
class RetrievalEvalConfig:
    """Options of ``bob-cache retrieval-eval``."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    split: str = "train"
    protocol: str = "classes"
    gnd: str | None = None
    query_split: str | None = None
    query_fraction: float = 0.2
    seed: int = 0
    metric: str = "cosine"
    metrics_definition: str = ""  # "" = the protocol's default
    results: str | None = None
    force: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_metric(self.metric)
        if self.protocol not in EVAL_PROTOCOLS:
            raise SpecError(
                f"Unknown --protocol '{self.protocol}'. Expected {' or '.join(EVAL_PROTOCOLS)}."
            )
        if not 0 < self.query_fraction < 1:
            raise SpecError(f"--query-fraction must be between 0 and 1, got {self.query_fraction}.")
        self.metrics_definition = resolve_metrics_definition(self.protocol, self.metrics_definition)


def resolve_metrics_definition(protocol: str, name: str = "") -> str:
    """``name`` checked against the registry, or ``protocol``'s default when empty."""
    return get_metrics_definition(name or DEFAULT_METRICS_DEFINITION[protocol]).name


@dataclass
class RetrievalEvalSummary:
    """Mean metrics per method (``classes`` or ``gnd-easy|medium|hard``)."""

    dataset: str
    backbone: str
    feature_key: str
    protocol: str
    metrics_definition: str = ""
    split_rule: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    queries_skipped: dict[str, int] = field(default_factory=dict)
    database_rows: int = 0
    skipped: bool = False
    results: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("retrieval-eval")
def retrieval_eval(config: RetrievalEvalConfig) -> RetrievalEvalSummary:
    """Evaluate retrieval on one feature set and append the rows to the results table."""
    started = time.perf_counter()
    truth = load_ground_truth(config.gnd) if config.protocol == "gnd" and config.gnd else None
    store = open_store(config.store, storage_options=config.storage_options or None)
    query_split = config.query_split or config.split
    sets = _select(config, store)
    db_set = sets[config.split]
    if config.protocol == "gnd" and truth is None:
        truth = _recorded_ground_truth(db_set)
    summary = RetrievalEvalSummary(
        config.dataset, db_set.attrs["backbone"]["slug"], db_set.key, config.protocol,
        config.metrics_definition, rule_text(db_set.attrs.get("dataset", {})),
    )  # fmt: skip
    table = ResultsTable.open(config.results)
    summary.results = str(table.directory)
    ident = _identity(config, db_set, query_split)
    config_hash = stable_hash(ident)
    if not config.force and table.has_config(config_hash):
        summary.skipped = True
        frame = table.read(stage="retrieval", feature_key=db_set.key)
        frame = frame[frame["config_hash"] == config_hash]
        for method, rows in frame.groupby("method"):
            summary.metrics[str(method)] = dict(zip(rows["metric"], rows["value"], strict=True))
    else:
        if config.protocol == "classes":
            _classes(config, db_set, summary)
        else:
            _gnd(config, truth, db_set, sets[_query_split(config, db_set)], summary)
        spec = db_set.attrs.get("spec")
        table.append(_rows(config, summary, config_hash, ident=ident, spec=spec))
    summary.seconds = time.perf_counter() - started
    return summary


def _select(config: RetrievalEvalConfig, store: Any) -> dict[str, FeatureSet]:
    """The database split's set and, for gnd, the query split's set of the same key: the split
    ``--query-split`` names, else the one the source recorded (revisitop's cropped queries),
    else the database split itself."""
    listed = store.feature_sets()
    find = functools.partial(
        select_feature_sets, store, dataset=config.dataset, backbone=config.backbone,
        listed=listed,
    )  # fmt: skip
    if config.protocol != "gnd" or config.query_split:
        splits = tuple(dict.fromkeys((config.split, config.query_split or config.split)))
        return find(feature=config.feature, splits=splits)
    sets = find(feature=config.feature, splits=(config.split,))
    query_split = _query_split(config, sets[config.split])
    if query_split not in sets:
        sets.update(find(feature=sets[config.split].key, splits=(query_split,)))
    return sets


def _query_split(config: RetrievalEvalConfig, db_set: FeatureSet) -> str:
    recorded = db_set.attrs.get("dataset", {}).get("retrieval") or {}
    return config.query_split or recorded.get("query_split") or config.split


def _recorded_ground_truth(fs: FeatureSet) -> GroundTruth:
    """The ground truth a revisitop source recorded in ``fs``'s provenance, checked to be the
    file it was extracted with.

    Raises:
        SpecError: the source recorded none (the fix: --gnd FILE).
        DataNotFoundError: the file is gone.
        GroundTruthError: the file changed since extraction.
    """
    from bob_cache.hashing import file_sha256

    dataset = fs.attrs.get("dataset", {})
    recorded = dataset.get("retrieval") or {}
    path = recorded.get("ground_truth")
    if not path:
        raise SpecError(
            f"--protocol gnd needs --gnd FILE (Revisited Oxford/Paris format): '{fs.path}' was "
            f"extracted from a '{dataset.get('kind', '?')}' source, which records no ground "
            "truth (a revisitop:NAME:ROOT source does). Pass --gnd FILE."
        )
    if not Path(path).is_file():
        raise DataNotFoundError(
            f"The ground truth '{path}' recorded by '{fs.path}' is gone. Fix: pass --gnd FILE "
            "where it is now."
        )
    if file_sha256(path) != recorded.get("ground_truth_sha256"):
        raise GroundTruthError(
            f"The ground truth '{path}' changed since '{fs.path}' was extracted from it (its "
            "sha256 differs), so its queries and boxes may not match the stored rows. Fix: "
            "extract the dataset again, or pass --gnd FILE to evaluate with that file anyway."
        )
    return load_ground_truth(path)


def _classes(config: RetrievalEvalConfig, fs: FeatureSet, summary: RetrievalEvalSummary) -> None:
    features, labels, ids = load_rows(fs, stream=False)
    if labels.ndim != 1:
        raise SpecError(
            "--protocol classes needs single-label rows; this set is multi-label. "
            "Use --protocol gnd with a ground-truth file."
        )
    keep = labels >= 0
    x = prepare(features.materialize()[keep], config.metric)
    y = labels[keep]
    if len(np.unique(y)) < 2:
        raise SpecError(
            f"'{fs.path}' has {len(np.unique(y))} labeled class(es); class-based retrieval "
            "needs at least two. Use --protocol gnd, or a split with class labels."
        )
    db, queries = holdout(y, ids[keep], config.query_fraction, seed=config.seed)
    blocks, counted, skipped = [], 0, 0
    for q_rows, scores in _scored(x[queries], x[db], config.metric):
        relevant = y[db][None, :] == y[queries[q_rows]][:, None]
        has = relevant.any(1)  # a class with no other member in the database: no answer
        skipped += int((~has).sum())
        counted += int(has.sum())
        if has.any():
            blocks.append(
                classes_block_metrics(
                    scores[has], relevant[has], definition=config.metrics_definition
                )
            )
    summary.metrics["classes"] = mean_block_metrics(blocks)
    summary.queries["classes"] = counted
    summary.queries_skipped["classes"] = skipped
    summary.database_rows = len(db)


def _gnd(
    config: RetrievalEvalConfig,
    truth: GroundTruth | None,
    db_set: FeatureSet,
    q_set: FeatureSet,
    summary: RetrievalEvalSummary,
) -> None:
    assert truth is not None  # loaded and validated by retrieval_eval
    db_x, db_ids = _vectors(db_set, config.metric)
    q_x, q_ids = (db_x, db_ids) if q_set is db_set else _vectors(q_set, config.metric)
    im_rows = _require_rows(truth.imlist, db_ids, "imlist", db_set, truth)
    q_rows = _require_rows(truth.qimlist, q_ids, "qimlist", q_set, truth)
    same = q_set is db_set
    per: dict[str, list[dict[str, float]]] = {p: [] for p in PROTOCOLS}
    skipped = dict.fromkeys(PROTOCOLS, 0)
    for block, scores in _scored(q_x[q_rows], db_x, config.metric):
        for i, s in zip(block, scores, strict=True):
            ranking = np.argsort(-s, kind="stable")
            own = np.array([q_rows[i]]) if same else np.zeros(0, np.int64)
            for protocol in PROTOCOLS:
                pos, ign = truth.split(int(i), protocol)
                if not len(pos):
                    skipped[protocol] += 1
                    continue
                ignored = np.concatenate([im_rows[ign], own])
                per[protocol].append(
                    gnd_query_metrics(
                        ranking, im_rows[pos], ignored, definition=config.metrics_definition
                    )
                )
    for protocol in PROTOCOLS:
        summary.metrics[f"gnd-{protocol}"] = mean_metrics(per[protocol])
        summary.queries[f"gnd-{protocol}"] = len(per[protocol])
        summary.queries_skipped[f"gnd-{protocol}"] = skipped[protocol]
    summary.database_rows = len(db_x)


def _vectors(fs: FeatureSet, metric: str) -> tuple[np.ndarray, np.ndarray]:
    features, _, ids = load_rows(fs, stream=False)
    return prepare(features.materialize(), metric), ids


def _require_rows(
    names: list[str], ids: np.ndarray, what: str, fs: FeatureSet, truth: GroundTruth
) -> np.ndarray:
    rows = match_names(names, ids)
    missing = [n for n, r in zip(names, rows, strict=True) if r < 0]
    if missing:
        raise GroundTruthError(
            f"{len(missing)} of {len(names)} {what} images of the ground truth are not valid "
            f"rows of '{fs.path}', e.g. {', '.join(missing[:3])}. Extract the images the file "
            "names (ids match exactly or by file stem), or pass --split/--query-split."
        )
    return rows


def _scored(
    queries: np.ndarray, database: np.ndarray, metric: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(query positions, scores over the database)`` in blocks; higher is closer."""
    sq_norms = (database**2).sum(1) if metric == "l2" else None
    block = max(1, min(_BLOCK, 2**25 // max(1, len(database))))  # ~128 MiB of scores
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        scores = q @ database.T
        if sq_norms is not None:  # -||q - d||² up to a per-query constant
            scores = 2 * scores - sq_norms
        yield np.arange(start, start + len(q)), scores


def _identity(config: RetrievalEvalConfig, fs: FeatureSet, query_split: str) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "stage": "retrieval", "feature_key": fs.key, "protocol": config.protocol,
        "split": config.split, "metric": config.metric,
    }  # fmt: skip
    # Rows written before --metrics-definition existed were classes rows under sklearn's
    # definitions (they keep their hash) or gnd rows with plain precision@k (no definition
    # matches them, so every gnd identity names its definition).
    if (config.protocol, config.metrics_definition) != ("classes", "sklearn"):
        ident["metrics_definition"] = config.metrics_definition
    if config.protocol == "classes":
        ident["queries"] = [config.query_fraction, config.seed]
    else:
        from bob_cache.hashing import file_sha256

        # without --gnd, the file the source recorded: its sha256 is in the dataset
        # fingerprint, so in the feature key
        source = "recorded by the source"
        ident["gnd"] = [file_sha256(config.gnd) if config.gnd else source, query_split]
    return ident


def _rows(
    config: RetrievalEvalConfig,
    summary: RetrievalEvalSummary,
    config_hash: str,
    *,
    ident: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    # the row's configuration: its identity without the seed of the query draw
    options = {k: v for k, v in (ident or {}).items() if k not in ("stage", "feature_key")}
    if "queries" in options:
        options["queries"] = options["queries"][0]  # the fraction; [1] is the seed
    base = {
        "run_id": uuid.uuid4().hex[:12], "stage": "retrieval", "dataset": config.dataset,
        "split": config.split, "backbone": summary.backbone, "feature_key": summary.feature_key,
        "setting": (
            f"{config.query_fraction:g}-queries" if config.protocol == "classes" else "gnd"
        ),
        "seed": config.seed, "config_hash": config_hash, "versions": library_versions(),
        "time": utc_now(), "train_rows": 0, "val_rows": 0, "protocol": _protocol_text(config),
        "split_rule": summary.split_rule, **config_columns(spec, **options),
    }  # fmt: skip
    return [
        {**base, "method": method, "metric": metric, "value": float(value)}
        for method, values in summary.metrics.items()
        for metric, value in values.items()
    ]


def _protocol_text(config: RetrievalEvalConfig) -> str:
    """The ``protocol`` column: who judges relevance, and the metric definitions used."""
    definition = get_metrics_definition(config.metrics_definition)
    if config.protocol == "classes":
        judge = "no fitting: a query's class judges relevance"
    else:
        judge = "no fitting: the ground truth judges relevance (ignored images removed first)"
    return f"{judge}; {definition.description}"


def config_hash(config: RetrievalEvalConfig, feature_key: str) -> str:
    """The results-table config hash of ``config`` on the feature set ``feature_key`` (the
    battle's done check: the stage writes its rows under this hash)."""
    from types import SimpleNamespace

    fs: Any = SimpleNamespace(key=feature_key)
    return stable_hash(_identity(config, fs, config.query_split or config.split))
