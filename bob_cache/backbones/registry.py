"""The backbone registry: named entries of the Battle-of-the-Backbones field.

An entry maps a short BoB-style name (``resnet50``, ``dino_vit_base``) to a provider model
id (``resnet50.tv_in1k``) with its pretraining method and data. Entries whose weights timm
does not ship keep ``model=None`` and say so in the listing; those whose official checkpoint
fits a timm architecture name it (``arch``) with the converter that maps its keys, the file
and where to download it. Any other timm model name works without an entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bob_cache.errors import UnknownBackboneError
from bob_cache.registry import Registry


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone.

    Entries loaded from an official checkpoint name the timm ``arch`` (built with
    ``arch_kwargs``) that ``converter`` maps the file ``checkpoint`` (from ``source_url``) to;
    ``data_config`` overrides the provider's preprocessing with the official evaluation's
    (for any entry: timm's configs of some official checkpoints carry timm's generic recipe).
    """

    name: str
    model: str | None
    family: str
    method: str
    data: str
    params: int | None = None
    feature_dim: int | None = None
    note: str = ""
    provider: str = "timm"
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    data_config: dict[str, Any] = field(default_factory=dict, hash=False)
    converter: str | None = None
    checkpoint: str | None = None
    source_url: str | None = None

    @property
    def available(self) -> bool:
        """Whether the provider ships weights for it (no file needed)."""
        return self.model is not None

    @property
    def needs_checkpoint(self) -> bool:
        """Whether it loads from an official checkpoint file through a converter."""
        return self.converter is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available}


BACKBONES: Registry[BackboneEntry] = Registry(
    "backbone", hint="See `bob-cache backbones`.", error=UnknownBackboneError
)


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add ``entry`` to the registry (names are unique)."""
    return BACKBONES.register(entry.name, entry)


def get_backbone_entry(name: str) -> BackboneEntry | None:
    """The registered entry called ``name``, or None."""
    _ensure_catalog()
    return BACKBONES.get(name) if name in BACKBONES else None


def list_backbones() -> list[BackboneEntry]:
    """All registered entries, in catalog order."""
    _ensure_catalog()
    return BACKBONES.values()


def _ensure_catalog() -> None:
    from bob_cache.backbones import catalog  # noqa: F401  (registers on import)
