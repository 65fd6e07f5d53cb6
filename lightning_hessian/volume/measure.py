r"""The measures: the Lebesgue volume and the Gaussian prior probability of a star domain.

Given per-direction radii :math:`r_i` along unit directions :math:`\hat v_i = v_i/\|v_i\|`
(:math:`v_i = P u_i`, :math:`u_i` uniform on the sphere, :math:`\det P = 1`), each direction
contributes one importance-weighted estimate (paper eqs. 15 and 19, :doc:`/methods/local-volume`):

- Lebesgue: :math:`\log|S^{n-1}| - \log n + n(\log r_i - \log\|v_i\|)`;
- Gaussian :math:`N(0, \mathrm{diag}(s^2))`: :math:`\log|S^{n-1}| - \tfrac n2\log 2\pi - \sum_j\log s_j
  - \tfrac q2 + \log\int_0^{r_i} e^{-a_i t^2/2 - b_i t}t^{n-1}dt - n\log\|v_i\|`.

The estimate is :math:`\operatorname{logsumexp}_i(\cdot) - \log k`, all in float64 log space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gaussian_log_contributions",
    "lebesgue_log_contributions",
    "log_radial_gaussian_integral",
    "log_sphere_area",
]


def log_sphere_area(n: int) -> float:
    r""":math:`\log|S^{n-1}| = \log 2 + \tfrac n2 \log\pi - \log\Gamma(\tfrac n2)`."""
    return math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_ndtr_diff(alpha: Tensor, beta: Tensor) -> Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha < beta, accurate in both tails."""
    upper = alpha > 0  # both in the upper tail: use Phi(-alpha) - Phi(-beta)
    lo = torch.where(upper, -beta, alpha)
    hi = torch.where(upper, -alpha, beta)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + _log1mexp(torch.clamp(log_lo - log_hi, max=0.0))


def log_radial_gaussian_integral(a: Tensor, b: Tensor, n: int, r: Tensor) -> Tensor:
    r"""``log ∫_0^r exp(-a t²/2 - b t) t^{n-1} dt`` by a second-order expansion (:doc:`/methods/local-volume`).

    The log-integrand :math:`g(t) = -\tfrac12 a t^2 - b t + (n-1)\log t` is concave with its
    maximum at :math:`t^* = (-b + \sqrt{b^2 + 4a(n-1)})/(2a)`. ``g`` is expanded to second order
    at :math:`m = \min(t^*, r)` (the maximum of ``g`` on ``[0, r]``), and the resulting Gaussian
    is integrated over ``[0, r]`` as a difference of normal CDFs in log space
    (``torch.special.log_ndtr``). The error in nats is worst when the cut ``r`` is near ``t*``
    and shrinks roughly like ``n^{-1/2}``: measured against log-space quadrature over a sweep of
    ``a``, ``b`` (up to 40) and ``r`` near ``t*``, at most 0.08 nats at ``n = 50`` and 0.03 at
    ``n = 400`` (``tests/test_volume.py``); for ``b = 0`` against the exact lower incomplete gamma
    function, 0.029 at ``n = 50``, 0.0023 at ``n = 4810``, 5e-6 at ``n = 1e6``. Small against
    the Monte Carlo spread of the volume estimate, but not zero. A zero radius gives ``-inf``
    (never NaN).

    Args:
        a: ``[k]`` positive curvatures (float64).
        b: ``[k]`` linear coefficients (float64).
        n: Dimension (``>= 1``).
        r: ``[k]`` upper limits (``> 0``).
    """
    a, b, r = (x.to(torch.float64) for x in (a, b, r))
    empty = r <= 0
    r = torch.where(empty, torch.ones_like(r), r)
    m1 = float(n - 1)
    disc = torch.sqrt(b * b + 4.0 * a * m1)
    t_star = torch.where(b <= 0, (-b + disc) / (2.0 * a), (2.0 * m1) / (b + disc))
    if m1 == 0:
        t_star = torch.clamp(-b / a, min=0.0)
    m = torch.minimum(t_star, r)
    m_safe = torch.clamp(m, min=torch.finfo(torch.float64).tiny)
    g = -0.5 * a * m * m - b * m + m1 * torch.log(m_safe)
    g1 = torch.clamp(-a * m - b + m1 / m_safe, min=0.0) if m1 > 0 else torch.clamp(-a * m - b, min=0.0)
    c = a + m1 / (m_safe * m_safe)
    mu = m + g1 / c
    sqrt_c = torch.sqrt(c)
    beta = (r - mu) * sqrt_c
    alpha = -mu * sqrt_c
    value = g + g1 * g1 / (2.0 * c) + 0.5 * math.log(2.0 * math.pi) - torch.log(sqrt_c) + _log_ndtr_diff(alpha, beta)
    return torch.where(empty, torch.full_like(value, -math.inf), value)


def lebesgue_log_contributions(log_radii: Tensor, log_direction_norms: Tensor, n: int) -> Tensor:
    r"""``log|S^{n-1}| - log n + n (log r_i - log ||v_i||)`` per direction (paper eq. 15).

    A zero radius (``log r = -inf``) contributes ``-inf``.
    """
    return log_sphere_area(n) - math.log(n) + n * (log_radii - log_direction_norms)


def gaussian_log_contributions(
    log_radii: Tensor,
    log_direction_norms: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    n: int,
    sum_log_prior_std: float,
    anchor_quadratic: float,
) -> Tensor:
    r"""Per-direction log prior probabilities under :math:`N(0, \mathrm{diag}(s^2))` (paper eq. 19).

    Args:
        log_radii: ``[k]`` ``log r_i``.
        log_direction_norms: ``[k]`` ``log ||v_i||``.
        a: ``[k]`` :math:`\sum_j \hat v_{ij}^2/s_j^2`.
        b: ``[k]`` :math:`\sum_j \theta_j \hat v_{ij}/s_j^2`.
        n: Dimension.
        sum_log_prior_std: :math:`\sum_j \log s_j`.
        anchor_quadratic: :math:`q = \sum_j \theta_j^2/s_j^2`.
    """
    const = log_sphere_area(n) - 0.5 * n * math.log(2.0 * math.pi) - sum_log_prior_std - 0.5 * anchor_quadratic
    return const + log_radial_gaussian_integral(a, b, n, torch.exp(log_radii)) - n * log_direction_norms
