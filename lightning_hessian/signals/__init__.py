"""Training signals read from the curvature: the trace's sharp drop and the stability thresholds.

:mod:`.sharp_drop` turns a sequence of trace estimates (with their intervals) into an early-stop
flag; :mod:`.stability` gives the edge-of-stability thresholds (``2/η`` for SGD, the Adam
preconditioned one) that λ_max is compared with.
"""

from lightning_hessian.signals.sharp_drop import TraceHistory, TraceSharpDropDetector
from lightning_hessian.signals.stability import (
    StabilityThreshold,
    adam_preconditioned_threshold,
    sgd_sharpness_threshold,
    stability_threshold,
)

__all__ = [
    "StabilityThreshold",
    "TraceHistory",
    "TraceSharpDropDetector",
    "adam_preconditioned_threshold",
    "sgd_sharpness_threshold",
    "stability_threshold",
]
