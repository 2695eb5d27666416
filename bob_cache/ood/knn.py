"""Deep nearest neighbours (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
Neighbors"), as the official knn-ood code computes it.

Features are L2-normalized (``x / ||x||``; an all-zero row stays zero). The bank is every
normalized ID fit row, streamed block by block into a FAISS ``IndexFlatL2`` (exact search).
The score is ``-||z - z_(k)||^2``: minus the *squared* Euclidean distance (what
``IndexFlatL2`` returns, and what the official ``scores_in = -D[:, -1]`` uses) from the
normalized query ``z`` to its k-th nearest bank row; ``k`` defaults to 50. On unit vectors
this equals ``2 cos(z, z_(k)) - 2`` and ranks exactly as the plain distance. The official
normalizer adds 1e-10 after dividing; we guard only the zero row.

The state holds the bank itself (``(N, D)`` float32): the index is rebuilt from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bob_cache.errors import DetectorError
from bob_cache.ood.blocks import BlockSource, LinearHead, iter_blocks
from bob_cache.ood.detectors import Detector, State, check_int, register_detector


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 C-contiguous (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


@register_detector("knn")
class KNN(Detector):
    """Negative squared distance to the k-th nearest normalized ID feature."""

    def __init__(self, k: int = 50) -> None:
        super().__init__()
        self.k = check_int(k, option="k", detector="knn")
        self.index: Any = None

    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None:
        import faiss

        index = None
        for x, _ in iter_blocks(stream, detector=self.name, labels=False):
            if index is None:
                index = faiss.IndexFlatL2(x.shape[1])
            index.add(l2_normalize(x))
        self._check_bank(index.ntotal)
        self.index, self.dim, self.n_fit = index, index.d, index.ntotal

    def _check_bank(self, rows: int) -> None:
        if rows < self.k:
            raise DetectorError(
                f"Detector 'knn' needs at least k={self.k} ID rows, but the fit stream had "
                f"{rows}. Lower k (e.g. create_detector('knn', k={max(1, rows)})) or fit on "
                "more ID rows."
            )

    def _score(self, x: np.ndarray) -> np.ndarray:
        distances, _ = self.index.search(l2_normalize(x), self.k)
        return -distances[:, self.k - 1].astype(np.float64)

    def bank(self) -> np.ndarray:
        """The normalized ID rows, ``(N, D)`` float32."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    def _state(self) -> State:
        return {"k": self.k, "bank": self.bank()}

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("k", "bank")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> KNN:
        import faiss

        detector = cls(k=int(state["k"]))
        bank = np.ascontiguousarray(state["bank"], dtype=np.float32)
        if bank.ndim != 2:
            raise DetectorError(f"The 'knn' state's bank must be (rows, dim); got {bank.shape}.")
        detector._check_bank(len(bank))
        detector.index = faiss.IndexFlatL2(bank.shape[1])
        detector.index.add(bank)
        return detector
