"""Which feature sets an OOD evaluation reads: the ID splits, and for every shift or detect
dataset the one set made with the same recipe (backbone, weights, layer, pooling,
preprocessing, precision, dtype; only the data differs).

A shift or detect dataset is read from its ``test`` split, or from its only split when it has
one. Sets are loaded as :class:`~bob_cache.probes.features.Features` (in memory, or streamed
shard by shard when the run's memory budget says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bob_cache.errors import FeatureSetNotFoundError, SpecError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.selection import matches_backbone
from bob_cache.probes.features import Features, load_rows
from bob_cache.stores import FeatureSet, FeatureStore

OTHER_SPLIT = "test"


@dataclass(frozen=True)
class Rows:
    """The valid rows of one feature set, and its labels (-1: unlabeled)."""

    fs: FeatureSet
    features: Features
    labels: np.ndarray

    @property
    def n(self) -> int:
        return self.features.n

    @property
    def dataset(self) -> str:
        return str(self.fs.attrs["dataset"]["name"])

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.fs.attrs["dataset"].get("class_names") or []]

    def labelled_blocks(self) -> Any:
        """``(float32 features, labels)`` blocks in row order."""
        at = 0
        for block in self.features.blocks():
            yield block, self.labels[at : at + len(block)]
            at += len(block)


def recipe(fs: FeatureSet) -> dict[str, Any]:
    """What makes ``fs``'s numbers comparable to another dataset's: its spec without the data."""
    return {k: v for k, v in fs.attrs["spec"].items() if k != "dataset"}


def recipe_key(fs: FeatureSet) -> str:
    return stable_hash(recipe(fs), length=12)


def load(fs: FeatureSet, *, stream: bool, labelled: bool = False) -> Rows:
    """The valid rows of ``fs`` (``labelled``: only rows with a label, single-label only)."""
    features, labels, _ = load_rows(fs, stream=stream)
    if labels.ndim != 1:
        raise SpecError(
            f"'{fs.path}' has multi-label rows; OOD evaluation needs one class per row."
        )
    if labelled:
        keep = np.flatnonzero(labels >= 0)
        if len(keep) < len(labels):
            features, labels = features.take(keep), labels[keep]
    return Rows(fs, features, labels)


def other_set(
    store: FeatureStore, dataset: str, *, like: FeatureSet, backbone: str, role: str
) -> FeatureSet:
    """The set of ``dataset`` made with ``like``'s recipe: its test split, or its only split.

    Raises:
        FeatureSetNotFoundError: the dataset is not extracted with this backbone, only with
            another recipe (the difference is named), or has several splits and no test split.
    """
    if dataset == like.attrs["dataset"]["name"]:
        raise SpecError(
            f"--{role} {dataset} is the ID dataset itself; name another dataset (e.g. a "
            "corrupted copy made with `bob-cache shift`)."
        )
    mine = [
        fs for fs in store.feature_sets()
        if fs.attrs["dataset"]["name"] == dataset and matches_backbone(fs, backbone)
    ]  # fmt: skip
    if not mine:
        raise FeatureSetNotFoundError(
            f"No feature set of {role} dataset '{dataset}' with backbone '{backbone}' in "
            f"'{store.location}'. Extract it with the same backbone and options as the ID set "
            f"(`bob-cache extract --data ... --name {dataset} --backbone {backbone} --store "
            f"{store.location}`)."
        )
    want = recipe_key(like)
    same = [fs for fs in mine if recipe_key(fs) == want]
    if not same:
        raise FeatureSetNotFoundError(
            f"The {role} dataset '{dataset}' was extracted with '{backbone}' but not with the ID "
            f"set's recipe (key {like.key}): {_difference(like, mine[0])}. Features of "
            "different backbones, layers, pooling or preprocessing cannot be compared; "
            "extract it with the ID set's options."
        )
    splits = {fs.attrs["split"]: fs for fs in same}
    if OTHER_SPLIT in splits or len(splits) == 1:
        chosen = splits.get(OTHER_SPLIT) or next(iter(splits.values()))
        chosen.check_intact()  # a missing object would read as data
        return chosen
    raise FeatureSetNotFoundError(
        f"The {role} dataset '{dataset}' has splits {sorted(splits)} and no '{OTHER_SPLIT}' "
        f"split; OOD evaluation reads its '{OTHER_SPLIT}' split, or its only one. Extract it "
        f"with --split {OTHER_SPLIT}."
    )


def _difference(a: FeatureSet, b: FeatureSet) -> str:
    ra, rb = recipe(a), recipe(b)
    diff = [k for k in sorted({*ra, *rb}) if ra.get(k) != rb.get(k)]
    return "; ".join(f"{k}: ID {ra.get(k)!r} vs {rb.get(k)!r}" for k in diff[:4]) or "unknown"
