"""Backbones built by torchvision (``tv:resnet50``, ``tv:mobilenet_v2``).

The final output is the input of the model's last ``nn.Linear`` (its pre-logits); other
layers are graph nodes of ``torchvision.models.feature_extraction``, average-pooled. With
``--pool grid`` (``extract --dense``) a layer's map is kept as an ``(N, H, W, C)`` grid;
``final`` then names the last feature map, the node just before the global average pool.

Preprocessing is that of the weights actually loaded: torchvision's weights enum carries each
checkpoint's evaluation transform, and a local file is matched to its enum member by the
SHA-256 prefix torchvision puts in its file names (``mobilenet_v2-b0353104.pth`` is
``IMAGENET1K_V1``: resize 256, crop 224), not to the model's ``DEFAULT`` (``IMAGENET1K_V2``:
resize 232).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from bob_cache.backbones.backbone import Backbone, Output, WeightsChoice
from bob_cache.backbones.pooling import get_pool, is_grid, pool_grid
from bob_cache.backbones.weights import fit_state_dict, load_state_dict
from bob_cache.errors import BackboneUnavailableError, SpecError

logger = logging.getLogger(__name__)
_URL_HASH = re.compile(r"-([a-f0-9]{6,})\.[a-z]+$")  # torch.hub's naming: name-<sha256 prefix>.pth


class TorchvisionBackbone(Backbone):
    """A torchvision classifier with its last Linear layer split off as :attr:`head`."""

    def __init__(self, model: nn.Module, *, head_name: str, **kwargs: Any) -> None:
        from torchvision.models.feature_extraction import create_feature_extractor

        super().__init__(model, **kwargs)
        self._head = model.get_submodule(head_name)
        _set_module(model, head_name, nn.Identity())
        self._nodes = {o.name: o.layer for o in self.outputs if o.pool != "head"}
        self._head_node = head_name
        if self._nodes:
            nodes = {**{layer: layer for layer in self._nodes.values()}, head_name: head_name}
            self._extractor = create_feature_extractor(self.model, return_nodes=nodes)
        for o in self.outputs:
            if o.pool != "head":
                get_pool(o.pool, has_class_token=False, model=self.arch)

    @property
    def head(self) -> nn.Module:
        return self._head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._nodes:
            return {"final": self.model(x)}
        found = self._extractor(x)
        out = {}
        for o in self.outputs:
            t = found[self._head_node if o.pool == "head" else o.layer]
            if is_grid(o.pool):
                out[o.name] = pool_grid(t, None)
            else:
                out[o.name] = (
                    t if t.ndim == 2 else (t.flatten(2).mean(2) if t.ndim == 4 else t.mean(1))
                )
        return out


class TorchvisionProvider:
    """Builds :class:`TorchvisionBackbone` objects from ``torchvision.models``."""

    name = "torchvision"

    def model_names(self) -> list[str]:
        from torchvision.models import list_models

        return sorted(list_models(module=_classification()))

    def has_model(self, model: str) -> bool:
        return model in self.model_names()

    def create(
        self,
        model: str,
        *,
        name: str,
        weights: WeightsChoice,
        layers: list[str],
        pool: str,
        image_size: int | None,
    ) -> TorchvisionBackbone:
        from torchvision.models import get_model, get_model_weights

        default = get_model_weights(model).DEFAULT
        recipe = resolve_weights_enum(model, weights)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(weights.seed or 0)
                net = get_model(model, weights=default if weights.kind == "pretrained" else None)
        except Exception as exc:
            raise BackboneUnavailableError(
                f"Could not load torchvision's pretrained weights for '{model}' ({exc}). "
                "Fix: run once with network access, pass --weights FILE, or use random weights "
                "(--random-init; `finetune --mode random-init`)."
            ) from exc
        head_name = _last_linear(net, model)
        if weights.kind == "file" and weights.file is not None:
            state = load_state_dict(weights.file)
            fit_state_dict(net, state, name=f"tv:{model}", optional_prefixes=(head_name,))
        return TorchvisionBackbone(
            net,
            head_name=head_name,
            name=name,
            provider=self.name,
            arch=model,
            pretrained_tag=recipe.name if recipe is not None else None,
            weights=weights,
            data_config=_data_config(recipe or default, image_size),
            outputs=_outputs(net, model, layers, pool),
        )


def _outputs(net: nn.Module, model: str, layers: list[str], pool: str) -> list[Output]:
    from torchvision.models.feature_extraction import get_graph_node_names

    outputs: list[Output] = []
    nodes: list[str] | None = None
    for layer in layers:
        if layer == "final" and pool == "default":
            out = Output("final", "head")
        else:
            nodes = nodes or get_graph_node_names(net.eval())[1]
            if layer == "final" and is_grid(pool):
                layer = _last_feature_map(nodes, model)
            if layer not in nodes:
                raise SpecError(
                    f"Unknown layer '{layer}' for 'tv:{model}'. torchvision backbones take "
                    f"'final' (with --pool default, or --dense) or graph node names, such as: "
                    f"{', '.join(nodes[-6:-1])}."
                )
            out = Output(layer, "avg" if pool == "default" else pool)
        if out not in outputs:
            outputs.append(out)
    return outputs


_GLOBAL_POOLS = ("avgpool", "adaptive_avg_pool2d")


def _last_feature_map(nodes: list[str], model: str) -> str:
    """The node that feeds the model's global average pool: its last feature map."""
    pools = [i for i, n in enumerate(nodes) if n.rsplit(".", 1)[-1] in _GLOBAL_POOLS and i > 0]
    if not pools:
        raise SpecError(
            f"'tv:{model}' has no global average pool, so --dense cannot tell which node is its "
            f"last feature map. Name a node with a (N, C, H, W) output via --layers, such as "
            f"one of: {', '.join(nodes[-6:-1])}."
        )
    return nodes[pools[-1] - 1]


def resolve_weights_enum(model: str, weights: WeightsChoice) -> Any | None:
    """The torchvision weights (enum member) whose evaluation recipe fits ``weights``.

    Pretrained and random-init backbones get the model's ``DEFAULT``; a local file gets the
    member whose URL names the file's SHA-256 prefix, or None when it is none of them (then
    the ``DEFAULT`` recipe is used, and logged as a guess).
    """
    from torchvision.models import get_model_weights

    members = get_model_weights(model)
    if weights.kind != "file" or weights.file is None:
        return members.DEFAULT
    sha = weights.file.sha256
    for member in members:
        found = _URL_HASH.search(member.url)
        if found is not None and sha.startswith(found.group(1)):
            return member
    logger.warning(
        "%s is none of torchvision's published '%s' checkpoints; preprocessing it with the "
        "recipe of %s. The recipe is recorded in the feature set's provenance.",
        weights.file.path.name,
        model,
        members.DEFAULT,
    )
    return None


def _data_config(weights: Any, image_size: int | None) -> dict[str, Any]:
    tf = weights.transforms()
    crop, resize = tf.crop_size[0], tf.resize_size[0]
    size = image_size or crop
    return {
        "input_size": [3, size, size],
        "interpolation": tf.interpolation.value,
        "mean": [float(v) for v in tf.mean],
        "std": [float(v) for v in tf.std],
        "crop_pct": crop / resize,
        "crop_mode": "center",
    }


def _last_linear(net: nn.Module, model: str) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise BackboneUnavailableError(
            f"torchvision model '{model}' has no Linear classifier to split off; "
            "bob-cache supports torchvision classification models."
        )
    return names[-1]


def _classification() -> Any:
    import torchvision.models as models

    return models


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
