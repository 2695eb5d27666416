"""The estimator contract and registry.

An estimator scores how well a backbone's frozen features should transfer to a labelled
target set, **higher = better**, from the features alone (no training). It reads a
:class:`TransferInputs`: the labelled rows, statistics shared between estimators (one
moments pass serves LogME and H-score; one pass of source-head logits serves LEEP and NCE)
and, for the estimators whose ``needs_source`` is true, the backbone's own source-task
classifier. Estimators register by name with :func:`register_estimator`;
:func:`create_estimator` builds one from its name and options.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from bob_cache.errors import SpecError
from bob_cache.ood.blocks import LinearHead
from bob_cache.registry import Registry
from bob_cache.transfer.moments import ClassMoments
from bob_cache.transfer.rows import LabelledRows

E = TypeVar("E", bound="Estimator")
ESTIMATORS: Registry[type[Estimator]] = Registry("transferability method", error=SpecError)


@dataclass(frozen=True)
class Estimate:
    """One estimator's result: its score (``metrics[metric]``), diagnostics and protocol."""

    method: str
    metric: str
    metrics: dict[str, float]
    rows: int  # labelled rows the estimate read
    protocol: str

    @property
    def value(self) -> float:
        return self.metrics[self.metric]


@dataclass
class TransferInputs:
    """What estimators read: labelled rows and, for LEEP and NCE, the source-task head
    (``logits = features @ weight.T + bias``) with a description for the protocol."""

    rows: LabelledRows
    source: LinearHead | None = None
    source_note: str = ""  # e.g. "the backbone's own 1000-class classifier (weights ...)"
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """A statistic computed once and reused by every estimator that asks by ``name``."""
        if name not in self._shared:
            self._shared[name] = compute()
        return self._shared[name]

    @property
    def moments(self) -> ClassMoments:
        return self.shared("moments", functools.partial(ClassMoments.accumulate, self.rows))


class Estimator(abc.ABC):
    """A transferability estimator (see the module doc).

    Class attributes: ``metric`` (the results-table metric of its score), ``needs_source``
    (it reads the backbone's source-task classifier) and ``reference`` (the paper).
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    needs_source: ClassVar[bool] = False
    reference: ClassVar[str] = ""

    def estimate(self, inputs: TransferInputs) -> Estimate:
        """Score ``inputs``; raises SpecError when the estimator cannot apply to them."""
        if self.needs_source and inputs.source is None:
            raise SpecError(
                f"'{self.name}' ({self.reference}) needs the backbone's source-task classifier "
                "over the features (its logits give the source label distribution); none was "
                "given. Pass source=LinearHead(weight, bias), or use logme, hscore or knn-loo."
            )
        if self.needs_source and inputs.source.dim != inputs.rows.dim:
            raise SpecError(
                f"The source classifier reads {inputs.source.dim}-d features, but the rows are "
                f"{inputs.rows.dim}-d: '{self.name}' needs the features the classifier was "
                "trained on (the backbone's pre-logit output)."
            )
        return self._estimate(inputs)

    @abc.abstractmethod
    def _estimate(self, inputs: TransferInputs) -> Estimate: ...

    def options(self) -> dict[str, Any]:
        """The options that change the numbers (part of a unit's identity)."""
        return {}

    def result(
        self, inputs: TransferInputs, value: float, protocol: str, **extra: float
    ) -> Estimate:
        return Estimate(self.name, self.metric, {self.metric: float(value), **extra},
                        inputs.rows.n, protocol)  # fmt: skip


def register_estimator(name: str) -> Callable[[type[E]], type[E]]:
    """Class decorator: register an :class:`Estimator` subclass under ``name``."""

    def wrap(cls: type[E]) -> type[E]:
        cls.name = name
        return ESTIMATORS.register(name, cls)

    return wrap


def list_estimators() -> list[str]:
    """Registered estimator names, in registration order."""
    return ESTIMATORS.names()


def get_estimator_class(name: str) -> type[Estimator]:
    """The estimator class registered as ``name``."""
    return ESTIMATORS.get(name)


def create_estimator(name: str, **options: Any) -> Estimator:
    """Estimator ``name`` with ``options`` (e.g. ``k=5`` for ``knn-loo``)."""
    cls = get_estimator_class(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SpecError(
            f"Transferability method '{name}' has no option(s) {unknown}. Its options: "
            f"{', '.join(valid) or 'none'}."
        )
    return cls(**options)
