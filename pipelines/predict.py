"""The predict stage: classify stored rows, or new images, with a stored linear probe head.

The head (default: the newest full-setting linear head of the selected feature key, see
:mod:`bob_cache.stores.head_store`) is refused when it was fitted on another feature key than
the set it would classify, or when the shards it was fitted on were recomputed since. Stored
rows are scored exactly as the probe scored its test split, so ``--split test`` reproduces the
probe's reported top-1. Images are embedded with the backbone rebuilt from the feature set's
provenance (preprocessing, decoding, precision), as ``query --image`` does, under the same
pixel limits, and rounded to the set's storage dtype, as their stored rows were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import (
    FeatureSetNotFoundError,
    HeadDamagedError,
    HeadNotFoundError,
    QueryError,
)
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import matches_backbone
from bob_cache.retrieval.query_inputs import (
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    check_request_pixels,
    decode_image,
    group_by_pixels,
    image_size,
)
from bob_cache.stores import FeatureSet, FeatureStore, open_store
from bob_cache.stores.head_store import (
    HeadParams,
    HeadRecord,
    check_head,
    incomplete_heads,
    list_heads,
    open_set,
    read_head,
)

STREAM_BYTES = 2**30  # feature sets holding more bytes than this are read shard by shard
Image = str | Path | bytes


@dataclass
class PredictConfig:
    """Options of ``bob-cache predict``: the feature sets, the head, and what to classify
    (exactly one of ``split`` and ``images``)."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    head: str | None = None
    split: str | None = None
    images: Sequence[Image] = ()
    k: int = 5
    weights: str | None = None
    device: str = "cpu"
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.split is None) == (not self.images):
            got = "both" if self.split is not None else "neither"
            raise QueryError(f"Pass exactly one of --split NAME or --image FILE (got {got}).")
        if self.k < 1:
            raise QueryError(f"-k must be at least 1, got {self.k}.")


@dataclass
class Predictions:
    """Logits of each query under one head; probabilities are their softmax."""

    head: HeadRecord
    feature_set: str
    queries: list[str]  # stored ids, or image names
    labels: np.ndarray  # true labels, -1 when unknown
    scores: np.ndarray  # (N, K) logits
    k: int = 5
    rows: np.ndarray | None = None  # stored row of each query (None: images)

    @property
    def predicted(self) -> np.ndarray:
        return self.scores.argmax(axis=1) if len(self.scores) else np.zeros(0, np.int64)

    @property
    def probabilities(self) -> np.ndarray:
        z = self.scores.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy over the queries with a known label (None when there are none)."""
        known = self.labels >= 0
        return float((self.predicted[known] == self.labels[known]).mean()) if known.any() else None

    def records(self) -> list[dict[str, Any]]:
        """Per query: its id or file, true label and class, and the top-k classes."""
        k = min(self.k, self.scores.shape[1])
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]  # ties: lowest label
        probs = np.take_along_axis(self.probabilities, order, axis=1)
        name = self.head.class_name
        out = []
        for i, (top, p) in enumerate(zip(order.tolist(), probs.tolist(), strict=True)):
            label = int(self.labels[i])
            out.append({
                "query": self.queries[i],
                "row": None if self.rows is None else int(self.rows[i]),
                "label": label, "class": name(label) if label >= 0 else "",
                "predicted": top[0], "predicted_class": name(top[0]), "probability": p[0],
                "top": [{"label": c, "class": name(c), "probability": q}
                        for c, q in zip(top, p, strict=True)],
            })  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        h = self.head
        return {
            "head": {"name": h.name, "method": h.method, "setting": h.setting, "seed": h.seed,
                     "C": h.C, "feature_key": h.feature_key, "feature_set": h.feature_set,
                     "metrics": h.metrics, "created": h.created},
            "feature_set": self.feature_set,
            "accuracy": self.accuracy,
            "labeled": int((self.labels >= 0).sum()),
            "predictions": self.records(),
        }  # fmt: skip


@register_stage("predict")
def predict(config: PredictConfig) -> Predictions:
    """Classify ``config.split``'s stored rows or ``config.images`` with a stored head.

    Raises:
        HeadNotFoundError: no head, or several that fit and none chosen (they are listed).
        HeadMismatchError: the head was fitted on another feature key.
        StaleHeadError: the shards it was fitted on were recomputed since.
        HeadDamagedError: its arrays are missing or incomplete.
    """
    store = open_store(config.store, storage_options=config.storage_options or None)
    home, record, target = choose(store, config)
    check_head(target, record, open_set=lambda path: open_set(store, path))
    params = read_head(home, record)
    if config.split is not None:
        return _predict_rows(target, record, params, k=config.k)
    x = embed_images(target, config)
    queries = [str(i) if isinstance(i, (str, Path)) else f"image {n}" for n, i in
               enumerate(config.images)]  # fmt: skip
    labels = np.full(len(x), -1, dtype=np.int64)
    return Predictions(record, target.path, queries, labels, params.scores(x), config.k)


def _predict_rows(fs: FeatureSet, record: HeadRecord, params: HeadParams, *, k: int) -> Predictions:
    from bob_cache.probes.features import load_rows

    features, labels, ids = load_rows(fs, stream=fs.nbytes > STREAM_BYTES)
    blocks = [params.scores(b) for b in features.blocks()]
    scores = np.concatenate(blocks) if blocks else np.zeros((0, record.n_classes), np.float32)
    if labels.ndim != 1:  # several label columns: no single true class
        labels = np.full(len(ids), -1, dtype=np.int64)
    rows = np.flatnonzero(fs.array("valid")[:])
    return Predictions(record, fs.path, [str(i) for i in ids], labels, scores, k, rows)


def embed_images(fs: FeatureSet, config: PredictConfig) -> np.ndarray:
    """Features of ``config.images`` as ``fs`` would store them: the backbone rebuilt from its
    provenance, images decoded a pixel budget at a time, rounded to its storage dtype."""
    from bob_cache.backbones.rebuild import embedder_from_provenance

    images = list(config.images)
    sizes = [image_size(image, max_pixels=config.max_image_pixels) for image in images]
    check_request_pixels(sizes, config.max_request_pixels)
    embedder = embedder_from_provenance(fs.attrs, weights=config.weights, device=config.device)
    out = []
    for group in group_by_pixels(sizes, config.max_image_pixels):
        decoded = [decode_image(images[i], max_pixels=config.max_image_pixels) for i in group]
        out.append(embedder.embed(decoded))
        del decoded
    x = np.concatenate(out)
    with np.errstate(over="ignore"):
        stored = x.astype(fs.features.dtype).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(stored).all(axis=1))
    if len(bad):
        raise QueryError(
            f"Image '{images[bad[0]]}' gives features beyond {fs.features.dtype}'s range (the "
            f"dtype of '{fs.path}'), as extraction would have refused too. Classify another "
            "image, or re-extract the set with --dtype float32 and refit its head."
        )
    return stored


def choose(store: FeatureStore, config: PredictConfig) -> tuple[FeatureSet, HeadRecord, FeatureSet]:
    """``(set holding the head, its record, set to classify)`` for ``config``.

    ``--head NAME`` (a name or unique prefix) is looked up among every set of the dataset and
    backbone, so a head of another feature key is found, then refused with the reason.
    """
    every = [
        fs
        for fs in store.feature_sets()
        if fs.attrs["dataset"]["name"] == config.dataset and matches_backbone(fs, config.backbone)
    ]
    if not every:
        raise FeatureSetNotFoundError(
            f"No feature set for dataset '{config.dataset}' and backbone '{config.backbone}' "
            f"in '{store.location}'. See `bob-cache ls {store.location}` for what it holds."
        )
    keyed = [fs for fs in every if config.feature is None or fs.key.startswith(config.feature)]
    home, record = _pick_head(store, config, every if config.head else keyed)
    if config.feature is None:
        keyed = [fs for fs in every if fs.key == record.feature_key]
    return home, record, _pick_target(config, keyed, home)


def _pick_head(
    store: FeatureStore, config: PredictConfig, pool: list[FeatureSet]
) -> tuple[FeatureSet, HeadRecord]:
    found = [(fs, r) for fs in pool for r in list_heads(fs)]
    what = f"'{config.dataset}' with '{config.backbone}'"
    if config.head:
        named = [c for c in found if c[1].name == config.head] or [
            c for c in found if c[1].name.startswith(config.head)
        ]
        if len(named) == 1:
            return named[0]
        if named:
            raise HeadNotFoundError(
                f"'{config.head}' matches {len(named)} probe heads of {what}: "
                f"{_listing(named)}. Pass a longer --head."
            )
        _refuse_incomplete(store, pool, config.head)
        raise HeadNotFoundError(f"No probe head '{config.head}' for {what}. {_have(store, found)}")
    full = [c for c in found if c[1].setting == "full"]
    if not full:
        if found:
            raise HeadNotFoundError(f"No full-setting probe head for {what}. {_have(store, found)}")
        _refuse_incomplete(store, pool, "")
        raise HeadNotFoundError(
            f"No probe head is stored for {what}. Fit one with `bob-cache probe --store "
            f"{store.location} --dataset {config.dataset} --backbone {config.backbone} "
            "--method linear` (it stores the head of every linear probe it fits)."
        )
    if len({r.feature_key for _, r in full}) > 1:
        raise HeadNotFoundError(
            f"Full-setting probe heads of several feature keys exist for {what}: "
            f"{_listing(full)}. Pick one with --feature KEY or --head NAME."
        )
    return max(full, key=lambda c: c[1].created)


def _refuse_incomplete(store: FeatureStore, pool: list[FeatureSet], prefix: str) -> None:
    for fs in pool:
        for name in incomplete_heads(fs):
            if name.startswith(prefix):
                raise HeadDamagedError(
                    f"Probe head '{name}' beside '{fs.path}' is incomplete: its write never "
                    "finished (the probe was killed). Refit it: rerun the `bob-cache probe` "
                    f"that fitted it with --force (e.g. `bob-cache probe --store {store.location} "
                    f"--dataset {fs.attrs['dataset']['name']} --backbone "
                    f"{fs.attrs['backbone']['slug']} --feature {fs.key} --method linear --force`)."
                )


def _listing(found: list[tuple[FeatureSet, HeadRecord]]) -> str:
    return "; ".join(
        f"{r.name} ({r.method}, {r.setting}, seed {r.seed}, key {r.feature_key}, {r.created})"
        for _, r in sorted(found, key=lambda c: c[1].created, reverse=True)[:10]
    )


def _have(store: FeatureStore, found: list[tuple[FeatureSet, HeadRecord]]) -> str:
    if not found:
        return f"None is stored; fit one with `bob-cache probe --store {store.location} ...`."
    return (
        f"Stored heads: {_listing(found)}. Pass one with --head NAME (all of them: "
        f"`bob-cache ls {store.location} --heads`)."
    )


def _pick_target(config: PredictConfig, sets: list[FeatureSet], home: FeatureSet) -> FeatureSet:
    """The set to classify: ``--split``'s, or (images) the head's own set when selected."""
    if config.split is not None:
        chosen = [fs for fs in sets if fs.attrs["split"] == config.split]
    else:  # every split of one key has the same provenance; prefer the head's own set
        chosen = [fs for fs in sets if fs.path == home.path] or sets
    if not chosen:
        have = sorted({f"{fs.attrs['split']} (key {fs.key})" for fs in sets}) or ["none"]
        raise FeatureSetNotFoundError(
            f"No feature set of split '{config.split}' for '{config.dataset}' with "
            f"'{config.backbone}'{f' and key {config.feature}' if config.feature else ''}; "
            f"extracted: {', '.join(have)}. Extract it, or pass one of those to --split."
        )
    if len({fs.key for fs in chosen}) > 1:
        raise FeatureSetNotFoundError(
            f"--feature {config.feature} matches several feature keys "
            f"({', '.join(sorted({fs.key for fs in chosen}))}). Pass a longer prefix."
        )
    return chosen[0]
