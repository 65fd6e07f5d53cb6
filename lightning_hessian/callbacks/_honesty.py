"""Numbers that may mislead say so: the rules behind the monitors' configuration warnings and flags.

* **Top eigenvalue converged.** ``top_eigenvalue_converged`` is 1 when the top Ritz pair's
  residual :math:`r = \\lVert H y - \\theta y\\rVert` is at most :data:`TOP_EIGENVALUE_RTOL` times
  :math:`|\\theta|`. An eigenvalue of :math:`H` then lies within :math:`r` of :math:`\\theta`
  (Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1): the logged value is that accurate,
  unless Lanczos has not yet found the top eigenvalue at all (a starting vector orthogonal to it;
  unlikely with random probes).
* **Enough Lanczos steps.** ``num_steps`` below ``max(MIN_LANCZOS_STEPS, 3 * top_k)`` warns at
  construction: on the digits MLP 1-3 steps log :math:`\\lambda_{\\max}` 0.022 against an exact
  1.946 and a *positive* smallest eigenvalue against an exact -0.204, and the density of one run
  has only ``num_steps`` nodes. ``num_steps`` above the number of parameters cannot help (the
  Krylov space is then the whole space): the dry run caps it with a warning.
* **Enough probes.** ``num_runs=1`` makes ``trace_stderr`` and the confidence interval undefined
  (NaN): a warning at construction.
* **Enough samples.** An analysis set of fewer than :data:`MIN_ANALYSIS_SAMPLES` samples warns at
  the dry run, naming ``analysis_fraction`` and ``max_samples`` (digits MLP: :math:`\\lambda_{\\max}`
  4.34 on 1 sample against 1.52 on 100).
"""

from __future__ import annotations

import math
import warnings

from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "MIN_ANALYSIS_SAMPLES",
    "MIN_LANCZOS_STEPS",
    "TOP_EIGENVALUE_RTOL",
    "cap_num_steps",
    "check_analysis_size",
    "check_lanczos_budget",
    "top_eigenvalue_converged",
]

TOP_EIGENVALUE_RTOL = 1e-3
MIN_LANCZOS_STEPS = 20
MIN_ANALYSIS_SAMPLES = 32


def top_eigenvalue_converged(value: float, residual: float) -> float:
    """1.0 when ``residual <= TOP_EIGENVALUE_RTOL * |value|``, 0.0 otherwise (NaN inputs: 0.0)."""
    if not (math.isfinite(value) and math.isfinite(residual)):
        return 0.0
    return 1.0 if residual <= TOP_EIGENVALUE_RTOL * abs(value) else 0.0


def check_lanczos_budget(name: str, num_runs: int, num_steps: int, top_k: int) -> None:
    """Construction-time warnings: too few steps for ``top_k``/the density; one run (no interval)."""
    needed = max(MIN_LANCZOS_STEPS, 3 * top_k)
    if num_steps < needed:
        warnings.warn(
            f"{name}: `num_steps`={num_steps} is too few for reliable extreme eigenvalues and density "
            f"(rule: num_steps >= max({MIN_LANCZOS_STEPS}, 3 * top_k) = {needed}); the extreme Ritz values are then "
            "far inside the spectrum (the top eigenvalue too low, the smallest too high, possibly positive) and "
            "each run's density has only num_steps nodes. Watch `top_eigenvalue_converged`; the default is 40.",
            UserWarning,
            stacklevel=3,
        )
    if num_runs == 1:
        warnings.warn(
            f"{name}: `num_runs`=1 leaves one trace probe: `trace_stderr` and the confidence interval "
            "(`trace_ci_low`/`trace_ci_high`) are undefined and logged as NaN, and the sharp-drop detector has "
            "no standard error. Use num_runs >= 2 (default 3).",
            UserWarning,
            stacklevel=3,
        )


def cap_num_steps(name: str, num_steps: int, num_params: int) -> int:
    """``min(num_steps, num_params)``, with a warning when capped (the Krylov space is then full)."""
    if num_steps <= num_params:
        return num_steps
    rank_zero_warn(
        f"{name}: `num_steps`={num_steps} exceeds the number of trainable parameters ({num_params}); more "
        f"Lanczos steps than dimensions cannot help (the Krylov space is the whole space after {num_params}). "
        f"Capped at {num_params} steps per run."
    )
    return num_params


def check_analysis_size(name: str, num_samples: int, fraction: float, max_samples: int | None) -> None:
    """Warn when the analysis set is below :data:`MIN_ANALYSIS_SAMPLES`, naming the arguments."""
    if num_samples >= MIN_ANALYSIS_SAMPLES:
        return
    rank_zero_warn(
        f"{name}: the analysis set has only {num_samples} sample(s) (fewer than {MIN_ANALYSIS_SAMPLES}): the "
        "curvature of so few samples is a noisy stand-in for the dataset's. Raise "
        f"`analysis_fraction` (now {fraction:g}) or `max_samples` (now {max_samples})."
    )
