"""Detectors on the linear head's logits ``z = x @ W.T + b`` (a float32 product, reduced in
float64: see :class:`~bob_cache.ood.blocks.LinearHead`).

* ``msp`` (Hendrycks & Gimpel 2017): ``max_k softmax(z)_k``.
* ``maxlogit`` (Hendrycks et al. 2022): ``max_k z_k``.
* ``energy`` (Liu et al. 2020): ``T * logsumexp(z / T)`` (the negative free energy), T=1.
* ``react`` (Sun et al. 2021, with energy): ``logsumexp(min(x, c) @ W.T + b)`` where ``c`` is
  the ``percentile``-th percentile (default 90, ``numpy.percentile``'s linear interpolation)
  of all ID activations (every element of the ID feature matrix, as ReAct's
  ``np.percentile(activation_log.flatten(), 90)``). Streaming rule: the percentile is exact
  when the ID set has at most ``max_samples`` elements (default 2,000,000), and otherwise
  taken over a uniform random subsample of ``max_samples`` elements without replacement
  (:class:`~bob_cache.ood.stats.ReservoirSample`, ``seed`` default 0), which does not depend
  on how the stream is cut into blocks.

``msp``, ``maxlogit`` and ``energy`` read no ID rows (``passes = 0``): fitting stores the head.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import numpy as np
import torch

from bob_cache.errors import DetectorError
from bob_cache.ood.blocks import BlockSource, LinearHead, iter_blocks
from bob_cache.ood.detectors import Detector, State, check_int, register_detector
from bob_cache.ood.stats import ReservoirSample


class HeadDetector(Detector):
    """A detector that scores through the head alone; the state holds ``weight`` and ``bias``."""

    passes = 0
    needs_head = True
    score_dtype = np.float32  # the logits are a float32 product anyway

    def __init__(self) -> None:
        super().__init__()
        self.head: LinearHead | None = None

    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None:
        self.head, self.dim = head, head.dim

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self._from_logits(self.head.logits_tensor(x)).numpy()

    def _from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> State:
        return {"weight": self.head.weight, "bias": self.head.bias}

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("weight", "bias")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> HeadDetector:
        detector = cls()
        detector.head = LinearHead(state["weight"], state["bias"])
        return detector


@register_detector("msp")
class MSP(HeadDetector):
    """Maximum softmax probability."""

    def _from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.exp(logits.amax(1) - torch.logsumexp(logits, 1))


@register_detector("maxlogit")
class MaxLogit(HeadDetector):
    """Maximum logit."""

    def _from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` per row."""
    return temperature * torch.logsumexp(logits / temperature, 1)


@register_detector("energy")
class Energy(HeadDetector):
    """Negative free energy at temperature ``temperature`` (default 1)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(temperature, Real) and temperature > 0):
            raise DetectorError(
                f"Detector 'energy' option temperature must be a number > 0; got {temperature!r}."
            )
        self.temperature = float(temperature)

    def _from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return energy(logits, self.temperature)

    def _state(self) -> State:
        return {**super()._state(), "temperature": self.temperature}

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return (*super()._state_keys(), "temperature")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> Energy:
        detector = cls(temperature=float(state["temperature"]))
        detector.head = LinearHead(state["weight"], state["bias"])
        return detector


@register_detector("react")
class ReAct(HeadDetector):
    """Energy of the head on features clipped at a high percentile of the ID activations."""

    passes = 1

    def __init__(
        self, percentile: float = 90.0, *, max_samples: int = 2_000_000, seed: int = 0
    ) -> None:
        super().__init__()
        if not (isinstance(percentile, Real) and 0 < percentile <= 100):
            raise DetectorError(
                f"Detector 'react' option percentile must be in (0, 100]; got {percentile!r}. "
                "The paper uses 90."
            )
        self.percentile = float(percentile)
        self.max_samples = check_int(max_samples, option="max_samples", detector="react")
        self.seed = check_int(seed, option="seed", detector="react", minimum=0)
        self.threshold = np.inf

    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None:
        sample = ReservoirSample(self.max_samples, seed=self.seed)
        rows = 0
        for x, _ in iter_blocks(stream, detector=self.name, labels=False, dim=head.dim):
            sample.update(x)
            rows += len(x)
        self.threshold = float(np.percentile(sample.values, self.percentile))
        self.head, self.dim, self.n_fit = head, head.dim, rows

    def _score(self, x: np.ndarray) -> np.ndarray:
        return energy(self.head.logits_tensor(np.minimum(x, self.threshold))).numpy()

    def _state(self) -> State:
        return {
            **super()._state(),
            "threshold": self.threshold,
            "percentile": self.percentile,
            "max_samples": self.max_samples,
            "seed": self.seed,
        }

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return (*super()._state_keys(), "threshold", "percentile", "max_samples", "seed")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> ReAct:
        detector = cls(
            float(state["percentile"]),
            max_samples=int(state["max_samples"]),
            seed=int(state["seed"]),
        )
        detector.head = LinearHead(state["weight"], state["bias"])
        detector.threshold = float(state["threshold"])
        return detector


__all__ = ["MSP", "Energy", "HeadDetector", "MaxLogit", "ReAct", "energy"]
