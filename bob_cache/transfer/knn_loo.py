"""Leave-one-out k-nearest-neighbour accuracy: the plain baseline beside the estimators.

Each row is classified by a majority vote of its ``k`` nearest *other* rows by cosine
similarity (features L2-normalized; an all-zero row stays zero), ties going to the lowest
class, which is what scikit-learn's ``KNeighborsClassifier(k, metric="cosine")`` predicts
under ``LeaveOneOut``. The score is the share of rows classified correctly.

Exact LOO costs ``n² D``; above ``max_rows`` rows it runs on the ``max_rows`` rows with the
smallest hash of their id (the same images for every backbone, whatever their row order),
read from the reader without touching the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bob_cache.errors import SpecError
from bob_cache.transfer.estimators import Estimate, Estimator, TransferInputs, register_estimator

QUERY_BLOCK = 2048
DEFAULT_K = 5  # scikit-learn's KNeighborsClassifier default
DEFAULT_MAX_ROWS = 10_000


def sample_positions(ids: np.ndarray, max_rows: int) -> np.ndarray:
    """Sorted positions of the ``max_rows`` rows with the smallest id hash (all when fewer)."""
    from bob_cache.probes.fewshot import row_hashes

    if len(ids) <= max_rows:
        return np.arange(len(ids))
    return np.sort(np.argsort(row_hashes(ids, "knn-loo"), kind="stable")[:max_rows])


def loo_accuracy(x: np.ndarray, y: np.ndarray, *, k: int, n_classes: int) -> float:
    """Leave-one-out majority-vote accuracy of ``k`` cosine neighbours (see the module)."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    norms = x.norm(dim=1, keepdim=True)
    x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    correct = 0
    for start in range(0, len(x), QUERY_BLOCK):
        sim = x[start : start + QUERY_BLOCK] @ x.T
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -torch.inf  # leave the row itself out
        neighbours = labels[sim.topk(k, dim=1).indices]
        votes = torch.zeros(len(sim), n_classes).scatter_add_(
            1, neighbours, torch.ones(neighbours.shape)
        )
        correct += int((votes.argmax(dim=1) == labels[start : start + len(sim)]).sum())
    return correct / len(x)


@register_estimator("knn-loo")
class KnnLOO(Estimator):
    """Leave-one-out kNN top-1 (higher = better).

    Args:
        k: neighbours that vote.
        max_rows: rows above which a sample of this many (by id hash) is scored.
    """

    metric = "top1"
    reference = "leave-one-out k-NN"

    def __init__(self, k: int = DEFAULT_K, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise SpecError(f"knn-loo's k must be an integer of at least 1, got {k!r}.")
        if isinstance(max_rows, bool) or int(max_rows) != max_rows or max_rows < 2:
            raise SpecError(
                f"knn-loo's max_rows must be an integer of at least 2, got {max_rows!r}."
            )
        self.k, self.max_rows = int(k), int(max_rows)

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "max_rows": self.max_rows}

    def _estimate(self, inputs: TransferInputs) -> Estimate:
        rows = inputs.rows
        positions = sample_positions(rows.ids, self.max_rows)
        if self.k > len(positions) - 1:
            raise SpecError(
                f"knn-loo with k={self.k} needs at least {self.k + 1} labelled rows (each row's "
                f"k neighbours are the others); there are {len(positions)}. Pass a smaller k "
                "(--loo-k, or the suite's k)."
            )
        reader = rows.features if len(positions) == rows.n else rows.features.take(positions)
        x = np.concatenate(list(reader.blocks()))
        accuracy = loo_accuracy(x, rows.labels[positions], k=self.k, n_classes=rows.n_classes)
        sample = (
            f"all {rows.n} labelled rows"
            if len(positions) == rows.n
            else f"{len(positions)} of {rows.n} labelled rows drawn by id hash"
        )
        protocol = (
            f"leave-one-out k-NN accuracy: each row classified by a majority vote of its "
            f"k={self.k} nearest other rows by cosine similarity (ties to the lowest class), "
            f"on {sample} (train_rows); nothing is fitted on other rows"
        )
        return Estimate(self.name, self.metric, {"top1": accuracy}, len(positions), protocol)
