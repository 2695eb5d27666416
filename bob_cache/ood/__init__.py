"""Post-hoc OOD detection on cached penultimate features and a linear head.

Every detector scores **higher = more in-distribution**; the metrics take ID as the positive
class. Detectors fit on a stream of ``(features, labels)`` blocks of the ID training set (so
no ID set has to fit in memory) and expose their fitted state as numpy arrays for storage.

    detector = create_detector("mahalanobis").fit(blocks)
    metrics = ood_metrics(detector.score(id_test), detector.score(ood_test))
"""

# Importing the detector modules registers them.
from bob_cache.ood import gaussian, knn, logit, vim  # noqa: F401
from bob_cache.ood.blocks import BlockSource, LinearHead
from bob_cache.ood.detectors import (
    Detector,
    create_detector,
    get_detector_class,
    list_detectors,
    register_detector,
    restore_detector,
)
from bob_cache.ood.metrics import OODMetrics, fpr_at_tpr, ood_metrics

__all__ = [
    "BlockSource",
    "Detector",
    "LinearHead",
    "OODMetrics",
    "create_detector",
    "fpr_at_tpr",
    "get_detector_class",
    "list_detectors",
    "ood_metrics",
    "register_detector",
    "restore_detector",
]
