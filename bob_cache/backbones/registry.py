"""The backbone registry: named entries of the Battle-of-the-Backbones field.

An entry maps a short BoB-style name (``resnet50``, ``dino_vit_base``) to a provider model
id (``resnet50.tv_in1k``) with its pretraining method and data. Entries whose weights timm
does not ship keep ``model=None`` and say so in the listing; any other timm model name
works without an entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone."""

    name: str
    model: str | None
    family: str
    method: str
    data: str
    params: int | None = None
    feature_dim: int | None = None
    note: str = ""
    provider: str = "timm"

    @property
    def available(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available}


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add ``entry`` to the registry (names are unique)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"Backbone '{entry.name}' is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def get_backbone_entry(name: str) -> BackboneEntry | None:
    """The registered entry called ``name``, or None."""
    _ensure_catalog()
    return _REGISTRY.get(name)


def list_backbones() -> list[BackboneEntry]:
    """All registered entries, in catalog order."""
    _ensure_catalog()
    return list(_REGISTRY.values())


def _ensure_catalog() -> None:
    from bob_cache.backbones import catalog  # noqa: F401  (registers on import)
