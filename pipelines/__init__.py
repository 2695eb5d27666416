"""Stages: each reads specs and stores and writes results. Only ``extract`` (and later
``finetune``) touch a model; downstream stages read the feature store.

Installed, this package imports as ``bob_cache.pipelines``.
"""

from bob_cache.pipelines.registry import get_stage, list_stages, register_stage

__all__ = ["get_stage", "list_stages", "register_stage"]
