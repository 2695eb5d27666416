"""Finding the feature sets a downstream stage needs: one key, several splits."""

from __future__ import annotations

from collections.abc import Sequence

from bob_cache.errors import FeatureSetNotFoundError
from bob_cache.stores import FeatureSet, FeatureStore


def matches_backbone(fs: FeatureSet, name: str) -> bool:
    """A set matches the name used at extraction, its label, architecture or model id."""
    b = fs.attrs.get("backbone", {})
    return name in {b.get("name"), b.get("slug"), b.get("arch"), b.get("model")}


def select_feature_sets(
    store: FeatureStore,
    *,
    dataset: str,
    backbone: str,
    feature: str | None,
    splits: Sequence[str],
    optional: Sequence[str] = (),
    listed: Sequence[FeatureSet] | None = None,
) -> dict[str, FeatureSet]:
    """The feature sets of one key that cover ``splits`` (and ``optional`` splits if present).
    ``listed``: the store's sets when the caller has listed them already.

    Raises:
        FeatureSetNotFoundError: nothing matches (what exists is listed), a required split is
            missing, or several keys match and ``feature`` does not pick one.
    """
    sets = store.feature_sets() if listed is None else listed
    chosen = [
        fs
        for fs in sets
        if fs.attrs["dataset"]["name"] == dataset
        and matches_backbone(fs, backbone)
        and (feature is None or fs.key.startswith(feature))
    ]
    if not chosen:
        have = sorted(
            {f"{fs.attrs['dataset']['name']} × {fs.attrs['backbone']['slug']}" for fs in sets}
        )
        raise FeatureSetNotFoundError(
            f"No feature set for dataset '{dataset}' and backbone '{backbone}'"
            f"{f' with key {feature}' if feature else ''} in '{store.location}'. It holds: "
            f"{', '.join(have) or 'nothing'}. Extract first (`bob-cache extract`) or fix the names."
        )
    by_key: dict[str, dict[str, FeatureSet]] = {}
    for fs in chosen:
        by_key.setdefault(fs.key, {})[fs.attrs["split"]] = fs
    complete = {k: v for k, v in by_key.items() if set(splits) <= set(v)}
    if not complete:
        found = {k: sorted(v) for k, v in by_key.items()}
        raise FeatureSetNotFoundError(
            f"Split(s) {', '.join(s for s in splits)} of '{dataset}' with '{backbone}' are not all "
            f"extracted: found {found}. Extract the missing split(s), or name others with "
            "--train-split/--test-split."
        )
    if len(complete) > 1:
        options = "; ".join(
            f"{k} (layer {next(iter(v.values())).attrs['spec']['layer']}, "
            f"pool {next(iter(v.values())).attrs['spec']['pool']})"
            for k, v in complete.items()
        )
        raise FeatureSetNotFoundError(
            f"Several feature sets match '{dataset}' with '{backbone}': {options}. "
            "Pick one with --feature KEY (a unique prefix is enough)."
        )
    (found,) = complete.values()
    return {s: found[s] for s in (*splits, *optional) if s in found}
