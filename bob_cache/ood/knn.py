"""Deep nearest neighbours (Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
Neighbors"), as the official knn-ood code computes it.

Features are L2-normalized (``x / ||x||``; an all-zero row stays zero). The bank is every
normalized ID fit row. The score is ``-||z - z_(k)||^2``: minus the *squared* Euclidean
distance (what FAISS's ``IndexFlatL2`` returns, and what the official ``scores_in = -D[:, -1]``
uses) from the normalized query ``z`` to its k-th nearest bank row; ``k`` defaults to 50. On
unit vectors this equals ``2 cos(z, z_(k)) - 2`` and ranks exactly as the plain distance. The
official normalizer adds 1e-10 after dividing; we guard only the zero row.

The bank is any 2-D array: a numpy array, or a Zarr array that the fit appended to
(``bank_sink``) so that a bank larger than memory stays on disk. Scoring is exact: FAISS's
``knn`` over bank blocks of :data:`BANK_BLOCK_ROWS`, merged in a ``ResultHeap`` (the same
distances as one ``IndexFlatL2`` search). The state holds the bank itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bob_cache.errors import DetectorError
from bob_cache.extras import import_faiss
from bob_cache.ood.blocks import BlockSource, LinearHead, iter_blocks
from bob_cache.ood.detectors import Detector, State, check_int, register_detector


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 C-contiguous (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


BANK_BLOCK_ROWS = 131_072  # 384 MiB of 768-d float32 per bank block read while scoring
BankSink = Callable[[int], Any]  # dim → an empty (0, dim) float32 array with .append(rows)


@register_detector("knn")
class KNN(Detector):
    """Negative squared distance to the k-th nearest normalized ID feature.

    Args:
        k: the neighbour whose distance is the score.
        at_most_rows: when the fit has fewer than ``k`` rows, use every row (``k`` becomes the
            fit's row count, and :attr:`k` says so) instead of refusing.
        bank_sink: where the fit writes the bank (default: in memory), e.g. a function that
            creates a Zarr array; the bank then never has to fit in memory.
    """

    def __init__(
        self, k: int = 50, *, at_most_rows: bool = False, bank_sink: BankSink | None = None
    ) -> None:
        super().__init__()
        self.k = check_int(k, option="k", detector="knn")
        self.at_most_rows = at_most_rows
        self.bank_sink = bank_sink
        self.bank_rows: Any = None

    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None:
        bank: Any = None
        kept: list[np.ndarray] = []
        for x, _ in iter_blocks(stream, detector=self.name, labels=False):
            if bank is None and self.bank_sink is not None:
                bank = self.bank_sink(x.shape[1])
            z = l2_normalize(x)
            if bank is None:
                kept.append(z)
            else:
                bank.append(z, axis=0)
        if bank is None:
            bank = np.concatenate(kept)
        rows = int(bank.shape[0])
        self._check_bank(rows)
        self.bank_rows, self.dim, self.n_fit = bank, int(bank.shape[1]), rows

    def _check_bank(self, rows: int) -> None:
        if rows < self.k and self.at_most_rows and rows > 0:
            self.k = rows
        elif rows < self.k:
            raise DetectorError(
                f"Detector 'knn' needs at least k={self.k} ID rows, but the fit stream had "
                f"{rows}. Lower k to at most {max(1, rows)} (`--knn-k`, `knn_k` in a suite's "
                "ood task, `create_detector('knn', k=...)`) or fit on more ID rows."
            )

    def _score(self, x: np.ndarray) -> np.ndarray:
        faiss = import_faiss()

        z = l2_normalize(x)
        heap = faiss.ResultHeap(len(z), self.k, keep_max=False)
        n = int(self.bank_rows.shape[0])
        for start in range(0, n, BANK_BLOCK_ROWS):
            block = np.ascontiguousarray(
                self.bank_rows[start : start + BANK_BLOCK_ROWS], np.float32
            )
            kk = min(self.k, len(block))
            distances, rows = faiss.knn(z, block, kk, metric=faiss.METRIC_L2)
            pad = ((0, 0), (0, self.k - kk))
            heap.add_result(
                np.ascontiguousarray(np.pad(distances, pad, constant_values=np.inf)),
                np.ascontiguousarray(np.pad(rows + start, pad, constant_values=-1)),
            )
        heap.finalize()
        return -heap.D[:, self.k - 1].astype(np.float64)

    def bank(self) -> np.ndarray:
        """The normalized ID rows, ``(N, D)`` float32."""
        return np.asarray(self.bank_rows[...], dtype=np.float32)

    def _state(self) -> State:
        return {"k": self.k, "bank": self.bank_rows}

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("k", "bank")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> KNN:
        detector = cls(k=int(state["k"]))
        bank = state["bank"]
        if getattr(bank, "ndim", None) != 2:
            bank = np.asarray(bank, dtype=np.float32)
        if bank.ndim != 2:
            raise DetectorError(f"The 'knn' state's bank must be (rows, dim); got {bank.shape}.")
        detector._check_bank(int(bank.shape[0]))
        detector.bank_rows = bank
        return detector
