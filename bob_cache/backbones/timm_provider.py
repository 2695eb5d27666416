"""Backbones built by timm: any ``arch`` or ``arch.tag`` that timm knows."""

from __future__ import annotations

import inspect
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from bob_cache.backbones.backbone import Backbone, Output, WeightsChoice
from bob_cache.backbones.converters import load_official_checkpoint
from bob_cache.backbones.pooling import get_pool
from bob_cache.backbones.weights import fit_state_dict, load_state_dict
from bob_cache.errors import BackboneUnavailableError, SpecError

if TYPE_CHECKING:
    from bob_cache.backbones.registry import BackboneEntry


class TimmBackbone(Backbone):
    """Final head features via ``forward_head(pre_logits=True)``; intermediate layers via
    ``forward_intermediates`` (with the model's final norm applied, as in DINO's linear
    evaluation), all in one pass. With ``--pool grid`` (``extract --dense``), ``final`` is the
    last feature-info layer kept as an ``(N, H, W, C)`` grid: a ViT's normalized patch tokens
    without its prefix tokens, a CNN's last feature map."""

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._needs_head = any(o.pool == "head" for o in self.outputs)
        self._indices = sorted({o.index for o in self.outputs if o.index is not None})
        has_prefix = getattr(model, "num_prefix_tokens", 0) > 0
        params = inspect.signature(model.forward_intermediates).parameters
        self._prefix_kw = (
            {"return_prefix_tokens": True}
            if has_prefix and ("return_prefix_tokens" in params)
            else {}
        )
        self._pools = {
            o.name: get_pool(o.pool, has_class_token=bool(self._prefix_kw), model=self.arch)
            for o in self.outputs
            if o.pool != "head"
        }

    @property
    def head(self) -> torch.nn.Module | None:
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        feats, inters = None, []
        if self._indices:
            result = m.forward_intermediates(
                x,
                indices=self._indices,
                norm=True,
                output_fmt="NCHW",
                intermediates_only=not self._needs_head,
                **self._prefix_kw,
            )
            feats, inters = result if self._needs_head else (None, result)
        elif self._needs_head:
            feats = m.forward_features(x)
        by_index = dict(zip(self._indices, inters, strict=True))
        out = {}
        for o in self.outputs:
            if o.pool == "head":
                out[o.name] = m.forward_head(feats, pre_logits=True)
            else:
                t = by_index[o.index]
                spatial, prefix = t if isinstance(t, tuple) else (t, None)
                out[o.name] = self._pools[o.name](spatial, prefix)
        return out


class TimmProvider:
    """Builds :class:`TimmBackbone` objects."""

    name = "timm"

    def model_names(self) -> list[str]:
        return _timm_names()

    def has_model(self, model: str) -> bool:
        import timm

        arch, _, tag = model.partition(".")
        if not timm.is_model(arch):
            return False
        return not tag or model in _pretrained_names()

    def create(
        self,
        model: str,
        *,
        name: str,
        weights: WeightsChoice,
        layers: list[str],
        pool: str,
        image_size: int | None,
        official: BackboneEntry | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> TimmBackbone:
        """Build ``model``; with ``official`` (a registry entry with a converter), ``model``
        is its ``arch``, built with its options, and a weights file is its official checkpoint.
        ``recipe`` (a registry entry's ``data_config``) overrides timm's preprocessing."""
        if official is not None:
            recipe = official.data_config
        net = _build(
            model, weights=weights, image_size=image_size, official=official, recipe=recipe
        )
        arch = model.partition(".")[0]
        tag = None if official is not None else net.pretrained_cfg.get("tag") or None
        data_config = _data_config(net, image_size)
        outputs = resolve_outputs(net, arch=arch, layers=layers, pool=pool)
        return TimmBackbone(
            net,
            name=name,
            provider=self.name,
            arch=arch,
            pretrained_tag=tag,
            weights=weights,
            data_config=data_config,
            outputs=outputs,
            conversion=_conversion_identity(official),
        )


def resolve_outputs(
    net: torch.nn.Module, *, arch: str, layers: list[str], pool: str
) -> list[Output]:
    """Turn ``--layers``/``--pool`` values into canonical :class:`Output` objects."""
    modules = [info["module"] for info in net.feature_info]
    has_token = (
        getattr(net, "num_prefix_tokens", 0) > 0 and getattr(net, "global_pool", "") == "token"
    )
    inter_pool = ("token" if has_token else "avg") if pool == "default" else pool
    outputs: list[Output] = []
    for layer in layers:
        if layer == "final" and pool == "default":
            out = Output("final", "head")
        else:
            index = len(modules) - 1 if layer == "final" else _layer_index(layer, modules, arch)
            out = Output(modules[index], inter_pool, index)
        if out not in outputs:
            outputs.append(out)
    return outputs


def _layer_index(layer: str, modules: list[str], arch: str) -> int:
    if layer in modules:
        return modules.index(layer)
    try:
        index = int(layer)
    except ValueError:
        index = None
    if index is not None and -len(modules) <= index < len(modules):
        return index % len(modules)
    raise SpecError(
        f"Unknown layer '{layer}' for '{arch}'. Expected 'final', an index from "
        f"{-len(modules)} to {len(modules) - 1}, or one of: {', '.join(modules)}."
    )


def _build(
    model: str,
    *,
    weights: WeightsChoice,
    image_size: int | None,
    official: BackboneEntry | None = None,
    recipe: dict[str, Any] | None = None,
) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if official is not None:  # no classifier: the official checkpoints carry none
        kwargs.update(num_classes=0, **official.arch_kwargs)
    if recipe:
        kwargs["pretrained_cfg_overlay"] = dict(recipe)
    if image_size is not None:
        kwargs["img_size"] = image_size
    pretrained = weights.kind == "pretrained"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed or 0)
        try:
            net = _create(model, pretrained=pretrained, **kwargs)
        except TypeError as exc:  # architectures without an img_size argument (CNNs)
            if "img_size" not in str(exc):
                raise
            kwargs.pop("img_size", None)
            net = _create(model, pretrained=pretrained, **kwargs)
    if weights.kind == "file" and weights.file is not None and official is not None:
        load_official_checkpoint(net, weights.file, official)
    elif weights.kind == "file" and weights.file is not None:
        head = net.pretrained_cfg.get("classifier") or "head"
        heads = (head,) if isinstance(head, str) else tuple(head)
        fit_state_dict(net, load_state_dict(weights.file), name=model, optional_prefixes=heads)
    return net.eval()


def _conversion_identity(official: BackboneEntry | None) -> dict[str, Any] | None:
    if official is None:
        return None
    return {"converter": official.converter, "arch_kwargs": dict(official.arch_kwargs)}


def _create(model: str, *, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(model, pretrained=False, **kwargs)
    try:
        return timm.create_model(model, pretrained=True, **kwargs)
    except TypeError:
        raise
    except Exception as exc:
        raise BackboneUnavailableError(
            f"Could not load pretrained weights for '{model}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). timm downloads them "
            "from the Hugging Face Hub on first use. Fix: run once with network access (they "
            "are cached), pass a local checkpoint with --weights FILE, or use random weights "
            "(--random-init; `finetune --mode random-init`)."
        ) from exc


def _data_config(net: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    if image_size is not None:
        cfg["input_size"] = (3, image_size, image_size)
    return {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }


@cache
def _timm_names() -> list[str]:
    import timm

    return sorted(set(timm.list_models()) | set(timm.list_pretrained()))


@cache
def _pretrained_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_pretrained())
