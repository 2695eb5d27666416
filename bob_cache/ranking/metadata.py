"""What a ranking needs to know about each backbone: family, pretraining, size.

Metadata passed in (a battle suite's, keyed by the results' ``backbone`` label) wins; what
it leaves out comes from the backbone registry entry matching the label: the entry whose
``model`` is the label (``resnet50.tv_in1k``), else an entry of the same architecture (the
label's part before the first dot: family and parameters only, since other weights were
pretrained otherwise). Random-init labels (``arch.random-s0``), and metadata whose method is
``random init``, have method ``random init`` and no pretraining data (``data: none`` means
the same). A parameter count neither gives is counted from the architecture, built without
weights on the meta device (:func:`bob_cache.backbones.params.count_params`, once per name).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

# Images seen in pretraining, by the data names the registry uses (case-insensitive).
DATA_SIZES: dict[str, float] = {
    "imagenet-1k": 1.28e6,
    "imagenet-21k": 14e6,
    "imagenet-22k": 14e6,
    "laion-2b": 2e9,
    "wit-400m (openai)": 400e6,
    "wit-400m": 400e6,
    "lvd-142m": 142e6,
    "sa-1b": 11e6,
}
# (class, upper bound of parameters, exclusive), ascending; the paper's small/base/large.
SizeClasses = Sequence[tuple[str, float]]
DEFAULT_SIZE_CLASSES: tuple[tuple[str, float], ...] = (
    ("small", 30e6),
    ("base", 100e6),
    ("large", math.inf),
)
UNKNOWN_SIZE = "unknown"
RANDOM_INIT = "random init"
NO_DATA = ("none", "null", "-", "")  # how metadata says "no pretraining data"


@dataclass(frozen=True)
class BackboneInfo:
    """Display and analysis metadata of one results ``backbone`` label."""

    label: str
    name: str | None = None
    family: str | None = None
    method: str | None = None
    data: str | None = None
    params: int | None = None
    data_images: float | None = None
    display: str | None = None  # the name a report shows (a suite's `label`)

    @property
    def shown(self) -> str:
        return self.display or self.label

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_backbone_info(
    label: str,
    given: Mapping[str, Any] | Any | None = None,
    *,
    data_sizes: Mapping[str, float] | None = None,
) -> BackboneInfo:
    """Metadata of ``label``: ``given`` (a mapping or an object with the fields) over the
    registry's, with the pretraining data's image count looked up in ``data_sizes``."""
    own = {k: v for k, v in _fields_of(given).items() if v is not None}
    complete = {"family", "method", "data", "params"} <= set(own)
    info = replace(BackboneInfo(label) if complete else _from_registry(label), **own)
    if _is_random(label) or info.method == RANDOM_INIT:
        info = replace(info, method=RANDOM_INIT, data=None, data_images=None)
    elif _says_none(info.data):
        info = replace(info, data=None, data_images=None)
    if info.data_images is None and info.data:
        info = replace(info, data_images=get_data_size(info.data, data_sizes))
    if info.params is None:
        info = replace(info, params=_counted_params(info.name, label))
    return info


def get_data_size(data: str, table: Mapping[str, float] | None = None) -> float | None:
    """Images in a pretraining set (``"ImageNet-1k"`` → 1.28e6), or None when unknown."""
    lookup = {k.lower(): v for k, v in {**DATA_SIZES, **(table or {})}.items()}
    return lookup.get(data.strip().lower())


def get_size_class(params: float | None, classes: SizeClasses = DEFAULT_SIZE_CLASSES) -> str:
    """The first class whose bound exceeds ``params``; ``unknown`` without a count."""
    if params is None or (isinstance(params, float) and math.isnan(params)):
        return UNKNOWN_SIZE
    return next((name for name, bound in classes if params < bound), classes[-1][0])


def _fields_of(given: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The fields ``given`` has; its ``label`` (a suite's display name) becomes ``display``."""
    if given is None:
        return {}
    get = given.get if isinstance(given, Mapping) else lambda k: getattr(given, k, None)
    names = [f.name for f in fields(BackboneInfo) if f.name != "label"]
    found = {k: get(k) for k in names}
    found["display"] = found["display"] or get("label")
    data = found.get("data")
    if isinstance(data, str) and data.startswith("/"):  # written by battles before the fix,
        found["data"] = data.rstrip("/").rpartition("/")[2]  # resolved as a path: the name
    return found


def _says_none(data: str | None) -> bool:
    return isinstance(data, str) and data.strip().lower() in NO_DATA


def _is_random(label: str) -> bool:
    return label.partition(".")[2].startswith("random")


def _counted_params(name: str | None, label: str) -> int | None:
    """Parameters counted from the architecture (no weights, no download), or None."""
    from bob_cache.backbones.params import count_params, label_to_name

    for candidate in dict.fromkeys(n for n in (name, label_to_name(label)) if n):
        params = count_params(candidate)
        if params is not None:
            return params
    return None


def _from_registry(label: str) -> BackboneInfo:
    from bob_cache.backbones.registry import list_backbones  # loads torch: only when needed

    entries = list_backbones()
    exact = next((e for e in entries if e.model == label), None)
    if exact is not None:
        return BackboneInfo(label, exact.name, exact.family, exact.method, exact.data, exact.params)
    arch = label.partition(".")[0]
    arch = arch.split("-", 1)[1] if arch.startswith("torchvision-") else arch
    same = [e for e in entries if e.name == arch or (e.model or "").split(".")[0] == arch]
    method = RANDOM_INIT if _is_random(label) else None
    if not same:
        return BackboneInfo(label, method=method)
    entry = same[0]
    return BackboneInfo(label, entry.name, entry.family, method, None, entry.params)
