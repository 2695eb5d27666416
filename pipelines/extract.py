"""The extraction stage: run a backbone over a dataset once, into the feature store.

This module is the stage's entry and stays light (no torch): it sends a run to a Dask cluster
(:mod:`~bob_cache.pipelines.extract_cluster`, whose caller then never loads a model), to one
decode for several backbones (:mod:`~bob_cache.pipelines.extract_many`), or to one backbone
in this process (:mod:`~bob_cache.pipelines.extract_single`, where the plan, the loaders, the
forward pass and the shard writer live).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bob_cache.pipelines.registry import register_stage

if TYPE_CHECKING:
    from bob_cache.config import ExtractConfig


@dataclass
class ExtractSummary:
    """What an extraction did (printed by the CLI, ``--json`` for machines)."""

    store: str
    dataset: str
    backbone: str
    device: str
    precision: str
    feature_sets: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    rows_computed: int = 0
    shards_computed: int = 0
    shards_skipped: int = 0
    invalid_rows: int = 0
    invalid_examples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("extract")
def extract(config: ExtractConfig) -> ExtractSummary | list[ExtractSummary]:
    """Run one extraction described by ``config``; returns its summary (one per backbone
    when ``config.backbone`` lists several: decode once, extract many)."""
    if config.scheduler or config.local_cluster:
        from bob_cache.pipelines.extract_cluster import extract_on_cluster

        return extract_on_cluster(config)
    if "," in config.backbone:
        from bob_cache.pipelines.extract_many import extract_many

        return extract_many(config)
    from bob_cache.pipelines.extract_single import extract_one

    return extract_one(config)
