"""The detector contract and registry.

Every detector scores features so that **higher means more in-distribution**. A detector is
fitted once on a stream of ID training blocks (see :mod:`bob_cache.ood.blocks`) plus, for the
logit-based ones, the linear head; its fitted :meth:`Detector.state` is a flat dict of numpy
arrays and scalars that :meth:`Detector.from_state` (or :func:`restore_detector`) turns back
into a detector scoring identically. Detectors register by name with
:func:`register_detector`; :func:`create_detector` builds one from its name and options.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from bob_cache.errors import DetectorError, UnknownDetectorError, did_you_mean
from bob_cache.ood.blocks import BlockSource, LinearHead, check_features, is_reiterable, parse_head
from bob_cache.registry import Registry

State = dict[str, Any]  # values: np.ndarray, int, float
D = TypeVar("D", bound="Detector")

DETECTORS: Registry[type[Detector]] = Registry("OOD detector", error=UnknownDetectorError)


class Detector(abc.ABC):
    """A post-hoc OOD detector on penultimate features (higher score = more ID).

    Class attributes tell a stage what :meth:`fit` reads: ``passes`` (how many times it reads
    the ID stream: 0, 1 or 2), ``needs_labels`` and ``needs_head``.
    """

    name: ClassVar[str] = ""
    score_dtype: ClassVar[type] = np.float64  # what score() hands _score
    passes: ClassVar[int] = 1
    needs_labels: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False
    # Raised when what state() holds or means changes, so stored states of before are refit.
    state_version: ClassVar[int] = 1

    def __init__(self) -> None:
        self.dim: int | None = None  # feature dimension, set by fit/from_state
        self.n_fit = 0  # ID rows the fit read

    def fit(self: D, stream: BlockSource, *, head: LinearHead | tuple | None = None) -> D:
        """Fit on the ID training blocks (and ``head``, a ``(weight, bias)`` pair); returns self."""
        head = parse_head(head)
        if self.needs_head and head is None:
            raise DetectorError(
                f"'{self.name}' scores through the classifier head; pass head=(weight, bias) "
                "(weight (classes, dim), bias (classes,)) to fit()."
            )
        if self.passes > 1 and not is_reiterable(stream):
            raise DetectorError(
                f"'{self.name}' reads the ID stream {self.passes} times, but got a one-shot "
                "iterator (e.g. a generator). Pass a list of blocks, or a zero-argument "
                "function that returns a fresh iterable of blocks."
            )
        self._fit(stream, head)
        return self

    @property
    def note(self) -> str:
        """What a results row should say about this fit (e.g. that an ill-posed fit was
        regularized); empty when there is nothing to say."""
        return ""

    def score(self, features: Any) -> np.ndarray:
        """OOD scores of ``(n, D)`` features, float64 ``(n,)``; higher = more in-distribution."""
        if self.dim is None:
            raise DetectorError(
                f"'{self.name}' is not fitted; call fit(stream, ...) or from_state(state) first."
            )
        x = check_features(features, dim=self.dim, what="Query features", dtype=self.score_dtype)
        if len(x) == 0:
            return np.zeros(0)
        return self._score(x)

    def state(self) -> State:
        """The fitted state: options and statistics as numpy arrays and scalars."""
        if self.dim is None:
            raise DetectorError(f"'{self.name}' is not fitted; call fit() before state().")
        return {"dim": self.dim, "n_fit": self.n_fit, **self._state()}

    @classmethod
    def from_state(cls: type[D], state: Mapping[str, Any]) -> D:
        """A fitted detector from :meth:`state`'s dict."""
        missing = sorted({"dim", "n_fit", *cls._state_keys()} - set(state))
        if missing:
            raise DetectorError(
                f"The '{cls.name}' state lacks {missing}; it was saved by another detector or "
                "is incomplete. Refit the detector."
            )
        detector = cls._restore(state)
        detector.dim, detector.n_fit = int(state["dim"]), int(state["n_fit"])
        return detector

    @abc.abstractmethod
    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None: ...

    @abc.abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _state(self) -> State: ...

    @classmethod
    @abc.abstractmethod
    def _state_keys(cls) -> tuple[str, ...]: ...

    @classmethod
    @abc.abstractmethod
    def _restore(cls: type[D], state: Mapping[str, Any]) -> D: ...


def register_detector(name: str) -> Callable[[type[D]], type[D]]:
    """Class decorator: register a :class:`Detector` subclass under ``name``."""

    def wrap(cls: type[D]) -> type[D]:
        cls.name = name
        return DETECTORS.register(name, cls)

    return wrap


def list_detectors() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(DETECTORS)


def get_detector_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``."""
    if name not in DETECTORS:  # listed sorted, as `list_detectors` gives them
        raise UnknownDetectorError(
            f"Unknown OOD detector '{name}'.{did_you_mean(name, DETECTORS)} "
            f"Expected one of: {', '.join(list_detectors())}."
        )
    return DETECTORS.get(name)


def create_detector(name: str, **options: Any) -> Detector:
    """An unfitted detector ``name`` with ``options`` (e.g. ``k=50`` for ``knn``)."""
    cls = get_detector_class(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise DetectorError(
            f"Detector '{name}' has no option(s) {unknown}. Its options: {accepted}."
        )
    return cls(**options)


def restore_detector(name: str, state: Mapping[str, Any]) -> Detector:
    """The fitted detector ``name`` from a saved :meth:`Detector.state`."""
    return get_detector_class(name).from_state(state)


def check_int(value: Any, *, option: str, detector: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, or a :class:`DetectorError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DetectorError(
            f"Detector '{detector}' option {option} must be an integer >= {minimum}; got {value!r}."
        )
    return int(value)
