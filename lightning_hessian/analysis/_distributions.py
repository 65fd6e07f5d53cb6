"""Tail probabilities without SciPy: the regularised incomplete beta function, Student-t and F."""

from __future__ import annotations

import math
import warnings

_CF_MAX_ITER = 100_000
_CF_EPS = 1e-16
_CF_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    warnings.warn(
        f"Incomplete beta continued fraction did not converge (a={a}, b={b}, x={x}).", RuntimeWarning, stacklevel=3
    )
    return h


def _betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    r"""Regularised incomplete beta :math:`I_x(a, b)`; ``y = 1 - x`` may be given exactly."""
    if not (a > 0 and b > 0):
        raise ValueError(f"_betainc needs a, b > 0, got a={a}, b={b}.")
    if math.isnan(x):
        return math.nan
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _t_two_sided_pvalue(t: float, dof: float) -> float:
    r""":math:`P(|T_\nu| \ge |t|) = I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`."""
    if math.isnan(t) or dof <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return _betainc(0.5 * dof, 0.5, dof / (dof + t2), t2 / (dof + t2))


def _f_sf(f: float, dfn: float, dfd: float) -> float:
    r""":math:`P(F_{d_1,d_2} \ge f) = I_{d_2/(d_2+d_1 f)}(d_2/2, d_1/2)`."""
    if math.isnan(f) or dfn <= 0 or dfd <= 0:
        return math.nan
    if math.isinf(f):
        return 0.0 if f > 0 else 1.0
    if f <= 0:
        return 1.0
    denom = dfd + dfn * f
    return _betainc(0.5 * dfd, 0.5 * dfn, dfd / denom, dfn * f / denom)
