"""lightning_hessian: watch the curvature of the loss while a model trains.

Functional core (usable on any ``torch.nn.Module``, no Lightning needed): :class:`HessianOperator`
and the estimators :func:`hessian_trace`, :func:`top_eigenvalues`, :func:`spectral_density`,
:func:`local_volume`, and the pure :class:`TraceSharpDropDetector`. Lightning callbacks live in
:mod:`lightning_hessian.callbacks`.
"""

from lightning_hessian.analysis import (
    CurvatureRegressions,
    DensityHistory,
    MetricsTable,
    OLSResult,
    curvature_regressions,
    load_density,
    load_metrics,
    ols,
    regression_table,
)
from lightning_hessian.errors import HessianComputationError, NonFiniteHVPError, NonFiniteLossError
from lightning_hessian.estimators.density import SpectralDensity, spectral_density
from lightning_hessian.estimators.eigen import EigenResult, top_eigenvalues
from lightning_hessian.estimators.lanczos import LanczosResult, lanczos
from lightning_hessian.estimators.trace import TraceEstimate, hessian_trace
from lightning_hessian.operators import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    PreconditionedOperator,
    parameter_blocks,
    preconditioned_operator,
    preserved_model_state,
)
from lightning_hessian.signals.sharp_drop import TraceHistory, TraceSharpDropDetector
from lightning_hessian.signals.stability import (
    StabilityThreshold,
    adam_preconditioned_threshold,
    sgd_sharpness_threshold,
    stability_threshold,
)
from lightning_hessian.volume import VolumeComputationError, VolumeEstimate, init_prior_std, local_volume

__version__ = "0.1.0.dev0"

__all__ = [
    "CurvatureRegressions",
    "DensityHistory",
    "MetricsTable",
    "OLSResult",
    "curvature_regressions",
    "load_density",
    "load_metrics",
    "ols",
    "regression_table",
    "CurvatureOperator",
    "EigenResult",
    "GGNOperator",
    "PreconditionedOperator",
    "StabilityThreshold",
    "adam_preconditioned_threshold",
    "parameter_blocks",
    "preconditioned_operator",
    "sgd_sharpness_threshold",
    "stability_threshold",
    "HessianComputationError",
    "HessianOperator",
    "LanczosResult",
    "MatrixOperator",
    "NonFiniteHVPError",
    "NonFiniteLossError",
    "SpectralDensity",
    "TraceEstimate",
    "TraceHistory",
    "TraceSharpDropDetector",
    "VolumeComputationError",
    "VolumeEstimate",
    "hessian_trace",
    "init_prior_std",
    "lanczos",
    "local_volume",
    "preserved_model_state",
    "spectral_density",
    "top_eigenvalues",
]
