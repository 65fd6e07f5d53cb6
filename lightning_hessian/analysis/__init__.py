r"""Read a run's logged metrics and fit the paper's curvature regressions, without SciPy.

* :func:`load_metrics` reads a run's scalars from TensorBoard event files or a Lightning
  ``CSVLogger`` ``metrics.csv`` into a per-epoch :class:`MetricsTable`;
  :func:`load_density` reads the ``hessian/eigenvalue_density`` histograms written by
  :class:`~lightning_hessian.callbacks.HessianMonitor` (TensorBoard only).
* :func:`ols` is ordinary least squares with the statistics a regression table needs
  (standard errors, t and F tests, :math:`R^2`, log-likelihood, AIC/BIC: the statsmodels
  definitions), with p-values from the regularised incomplete beta function.
* :func:`curvature_regressions` fits the four models of Alabdulkareem (NeurIPS 2022)
  §4.2 / Table 1 on per-epoch changes,

  .. math::  \Delta\mathrm{acc}^{test}_t = \beta_0 + \beta_1\,\Delta\lambda_{max,t}
             \;[+\;\beta_2\,\Delta\mathrm{acc}^{val}_t] + \varepsilon_t,

  for the in-distribution and the out-of-distribution (noisy-input, §7.5) test accuracy, and
  :func:`regression_table` prints them side by side like Table 1 (coefficient with
  significance stars, standard error in parentheses, F-test, AIC, N).

The package: :mod:`.tables` (the per-epoch table), :mod:`.events` (reading TensorBoard event files
and CSV logs), :mod:`._distributions` (t and F tails without SciPy), :mod:`.ols` (least squares
and the regression table), :mod:`.regressions` (the paper's four models), :mod:`.plots` (PNG
figures of a run) and :mod:`.cli` (``python -m lightning_hessian``). It stands alone: it reads
logs and imports nothing of the estimators or callbacks.
"""

from lightning_hessian.analysis.events import DensityHistory, find_run, load_density, load_metrics
from lightning_hessian.analysis.ols import OLSResult, ols, regression_table
from lightning_hessian.analysis.regressions import CurvatureRegressions, curvature_regressions
from lightning_hessian.analysis.tables import MetricsTable

__all__ = [
    "CurvatureRegressions",
    "DensityHistory",
    "MetricsTable",
    "OLSResult",
    "curvature_regressions",
    "find_run",
    "load_density",
    "load_metrics",
    "ols",
    "regression_table",
]
