"""Rebuilding the exact backbone a feature set was extracted with, to embed query images.

The feature set's spec says everything that changes the numbers (provider, architecture,
weights tag or file hash or seed, preprocessing, layer, pooling); the rebuilt backbone must
reproduce that spec or it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bob_cache.backbones.backbone import Backbone
from bob_cache.backbones.factory import create_backbone
from bob_cache.config import DECODE_MODES
from bob_cache.data.device_decode import DevicePreprocess, EncodedBatch
from bob_cache.data.images import to_chw
from bob_cache.device import autocast
from bob_cache.errors import SpecMismatchError, WeightsError


class Embedder:
    """A frozen backbone and the one output a feature set holds: PIL images → vectors."""

    def __init__(
        self,
        backbone: Backbone,
        output: str,
        *,
        device: torch.device,
        decode: str = "pil",
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone.to(device)
        self.output = output
        self.device = device
        self.decode = decode
        self.precision = precision
        self._transform = backbone.transform()
        self._on_device = (
            DevicePreprocess(backbone.data_config, device) if decode == "torch" else None
        )

    @torch.inference_mode()
    def embed(self, images: list[Any]) -> np.ndarray:
        """``(N, D)`` float32 features of PIL ``images``, as extraction computed them: at the
        set's precision (autocast), resized on the device when it was extracted so."""
        if self._on_device is not None:
            batch, _ = self._on_device(EncodedBatch.of_images([to_chw(i) for i in images]))
        else:
            batch = torch.stack([self._transform(image) for image in images]).to(self.device)
        with autocast(self.device, self.precision):
            out = self.backbone(self.backbone.normalize(batch))
        return out[self.output].float().cpu().numpy()


def embedder_from_provenance(
    attrs: dict[str, Any], *, weights: str | Path | None = None, device: torch.device | str = "cpu"
) -> Embedder:
    """The backbone recorded in a feature set's attributes, checked against its spec.

    Args:
        attrs: the feature set's attributes (``spec`` and ``backbone`` provenance).
        weights: checkpoint to use instead of the recorded file path (same hash required).
        device: where the model runs.

    Raises:
        WeightsError: the recorded weights file is gone and no replacement was given.
        SpecMismatchError: the rebuilt model does not reproduce the recorded spec.
    """
    spec, info = attrs["spec"], attrs["backbone"]
    recorded = spec["backbone"]["weights"]
    file = weights
    if recorded["kind"] == "file" and file is None:
        file = info.get("weights", {}).get("file")
        if not file or not Path(file).is_file():
            raise WeightsError(
                f"The features were extracted with weights file '{file}' (sha256 "
                f"{recorded.get('sha256', '?')[:12]}…), which is not there any more. Pass the "
                "same checkpoint with --weights PATH."
            )
    size = spec["preprocessing"]["input_size"][-1]
    options = {
        "weights": file if recorded["kind"] == "file" else None,
        "random_init": recorded["kind"] == "random",
        "seed": recorded.get("seed") or 0,
        "layers": [spec["layer"]],
        "pool": _pool_option(spec["pool"]),
    }
    backbone = create_backbone(info["name"], **options)
    if _preprocessing(backbone) != _without_decode(spec["preprocessing"]):
        backbone = create_backbone(info["name"], image_size=size, **options)
    _check_matches(backbone, spec)
    decode = _decode_mode(spec["preprocessing"].get("decode", "pil"))
    return Embedder(
        backbone,
        info["output"],
        device=torch.device(device),
        decode=decode,
        precision=spec.get("precision", "fp32"),
    )


def _decode_mode(recorded: str) -> str:
    if recorded in DECODE_MODES:
        return recorded
    for mode, text in DECODE_MODES.items():  # sets from before the id was recorded
        if text == recorded:
            return mode
    raise SpecMismatchError(
        f"The feature set was decoded with '{recorded}', which this installation does not "
        "know. Query with --vectors computed by the original installation, or re-extract."
    )


def _pool_option(pool: str) -> str:
    return "default" if pool == "head" else pool


def _preprocessing(backbone: Backbone) -> dict[str, Any]:
    return _without_decode(backbone.data_config)


def _without_decode(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k != "decode"}


def _check_matches(backbone: Backbone, spec: dict[str, Any]) -> None:
    got = {"backbone": backbone.identity(), "preprocessing": _preprocessing(backbone)}
    want = {"backbone": spec["backbone"], "preprocessing": _without_decode(spec["preprocessing"])}
    if json.dumps(got, sort_keys=True, default=list) != json.dumps(want, sort_keys=True):
        raise SpecMismatchError(
            "The backbone rebuilt from the feature set's provenance does not reproduce its "
            f"spec (rebuilt {got}, recorded {want}). Query with --vectors computed by the "
            "original model, or re-extract the feature set with this installation."
        )
