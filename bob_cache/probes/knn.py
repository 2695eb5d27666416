"""DINO-style weighted k-nearest-neighbour classification through FAISS.

Features are L2-normalized, so inner product is cosine similarity. Each test row's
``max(ks)`` neighbours are found once (exact search; on the GPU when faiss-gpu sees one);
every k then votes with weights ``exp(similarity / T)`` over its first k neighbours.
Multi-label sets average the neighbours' label vectors with the same weights.

A k above the number of training rows is refused, never capped: a capped k would be the
same fit as every other k at or above the train size, reported under different names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bob_cache.errors import SpecError
from bob_cache.extras import import_faiss
from bob_cache.probes.features import Features

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def split_ks(ks: Sequence[int], n_train: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(usable, too_large)``: the ks that a fit on ``n_train`` rows can vote with, and the
    ks above ``n_train`` (a vote over every row, whatever k is named)."""
    return tuple(k for k in ks if k <= n_train), tuple(k for k in ks if k > n_train)


def _normalized(features: Features) -> np.ndarray:
    x = features.materialize().astype(np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def neighbours(
    train: Features, query: Features, k: int, *, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and train-row indices of each query's ``k`` nearest rows."""
    faiss = import_faiss()

    base = _normalized(train)
    index = faiss.IndexFlatIP(base.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(base)
    sims, idx = index.search(_normalized(query), min(k, len(base)))
    return sims, idx


def knn_scores(
    train: Features,
    y_train: np.ndarray,
    query: Features,
    *,
    n_outputs: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    use_gpu: bool = False,
) -> dict[int, np.ndarray]:
    """Class scores ``(n_query, n_outputs)`` for each k.

    Raises:
        SpecError: a k is above the number of training rows (see :func:`split_ks`).
    """
    _, too_large = split_ks(ks, train.n)
    if too_large:
        raise SpecError(
            f"kNN k={', '.join(map(str, too_large))} is above the {train.n} training rows; "
            "every such k would be the same vote over all rows. Use k at most the train size."
        )
    sims, idx = neighbours(train, query, max(ks), use_gpu=use_gpu)
    weights = torch.from_numpy(np.exp(sims / temperature))
    out = {}
    for k in ks:
        w = weights[:, :k]
        if y_train.ndim == 1:
            votes = torch.zeros(len(idx), n_outputs, dtype=w.dtype)
            votes.scatter_add_(1, torch.from_numpy(y_train[idx[:, :k]]), w)
        else:  # multi-label: weighted mean of neighbour labels (unknown counts as 0)
            labels = torch.from_numpy(np.clip(y_train[idx[:, :k]], 0, None).astype(np.float32))
            votes = (w.unsqueeze(-1) * labels).sum(1) / w.sum(1, keepdim=True)
        out[k] = votes.numpy()
    return out
