"""The error hierarchy.

Every error a user can cause derives from :class:`BobCacheError` and from the builtin
it resembles, so ``except FileNotFoundError`` keeps working for library users while the
CLI turns any ``BobCacheError`` into a one-paragraph message and exit code 1.
Messages say what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class BobCacheError(Exception):
    """Base class of every user-facing bob-cache error."""


class UnknownBackboneError(BobCacheError, KeyError):
    """A backbone name that neither the registry nor timm knows."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class BackboneUnavailableError(BobCacheError, LookupError):
    """A known backbone that cannot be built here (no timm weights, no network, ...)."""


class WeightsError(BobCacheError, ValueError):
    """A weights file that cannot be read or does not fit the architecture."""


class CheckpointRequiredError(WeightsError, BackboneUnavailableError):
    """A BoB backbone whose weights exist only as an official checkpoint file (no timm tag)."""


class SpecError(BobCacheError, ValueError):
    """An option value that cannot be turned into a feature spec (pooling, layers, ...)."""


class DataSourceError(BobCacheError, ValueError):
    """A data source that exists but cannot be used as given."""


class DataNotFoundError(BobCacheError, FileNotFoundError):
    """A data folder, manifest or image file that does not exist."""


class ManifestError(DataSourceError):
    """A CSV/JSONL manifest with missing columns, bad rows or missing files."""


class InvalidImageError(BobCacheError, ValueError):
    """An image that cannot be decoded (raised only in ``--strict`` mode)."""


class StoreError(BobCacheError, OSError):
    """A feature store that cannot be opened, read or written."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No feature store at the given location."""


class StoreNotWritableError(StoreError, PermissionError):
    """The store location exists but cannot be written to."""


class StoreFullError(StoreError):
    """The store ran out of space (or hit a file-size limit) during a write."""


class FeatureSetNotFoundError(StoreError, KeyError):
    """No feature set matches the requested group, key or filter."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SpecMismatchError(StoreError, ValueError):
    """An existing feature set was written with a different spec or layout."""


class DamagedDataError(StoreError, ValueError):
    """A committed shard's stored object is missing, fails its checksum or does not decode."""


class DataChangedError(StoreError, ValueError):
    """Images changed since their features were stored (content digests differ)."""


class MixedEnvironmentError(StoreError, ValueError):
    """Resuming a set with other library versions or another device type."""


class IndexNotFoundError(StoreError, KeyError):
    """No retrieval index of that name beside the feature set."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StaleIndexError(StoreError, ValueError):
    """An index that no longer matches its feature set (re-extracted or repaired rows)."""


class IndexMismatchError(StoreError, ValueError):
    """An index built from another feature set than the one being queried."""


class HeadNotFoundError(StoreError, KeyError):
    """No stored probe head of that name (or none at all) beside the selected feature sets."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HeadDamagedError(StoreError, ValueError):
    """A stored probe head whose arrays are missing, incomplete or malformed."""


class StaleHeadError(StoreError, ValueError):
    """A probe head fitted on shards that were uncommitted or recomputed since."""


class HeadMismatchError(StoreError, ValueError):
    """A probe head fitted on another feature key than the set it is asked to classify."""


class QueryError(BobCacheError, ValueError):
    """A query that cannot be answered as given (unknown id, wrong dimension, bad k, ...)."""


class UnknownIdError(QueryError, KeyError):
    """A query id that names no stored row."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidRowError(QueryError):
    """A query id that names a stored row without usable features (unreadable image, or a
    shard not extracted yet)."""


class ImageTooLargeError(QueryError):
    """A query image (or a request's images together) over the decoded-pixel limits."""


class ThumbnailNotFoundError(BobCacheError, FileNotFoundError):
    """No thumbnail for a requested id: not a row of the set, outside the images root, or
    its image missing or unreadable."""


class GroundTruthError(BobCacheError, ValueError):
    """A retrieval ground-truth file that is missing, malformed or does not fit the store."""


class NoResultsError(BobCacheError, FileNotFoundError):
    """A results table with no rows (or none a report can use)."""


class ResultsImportError(BobCacheError, ValueError):
    """A CSV of external results rows that cannot be imported as given."""


class DeviceError(BobCacheError, RuntimeError):
    """A requested device (or precision) that this machine does not have."""


class FeatureOverflowError(BobCacheError, OverflowError):
    """Feature values do not fit the storage dtype (would be stored as inf)."""


class DetectorError(BobCacheError, ValueError):
    """An OOD detector, its options, fit stream, state or scores that cannot be used as given."""


class UnknownDetectorError(DetectorError, KeyError):
    """An OOD detector name that the detector registry does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DetectorDamagedError(StoreError, ValueError):
    """Stored OOD detector state whose arrays or record are missing or malformed."""


class ClassMapError(BobCacheError, ValueError):
    """A shift set whose classes cannot be matched to the ID set's (none shared, unknown names)."""


def first_few(items: Sequence[Any], n: int = 5) -> str:
    """The first ``n`` of ``items`` for an error message, with ``...`` when there are more."""
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


def did_you_mean(name: str, candidates: Iterable[str], *, n: int = 3) -> str:
    """Return ' Did you mean 'a', 'b'?' for close matches, or '' when there are none."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not matches:
        return ""
    quoted = ", ".join(f"'{m}'" for m in matches)
    return f" Did you mean {quoted}?"


class AnnotationError(DataSourceError):
    """A detection or segmentation dataset whose annotations cannot be used (not COCO, images
    missing, mask values outside the classes)."""


class FinetuneError(BobCacheError, RuntimeError):
    """A fine-tuning run that cannot go on as asked (resume with another config, out of memory)."""
