"""Probes on cached features: linear (sweep or BoB recipe), kNN, and few-shot subsets.

These run on features only; no model is ever loaded. Stages in ``bob_cache.pipelines``
wire them to the feature store and the results table.
"""

from bob_cache.probes.bob_recipe import BobRecipe, bob_scores, train_bob_probe
from bob_cache.probes.features import Features, Standardizer
from bob_cache.probes.fewshot import cv_folds, holdout, row_hashes, sample_fraction, sample_shots
from bob_cache.probes.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_scores
from bob_cache.probes.linear import LinearModel, SweepResult, fit_logistic, sweep, sweep_cv

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TEMPERATURE",
    "BobRecipe",
    "Features",
    "LinearModel",
    "Standardizer",
    "SweepResult",
    "bob_scores",
    "cv_folds",
    "fit_logistic",
    "holdout",
    "knn_scores",
    "row_hashes",
    "sample_fraction",
    "sample_shots",
    "sweep",
    "sweep_cv",
    "train_bob_probe",
]
