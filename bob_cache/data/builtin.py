"""Built-in datasets that ship with installed libraries, so nothing is downloaded.

``builtin:digits`` is scikit-learn's 1,797 handwritten digits (8×8 grey levels 0-16),
rendered as RGB images and split 60/20/20 into train/val/test, stratified with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bob_cache.data.catalog import DatasetInfo, register_dataset
from bob_cache.data.source import DataSource, Sample, SplitRule, content_digest, register_source
from bob_cache.data.splits import SplitFractions
from bob_cache.errors import DataNotFoundError, did_you_mean
from bob_cache.registry import Registry

Loader = Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]
BUILTINS: Registry[Loader] = Registry("built-in dataset", error=DataNotFoundError)
PREFIX = "builtin:"
DATASETS_BUILTIN = ("digits",)  # catalogued with official counts


def register_builtin(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register a function returning ``(uint8 images, labels, class_names)``."""
    return BUILTINS.register(name)


@register_builtin("digits")
def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names]


register_dataset(
    DatasetInfo(
        name="digits",
        spec="builtin:digits",
        task="classification",
        counts={"train": 1078, "val": 359, "test": 360},
        classes=10,
        source="ships with scikit-learn (sklearn.datasets.load_digits)",
        layout="nothing to download",
        note="split 0.6/0.2/0.2 with train_test_split, stratified, seed 0",
    )
)


@dataclass
class BuiltinSource(DataSource):
    """In-memory images; ``location`` is the row index into :attr:`images`."""

    images: Any = None

    kind = "builtin"

    def open_image(self, sample: Sample) -> Image.Image:
        return Image.fromarray(self.images[sample.location]).convert("RGB")

    def digest(self, sample: Sample) -> str:
        return content_digest(np.ascontiguousarray(self.images[sample.location]).tobytes())

    def fingerprint_rows(self) -> list[Any]:
        import hashlib

        return [
            hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest(),
            super().fingerprint_rows(),
        ]


@register_source(
    "builtin",
    lambda spec: spec.startswith(PREFIX),
    syntax="builtin:NAME",
    layout="Nothing to download: data that ships with an installed library (digits: "
    "scikit-learn's 1,797 handwritten digits, split 0.6/0.2/0.2).",
    example="builtin:digits",
)
def load_builtin(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> BuiltinSource:
    """Load ``builtin:<name>``."""
    from sklearn.model_selection import train_test_split

    key = spec[len(PREFIX) :]
    if key not in BUILTINS:  # named as written: builtin:NAME
        known = [PREFIX + k for k in BUILTINS]
        raise DataNotFoundError(
            f"Unknown built-in dataset '{spec}'.{did_you_mean(spec, known)} "
            f"Available: {', '.join(known)}."
        )
    images, labels, class_names = BUILTINS.get(key)()
    rows = np.arange(len(labels))
    train, rest = train_test_split(rows, test_size=0.4, stratify=labels, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=0)
    splits = {
        part: [Sample(f"{key}/{i:05d}", int(labels[i]), int(i)) for i in sorted(idx)]
        for part, idx in (("train", train), ("val", val), ("test", test))
    }
    rule = SplitRule(
        "distributed", detail="built-in 0.6/0.2/0.2 (train_test_split, stratified, seed 0)"
    )
    return BuiltinSource(
        name=name or key,
        origin=spec,
        splits=splits,
        class_names=class_names,
        split_rule=rule,
        catalog=key if key in DATASETS_BUILTIN else None,
        images=images,
    )
