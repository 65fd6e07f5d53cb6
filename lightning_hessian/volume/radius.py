"""Batched root finding for the radius of a star domain along many directions at once.

For each direction ``j`` we look for the first ``t > 0`` where a cost ``C_j(t)`` (zero at
``t = 0``, increasing near it) crosses ``cutoff``. The search works on

    x = log t,    y(x) = log C(e^x) - log cutoff,

where a nearly quadratic cost is a nearly straight line of slope 2. The secant finder
(:func:`find_radii` with ``method="secant"``) exploits this:

1. one scouting evaluation at the initial guess ``x0``;
2. while the root is not bracketed, extrapolate on the line through the last two points on the
   same side (slope 2, the quadratic model, until two points exist), steps clipped to
   ``[tol/2, max_step]``;
3. once bracketed, Illinois-modified regula falsi on ``(x, y)``, safeguarded: proposals stay at
   least ``tol/2`` inside the bracket (so a good prediction closes it to width ``tol/2`` on the
   next evaluation), and two poorly-shrinking steps in a row trigger a bisection step.

It stops when the bracket ``[x_lo, x_hi]`` (``y(x_lo) < 0 <= y(x_hi)``) is at most ``tol`` wide
and returns the linear interpolation of ``y`` inside it, so ``|log r_hat - log r| <= tol``; with
``tol = log1p(rel_tol)`` the relative error on ``r`` is at most ``rel_tol``. An exactly quadratic
cost needs 3 evaluations per direction.

``method="bisection"`` is the paper's baseline at the same tolerance: the same scouting point,
doubling/halving until bracketed, then arithmetic bisection of ``r``.

All directions still searching are evaluated together (``evaluate(indices, t)``), one batched
call per iteration, so a distributed implementation needs exactly one collective per iteration
and every process takes identical decisions from identical (reduced) costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["RadiusSearch", "RootFinder", "find_radii"]

RootFinder = Literal["secant", "bisection"]

_EXTRAPOLATION_SLOPE = 2.0  # d log C / d log t of a quadratic cost
_MIN_SLOPE, _MAX_SLOPE = 0.5, 8.0
_UNKNOWN_STEP = math.log(10.0)  # step when log C is -inf (C <= 0) or +inf


class RadiusSearchNaNError(FloatingPointError):
    """Raised by :func:`find_radii` when ``evaluate`` returns NaN (the caller re-wraps it)."""

    def __init__(self, message: str, index: int, t: float) -> None:
        super().__init__(message)
        self.index = index
        self.t = t


@dataclass
class RadiusSearch:
    """Result of :func:`find_radii` (all tensors on the CPU, shape ``[J]``).

    Attributes:
        log_radius: ``log r`` per direction. For a converged direction, the interpolated crossing
            (error at most ``tol`` in ``log r``); for a capped one, ``log_max_radius``; for a
            non-converged one, the lower end of its last bracket (a point known to be inside the
            domain, so the estimate stays conservative), or ``-inf`` if none was found.
        evaluations: Cost evaluations spent per direction (int64).
        converged: The crossing was bracketed to within ``tol``.
        capped: The cost stayed below the cutoff up to ``log_max_radius``.
    """

    log_radius: Tensor
    evaluations: Tensor
    converged: Tensor
    capped: Tensor


class _Search:
    """One direction's state machine (plain floats: J directions cost microseconds per step)."""

    __slots__ = (
        "capped",
        "converged",
        "done",
        "evals",
        "hi",
        "hi_prev",
        "hi_s",
        "last_side",
        "lo",
        "lo_prev",
        "lo_s",
        "log_max",
        "max_evals",
        "max_step",
        "method",
        "next_x",
        "stall",
        "tol",
    )

    def __init__(self, x0: float, method: str, tol: float, log_max: float, max_step: float, max_evals: int):
        self.method = method
        self.tol = tol
        self.log_max = log_max
        self.max_step = max_step
        self.max_evals = max_evals
        self.lo: tuple[float, float] | None = None  # (x, y) with y < 0, largest such x
        self.hi: tuple[float, float] | None = None  # (x, y) with y >= 0, smallest such x
        self.lo_s = 0.0  # Illinois-scaled y values
        self.hi_s = 0.0
        self.lo_prev: tuple[float, float] | None = None  # previous lo point (slope estimates)
        self.hi_prev: tuple[float, float] | None = None
        self.last_side = 0
        self.stall = 0
        self.evals = 0
        self.next_x = min(x0, log_max)
        self.done = False
        self.converged = False
        self.capped = False

    # ------------------------------------------------------------------ update

    def update(self, x: float, y: float) -> None:
        self.evals += 1
        width_before = (self.hi[0] - self.lo[0]) if (self.lo and self.hi) else math.inf
        if y < 0:
            if self.lo is None or x > self.lo[0]:
                self.lo_prev, self.lo, self.lo_s = self.lo, (x, y), y
            if self.last_side == -1 and self.hi is not None:
                self.hi_s *= 0.5
            self.last_side = -1
        else:
            if self.hi is None or x < self.hi[0]:
                self.hi_prev, self.hi, self.hi_s = self.hi, (x, y), y
            if self.last_side == 1 and self.lo is not None:
                self.lo_s *= 0.5
            self.last_side = 1
        if self.lo is not None and self.hi is not None:
            width = self.hi[0] - self.lo[0]
            self.stall = self.stall + 1 if width > 0.5 * width_before else 0
            if width <= self.tol:
                self.done = self.converged = True
                return
        elif self.hi is None and self.lo is not None and self.lo[0] >= self.log_max:
            self.done = self.capped = True
            return
        if self.evals >= self.max_evals:
            self.done = True
            return
        self.next_x = self._propose()

    # ------------------------------------------------------------------ proposals

    def _propose(self) -> float:
        half = 0.5 * self.tol
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.method == "bisection":
                return math.log(0.5 * (math.exp(lo[0]) + math.exp(hi[0])))
            if self.stall >= 2 or not (math.isfinite(self.lo_s) and math.isfinite(self.hi_s)):
                self.stall = 0
                x = 0.5 * (lo[0] + hi[0])
            else:
                x = lo[0] - self.lo_s * (hi[0] - lo[0]) / (self.hi_s - self.lo_s)
            return min(max(x, lo[0] + half), hi[0] - half)
        if lo is not None:  # below the cutoff only: move outwards
            if self.method == "bisection":
                step = math.log(2.0)
            elif not math.isfinite(lo[1]):
                step = _UNKNOWN_STEP
            else:
                step = -lo[1] / _slope(self.lo_prev, lo)
            step = min(max(step, half), self.max_step)
            return min(lo[0] + step, self.log_max)
        assert hi is not None  # above the cutoff only: move inwards
        if self.method == "bisection":
            step = math.log(2.0)
        elif not math.isfinite(hi[1]):
            step = _UNKNOWN_STEP
        else:
            step = hi[1] / _slope(self.hi_prev, hi)
        step = min(max(step, half), self.max_step)
        return hi[0] - step

    # ------------------------------------------------------------------ result

    def result(self) -> float:
        lo, hi = self.lo, self.hi
        if self.capped:
            return self.log_max
        if self.converged:
            assert lo is not None and hi is not None
            if math.isfinite(lo[1]) and math.isfinite(hi[1]) and hi[1] > lo[1]:
                x = lo[0] - lo[1] * (hi[0] - lo[0]) / (hi[1] - lo[1])
                return min(max(x, lo[0]), hi[0])
            return 0.5 * (lo[0] + hi[0])
        return lo[0] if lo is not None else -math.inf


def _slope(prev: tuple[float, float] | None, last: tuple[float, float]) -> float:
    """Secant slope of y versus x through two same-side points, else the quadratic model's 2."""
    if prev is None or not (math.isfinite(prev[1]) and math.isfinite(last[1])):
        return _EXTRAPOLATION_SLOPE
    dx = last[0] - prev[0]
    if dx == 0.0:
        return _EXTRAPOLATION_SLOPE
    slope = (last[1] - prev[1]) / dx
    if not math.isfinite(slope):
        return _EXTRAPOLATION_SLOPE
    return min(max(slope, _MIN_SLOPE), _MAX_SLOPE)


def find_radii(
    evaluate: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    cutoff: float,
    rel_tol: float = 1e-4,
    log_max_radius: float = math.inf,
    max_evaluations: int = 100,
    max_step: float = math.log(1e4),
    method: RootFinder = "secant",
) -> RadiusSearch:
    """First crossing ``C_j(r_j) = cutoff`` for ``J`` directions, batched.

    Args:
        evaluate: ``evaluate(indices, t) -> costs``: the cost of direction ``indices[i]`` at
            distance ``t[i]`` (float64 CPU tensors of equal length; returns float64 ``[len]``).
            Called once per iteration with every direction still searching.
        x0: Initial guesses of ``log r``, shape ``[J]``.
        cutoff: The level to cross (> 0).
        rel_tol: Relative tolerance on ``r``; the bracket is closed to ``log1p(rel_tol)``.
        log_max_radius: Directions still below the cutoff here are capped.
        max_evaluations: Per-direction budget; a direction that exhausts it is reported as not
            converged.
        max_step: Largest move in ``log t`` per unbracketed step.
        method: ``"secant"`` (default) or ``"bisection"`` (the baseline).

    Raises:
        RadiusSearchNaNError: ``evaluate`` returned NaN.
    """
    if method not in ("secant", "bisection"):
        raise ValueError(f"`root_finder` must be 'secant' or 'bisection', got {method!r}.")
    tol = math.log1p(rel_tol)
    log_cutoff = math.log(cutoff)
    searches = [_Search(float(x), method, tol, log_max_radius, max_step, max_evaluations) for x in x0.tolist()]
    while True:
        active = [j for j, s in enumerate(searches) if not s.done]
        if not active:
            break
        xs = torch.tensor([searches[j].next_x for j in active], dtype=torch.float64)
        cost_tensor = evaluate(torch.tensor(active, dtype=torch.long), torch.exp(xs))
        costs = cost_tensor.detach().to("cpu", torch.float64).reshape(-1).tolist()
        for j, x, c in zip(active, xs.tolist(), costs, strict=False):
            if math.isnan(c):
                raise RadiusSearchNaNError(f"cost is NaN at t={math.exp(x):.6g}", j, math.exp(x))
            y = math.log(c) - log_cutoff if c > 0 else -math.inf
            searches[j].update(x, y)
    return RadiusSearch(
        log_radius=torch.tensor([s.result() for s in searches], dtype=torch.float64),
        evaluations=torch.tensor([s.evals for s in searches], dtype=torch.long),
        converged=torch.tensor([s.converged for s in searches], dtype=torch.bool),
        capped=torch.tensor([s.capped for s in searches], dtype=torch.bool),
    )
