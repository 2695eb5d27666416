"""``create_backbone``: the one place that turns a name and options into a Backbone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from bob_cache.backbones.backbone import Backbone, WeightsChoice
from bob_cache.backbones.converters import checkpoint_required
from bob_cache.backbones.pooling import POOL_CHOICES
from bob_cache.backbones.registry import get_backbone_entry, list_backbones
from bob_cache.backbones.stable_diffusion import StableDiffusionProvider
from bob_cache.backbones.timm_provider import TimmProvider
from bob_cache.backbones.torchvision_provider import TorchvisionProvider
from bob_cache.backbones.weights import parse_weights_file
from bob_cache.errors import BackboneUnavailableError, SpecError, UnknownBackboneError, did_you_mean
from bob_cache.registry import Registry


class Provider(Protocol):
    """Something that builds backbones for a family of model names."""

    name: str

    def model_names(self) -> list[str]: ...

    def has_model(self, model: str) -> bool: ...

    def create(
        self,
        model: str,
        *,
        name: str,
        weights: WeightsChoice,
        layers: list[str],
        pool: str,
        image_size: int | None,
    ) -> Backbone: ...


PROVIDERS: Registry[Provider] = Registry("backbone provider")
PREFIXES: Registry[str] = Registry("backbone name prefix")  # prefix -> provider name


def register_provider(provider: Provider, *prefixes: str) -> None:
    """Register ``provider``; names written ``prefix:model`` go to it."""
    PROVIDERS.register(provider.name, provider)
    for prefix in (provider.name, *prefixes):
        PREFIXES.register(prefix, provider.name)


def split_provider(name: str) -> tuple[str, str]:
    """``prefix:model`` → (the prefix's provider, model); any other name → (timm, name)."""
    prefix, sep, model = name.partition(":")
    return (PREFIXES.get(prefix), model) if sep and prefix in PREFIXES else ("timm", name)


register_provider(TimmProvider())
register_provider(TorchvisionProvider(), "tv")
register_provider(StableDiffusionProvider())


def resolve_backbone_name(name: str) -> tuple[Provider, str]:
    """Map a user-facing name to ``(provider, model id)``.

    Registry names come first (``resnet50`` is BoB's torchvision-weights ResNet-50), then
    ``provider:model`` names, then any timm ``arch`` or ``arch.tag``. Entries that load an
    official checkpoint file have no provider model of their own: :func:`create_backbone`
    builds them from ``--weights``.
    """
    entry = get_backbone_entry(name)
    if entry is not None:
        if entry.needs_checkpoint:
            raise checkpoint_required(entry)
        if entry.model is None:
            raise BackboneUnavailableError(
                f"Backbone '{name}' ({entry.method}, {entry.family}) is in the BoB study but "
                f"timm has no weights for it. Fix: convert its checkpoint to the matching timm "
                f"architecture and run with --backbone ARCH --weights FILE."
            )
        return PROVIDERS.get(entry.provider), entry.model
    provider_name, model = split_provider(name)
    provider = PROVIDERS.get(provider_name)
    if not provider.has_model(model):
        pool = [e.name for e in list_backbones()] + provider.model_names()
        hint = did_you_mean(model, pool) or did_you_mean(model.partition(".")[0], pool)
        raise UnknownBackboneError(
            f"Unknown backbone '{name}'.{hint} See `bob-cache backbones` for the BoB field; "
            f"any {provider.name} model name (with an optional .tag) works too."
        )
    return provider, model


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: Sequence[str] = ("final",),
    pool: str = "default",
    image_size: int | None = None,
) -> Backbone:
    """Build a frozen, eval-mode backbone.

    Args:
        name: registry name (``resnet50``), timm name (``convnext_tiny.fb_in22k``) or
            ``tv:<torchvision model>``.
        weights: local ``.safetensors``/``.pth`` checkpoint (loaded with ``weights_only``);
            for entries such as ``dino_resnet50``, their official checkpoint as downloaded.
        random_init: skip pretrained weights; parameters are drawn with ``seed``.
        seed: seed of the random initialization.
        layers: ``final`` and/or intermediate layers (module names or indices).
        pool: ``default`` (the model's own head), ``avg`` or ``token``.
        image_size: square input size overriding the pretrained config.
    """
    if weights is not None and random_init:
        raise SpecError("--weights and --random-init exclude each other; pass one of them.")
    if pool not in POOL_CHOICES:
        raise SpecError(f"Unknown pooling '{pool}'. Expected one of: {', '.join(POOL_CHOICES)}.")
    if not layers:
        raise SpecError("No layers requested. Pass --layers final (the default) or layer names.")
    if image_size is not None and image_size < 16:
        raise SpecError(f"--image-size {image_size} is too small; expected at least 16 pixels.")
    entry = get_backbone_entry(name)
    if entry is not None and entry.needs_checkpoint:
        if weights is None and not random_init:
            raise checkpoint_required(entry)
        return PROVIDERS.get(entry.provider).create(  # type: ignore[call-arg]
            str(entry.arch),
            name=name,
            weights=_weights_choice(weights, random_init=random_init, seed=seed),
            layers=list(layers),
            pool=pool,
            image_size=image_size,
            official=entry,
        )
    provider, model = resolve_backbone_name(name)
    choice = _weights_choice(weights, random_init=random_init, seed=seed)
    recipe = {"recipe": entry.data_config} if entry is not None and entry.data_config else {}
    return provider.create(  # type: ignore[call-arg]
        model,
        name=name,
        weights=choice,
        layers=list(layers),
        pool=pool,
        image_size=image_size,
        **recipe,
    )


def _weights_choice(weights: str | Path | None, *, random_init: bool, seed: int) -> WeightsChoice:
    if weights is not None:
        return WeightsChoice("file", file=parse_weights_file(weights))
    if random_init:
        return WeightsChoice("random", seed=seed)
    return WeightsChoice("pretrained")
