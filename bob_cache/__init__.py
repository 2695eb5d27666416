"""bob-cache: extract vision-backbone features once into Zarr, evaluate them anywhere.

The public Python API mirrors the CLI::

    from bob_cache import extract, open_store, create_backbone, list_backbones, query

Heavy modules (torch, timm) load on first use, so ``import bob_cache`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "BobCacheError": "bob_cache.errors",
    "create_backbone": "bob_cache.backbones",
    "list_backbones": "bob_cache.backbones",
    "parse_source": "bob_cache.data",
    "ExtractConfig": "bob_cache.config",
    "extract": "bob_cache.pipelines.extract",
    "open_store": "bob_cache.stores",
    "query": "bob_cache.pipelines.query",
    "Searcher": "bob_cache.pipelines.query",
    "QueryConfig": "bob_cache.pipelines.query",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bob_cache' has no attribute '{name}'")
