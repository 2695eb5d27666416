"""BoB's ranking of backbones from the results table: per-setting z-scores, their means per
task and overall, rankings by size class, task correlations and the scale analysis.

Pure computation on a results frame (no I/O); the report stage renders it.
"""

from bob_cache.ranking.analysis import scale_analysis, spearman, task_correlations
from bob_cache.ranking.metadata import (
    DATA_SIZES,
    DEFAULT_SIZE_CLASSES,
    BackboneInfo,
    get_data_size,
    get_size_class,
    resolve_backbone_info,
)
from bob_cache.ranking.rank import Ranking, rank_backbones
from bob_cache.ranking.tasks import (
    TaskKind,
    assign_tasks,
    get_task,
    list_tasks,
    register_ranking_task,
    resolve_primary_metrics,
)
from bob_cache.ranking.zscores import (
    SETTING_KEYS,
    Scores,
    latest_runs,
    score_settings,
    seed_spread,
    setting_values,
)

__all__ = [
    "DATA_SIZES",
    "DEFAULT_SIZE_CLASSES",
    "SETTING_KEYS",
    "BackboneInfo",
    "Ranking",
    "Scores",
    "TaskKind",
    "assign_tasks",
    "get_data_size",
    "get_size_class",
    "get_task",
    "latest_runs",
    "list_tasks",
    "rank_backbones",
    "register_ranking_task",
    "resolve_backbone_info",
    "resolve_primary_metrics",
    "scale_analysis",
    "score_settings",
    "seed_spread",
    "setting_values",
    "spearman",
    "task_correlations",
]
