"""Estimators: what every :class:`~lightning_hessian.operators.CurvatureOperator` is turned into.

Lanczos tridiagonalisation (:mod:`.lanczos`), top/bottom eigenvalues (:mod:`.eigen`), the trace
(:mod:`.trace`), the spectral density (:mod:`.density`), outlier deflation shared by the last two
(:mod:`.deflation`) and per-block traces (:mod:`.block_trace`). They see only ``matmat`` and
``num_params``: no model, no Lightning.
"""

from lightning_hessian.estimators.block_trace import FirstProductRecorder, block_trace_samples, block_traces
from lightning_hessian.estimators.density import SpectralDensity, spectral_density
from lightning_hessian.estimators.eigen import EigenResult, top_eigenvalues
from lightning_hessian.estimators.lanczos import LanczosResult, lanczos
from lightning_hessian.estimators.trace import TraceEstimate, hessian_trace

__all__ = [
    "FirstProductRecorder",
    "block_trace_samples",
    "EigenResult",
    "LanczosResult",
    "SpectralDensity",
    "TraceEstimate",
    "block_traces",
    "hessian_trace",
    "lanczos",
    "spectral_density",
    "top_eigenvalues",
]
