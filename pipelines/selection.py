"""Finding the feature sets a downstream stage needs: one key, several splits."""

from __future__ import annotations

import shlex
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
        DamagedDataError: a chosen set's committed shard has an object missing.
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
        have = max(by_key.values(), key=len)
        missing = [s for s in splits if s not in have]
        raise FeatureSetNotFoundError(
            f"Split(s) {', '.join(s for s in splits)} of '{dataset}' with '{backbone}' are not all "
            f"extracted: found {found}. {missing_split_hint(have, missing, store.location)}"
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
    chosen = {s: found[s] for s in (*splits, *optional) if s in found}
    for fs in chosen.values():
        fs.check_intact()  # a committed shard's missing object would read as data
    return chosen


def missing_split_hint(have: dict[str, FeatureSet], missing: Sequence[str], store: str) -> str:
    """How to get ``missing`` splits beside the sets ``have`` (one key): the command that
    made them with ``--split`` changed, or why the source has no such split."""
    fs = next(iter(have.values()))
    dataset = fs.attrs.get("dataset", {})
    rule = (dataset.get("split_rule") or {}).get("kind")
    if rule == "whole":
        return (
            f"'{dataset.get('name')}' has no labels, so it is one split "
            f"({', '.join(have)}); use a labelled source (class sub-folders or a label column)."
        )
    command = _extract_command(fs, store)
    hint = "; ".join(_with_split(command, s) for s in missing)
    if rule == "id-hash":
        return (
            f"Extract the missing split(s): {hint}. A source without splits is split by id "
            "hash: a class needs at least 3 images to reach val and test at the default "
            "--split-fractions 0.6,0.2,0.2."
        )
    return (
        f"Extract the missing split(s) with the same options: {hint}; or, if the dataset has "
        "no such split, name others with --train-split/--val-split/--test-split."
    )


def _extract_command(fs: FeatureSet, store: str) -> list[str]:
    """The recorded extraction command, or one rebuilt from the set's provenance."""
    recorded = shlex.split(fs.attrs.get("command") or "")
    if recorded[:2] == ["bob-cache", "extract"]:
        return recorded
    request, dataset = fs.attrs.get("request") or {}, fs.attrs.get("dataset") or {}
    backbone = request.get("backbone") or fs.attrs["backbone"].get("name")
    words = ["bob-cache", "extract", "--data", str(dataset.get("origin", "DATA")), "--name",
             str(dataset.get("name")), "--backbone", str(backbone), "--store", store]  # fmt: skip
    if request.get("random_init"):
        words += ["--random-init", "--seed", str(request.get("seed") or 0)]
    for option, value in request.items():  # the options that change the key, as given
        if option in _REBUILT and value not in (None, _REBUILT[option]):
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [f"--{option.replace('_', '-')}", text]
    return words


# Request options rebuilt into a command, with the default left out.
_REBUILT = {"layers": ["final"], "pool": "default", "image_size": None, "dtype": "float16",
            "precision": "auto", "decode": "pil", "limit": None}  # fmt: skip


def _with_split(command: list[str], split: str) -> str:
    words, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word == "--split":
            skip = True
        elif not word.startswith("--split="):
            words.append(word)
    return f"`{shlex.join([*words, '--split', split])}`"
