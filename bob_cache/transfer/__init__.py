"""Transferability estimates from cached features: cheap scores that try to predict, before
any probe or fine-tuning run, which backbone transfers best to a labelled target set.

    rows = labelled_rows(features, labels, ids)           # a reader or an (n, D) array
    inputs = TransferInputs(rows, source=LinearHead(weight, bias))   # source: LEEP/NCE only
    estimate = create_estimator("logme").estimate(inputs)           # .value, higher = better

Estimators (each checked in tests against an independent implementation of its paper):
``logme`` (You et al. 2021), ``hscore`` (the regularized H-score, Ibrahim et al. 2022),
``leep`` (Nguyen et al. 2020) and ``nce`` (Tran et al. 2019), which read the backbone's
source-task classifier, and ``knn-loo`` (leave-one-out kNN accuracy, the plain baseline).
They stream the rows block by block: memory stays bounded by ``D × D`` and ``K × Z`` statistics.

:func:`agreement_table` and :func:`plot_agreement` say how well the estimates predicted the
measured outcomes (linear probe, fine-tuning) across backbones.
"""

# Importing the estimator modules registers them.
from bob_cache.transfer import hscore, knn_loo, logme, source  # noqa: F401
from bob_cache.transfer.agreement import (
    DEFAULT_OUTCOMES,
    Outcome,
    agreement_points,
    agreement_table,
)
from bob_cache.transfer.estimators import (
    Estimate,
    Estimator,
    TransferInputs,
    create_estimator,
    get_estimator_class,
    list_estimators,
    register_estimator,
)
from bob_cache.transfer.moments import ClassMoments
from bob_cache.transfer.plots import plot_agreement
from bob_cache.transfer.rows import (
    ArrayRows,
    LabelledRows,
    RowReader,
    check_labels,
    labelled_rows,
)

__all__ = [
    "DEFAULT_OUTCOMES",
    "ArrayRows",
    "ClassMoments",
    "Estimate",
    "Estimator",
    "LabelledRows",
    "Outcome",
    "RowReader",
    "TransferInputs",
    "agreement_points",
    "agreement_table",
    "check_labels",
    "create_estimator",
    "get_estimator_class",
    "labelled_rows",
    "list_estimators",
    "plot_agreement",
    "register_estimator",
]
