"""Feature specs: everything that changes the extracted numbers, and the key that hashes it.

Two extractions share a feature set only when their specs are equal; changing any field
(weights, preprocessing, layer, pooling, precision, storage dtype, dataset content or
``--limit``) gives a new key and so a new feature set, never a silent reuse.
"""

from __future__ import annotations

from typing import Any

from bob_cache.backbones.backbone import Backbone, Output
from bob_cache.config import DECODE_MODES
from bob_cache.hashing import stable_hash

SPEC_FORMAT = 2


def feature_spec(
    backbone: Backbone,
    output: Output,
    *,
    precision: str,
    dtype: str,
    dataset_fingerprint: str,
    limit: int | None,
    decode: str = "pil",
) -> dict[str, Any]:
    """The canonical spec of one output of ``backbone`` over one dataset.

    ``decode`` is the mode's stable id (``pil``, ``torch``), never its description text.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; expected one of {list(DECODE_MODES)}")
    return {
        "format": SPEC_FORMAT,
        "backbone": backbone.identity(),
        "preprocessing": {**backbone.data_config, "decode": decode},
        "layer": output.layer,
        "pool": output.pool,
        "final_norm": output.index is not None,
        "precision": precision,
        "dtype": dtype,
        "dataset": {"fingerprint": dataset_fingerprint, "limit": limit},
    }


def feature_key(spec: dict[str, Any]) -> str:
    """Short, stable hash of a spec (12 hex digits)."""
    return stable_hash(spec, length=12)
