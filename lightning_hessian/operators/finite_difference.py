r"""Hessian-vector products by central differences of first-order gradients.

For a loss :math:`L` with gradient :math:`g = \nabla L` and a unit direction :math:`u`,

.. math::

    D_\varepsilon(u) = \frac{g(\theta + \varepsilon u) - g(\theta - \varepsilon u)}{2\varepsilon}
    = H u + \frac{\varepsilon^2}{6} \nabla^3 g(\theta)[u, u, u] + O(\varepsilon^4)

(Taylor expansion of :math:`g` around :math:`\theta`; the even terms cancel). A product costs
**two gradients** -- a forward and a first-order backward each, through whatever the model's
forward runs (fused attention kernels, activation checkpointing, compiled graphs, sharded
modules that gather parameters and reduce-scatter gradients): no ``create_graph``, no
forward-mode AD. The price is accuracy: in a dtype with unit roundoff :math:`\epsilon` the total
error is about

.. math::

    \underbrace{\tfrac{\varepsilon^2}{6} \|\nabla^3 g[u,u,u]\|}_{\text{truncation}}
    + \underbrace{\epsilon\, G / \varepsilon}_{\text{rounding of the two gradients}}
    + \underbrace{\epsilon \|\theta\| / \varepsilon \cdot \|H\|}_{\text{rounding of } \theta \pm \varepsilon u},

where :math:`G` is the magnitude of the terms the gradient sums. The sum is smallest at
:math:`\varepsilon \propto \epsilon^{1/3}` (error :math:`\propto \epsilon^{2/3}`: about
:math:`2 \cdot 10^{-5}` relative in float32, :math:`4 \cdot 10^{-11}` in float64, times model
constants; Nocedal & Wright, *Numerical Optimization*, 2nd ed., §8.1). The proportionality
constant is a length: how far along a unit direction the curvature changes. For networks whose
parameters are :math:`O(1)` per coordinate that length is :math:`O(1)`, so :func:`fd_step`
takes :math:`\varepsilon = c\,\epsilon^{1/3} \max(1, \mathrm{rms}(\theta))` with
:math:`\mathrm{rms}(\theta) = \|\theta\|/\sqrt{n}` (a parameter-set scaled up by a factor
scales its natural lengths too). Measured on the models of ``tests/test_finite_difference.py``
the optimum lies within a factor ~3 of it; the *measured* error estimate below says how far off
a particular model is, and ``fd_step=`` overrides the rule.

**Richardson extrapolation.** :math:`R_\varepsilon = (4 D_\varepsilon - D_{2\varepsilon}) / 3`
cancels the :math:`\varepsilon^2` term (error :math:`O(\varepsilon^4)`), at four gradients per
product instead of two (L. F. Richardson, "The deferred approach to the limit", Phil. Trans. R.
Soc. A 226, 1927).

**Error estimate.** One direction is also evaluated at step :math:`2\varepsilon` (two more
gradients central, four Richardson; once per operator): :math:`\|S_\varepsilon - S_{2\varepsilon}\| /
\|S_\varepsilon\|` (:math:`S` = the scheme in use) estimates the relative error of
:math:`S_\varepsilon` conservatively: its truncation part is :math:`(2^p - 1)` times
:math:`S_\varepsilon`'s (:math:`p = 2` central, 4 Richardson) and its rounding part at least
:math:`S_\varepsilon`'s, as the rounding errors of the two steps are independent.

The functions here work on any list of parameter tensors plus a closure returning the gradients
at the parameters' *current* values (the tensors are perturbed in place), so the same machinery
serves a whole model, a diagonal block, cast copies, or the local shards of a sharded model
(``DTensor.to_local()`` tensors with a closure returning the local gradient shards). Parameters
are restored bit for bit from a saved copy after every product (never by subtracting
:math:`\varepsilon u`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FD_STEP_FACTOR",
    "FDProducts",
    "central_difference_products",
    "check_fd_step",
    "fd_relative_error",
    "fd_step",
]

GradFn = Callable[[], tuple[Sequence[Tensor | None], Tensor]]
"""``grad_fn() -> (gradients, loss)``: the gradients (one per parameter tensor, ``None`` for an
unused one) and the scalar loss, at the parameters' current values."""

FD_STEP_FACTOR = 1.0
"""The constant :math:`c` of the default step :math:`c\\,\\epsilon^{1/3}\\max(1, \\mathrm{rms}(\\theta))`."""


def check_fd_step(step: float | None) -> float | None:
    """Validate a user's ``fd_step`` (``None``: the default rule). Raises ``ValueError``."""
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise ValueError(
            f"`fd_step` must be a finite number > 0 (the length of the parameter perturbation) or None "
            f"(the default eps^(1/3) rule), got {step!r}."
        )
    return float(step)


def fd_step(param_sq_norm: float, num_params: int, dtype: torch.dtype, factor: float = FD_STEP_FACTOR) -> float:
    r"""The default perturbation length :math:`\varepsilon = c\,\epsilon^{1/3} \max(1, \|\theta\|/\sqrt{n})`.

    The parameters move by :math:`\pm\varepsilon u` along the *unit* direction :math:`u = v / \|v\|`
    (the product of ``v`` is ``‖v‖`` times that of ``u``), so the step does not depend on the
    vectors' scale. See the module docstring for the error balance behind the rule.

    Args:
        param_sq_norm: :math:`\|\theta\|^2` over all trainable parameters (a global sum for
            sharded parameters).
        num_params: :math:`n`, the number of trainable parameters (global).
        dtype: The dtype the gradients are computed in (its machine epsilon :math:`\epsilon`).
        factor: The constant :math:`c`.
    """
    if num_params <= 0:
        raise ValueError(f"`num_params` must be positive, got {num_params}.")
    eps = float(torch.finfo(dtype).eps)
    rms = math.sqrt(max(param_sq_norm, 0.0) / num_params)
    return factor * eps ** (1.0 / 3.0) * max(1.0, rms)


@dataclass
class FDProducts:
    """Result of :func:`central_difference_products` on one batch.

    Attributes:
        products: One float64 tensor per parameter, shaped ``[k, *param.shape]`` (``k``
            directions).
        loss: Mean of the loss at :math:`\\theta \\pm \\varepsilon u` over the evaluations
            (:math:`L(\\theta) + O(\\varepsilon^2)`).
        num_gradients: Gradient evaluations spent.
    """

    products: list[Tensor]
    loss: Tensor
    num_gradients: int


def _write(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    # ``.data``: the write is invisible to autograd (no version-counter bump), so a graph the
    # caller holds over the parameters stays usable once the values are restored.
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.data.copy_(value)


def _difference(
    params: Sequence[Tensor],
    saved: Sequence[Tensor],
    saved64: list[Tensor],
    direction64: list[Tensor],
    step: float,
    grad_fn: GradFn,
) -> tuple[list[Tensor], Tensor]:
    """``(g(θ + step·u) - g(θ - step·u)) / (2 step)`` in float64, and the two losses' sum."""
    grads_pm: list[list[Tensor]] = []
    loss_sum = torch.zeros((), dtype=torch.float64)
    for sign in (1.0, -1.0):
        # one rounding: θ ± step·u formed in float64, rounded once (by copy_) to the parameters' dtype
        _write(params, torch._foreach_add(saved64, direction64, alpha=sign * step))
        grads, loss = grad_fn()
        grads_pm.append(
            [
                g.double() if g is not None else torch.zeros(p.shape, dtype=torch.float64, device=p.device)
                for g, p in zip(grads, params, strict=True)
            ]
        )
        loss_sum = loss_sum.to(loss.device) + loss.detach().double().reshape(())
    _write(params, saved)
    out = list(torch._foreach_sub(grads_pm[0], grads_pm[1]))
    torch._foreach_mul_(out, 1.0 / (2.0 * step))
    return out, loss_sum


def central_difference_products(
    params: Sequence[Tensor],
    tangents: Sequence[Tensor],
    grad_fn: GradFn,
    step: float,
    *,
    richardson: bool = False,
) -> FDProducts:
    r"""Products :math:`H u_j` by central differences of ``grad_fn``, for unit directions :math:`u_j`.

    The tensors in ``params`` are perturbed in place to :math:`\theta \pm \varepsilon u_j` (formed in
    float64, rounded once to their dtype), ``grad_fn`` is called at each point, and the tensors
    are restored bit for bit from a saved copy after every difference and on any exception. The
    error estimate is the same call at ``2 * step`` on one direction, compared by
    :func:`fd_relative_error`.

    Args:
        params: The tensors to perturb (parameters, cast copies, or local shards).
        tangents: One tensor per parameter, shaped ``[k, *param.shape]``: the ``k`` directions,
            each of unit norm over all parameters (globally, for shards); ``step`` is then the
            displacement's length.
        grad_fn: ``() -> (gradients, loss)`` at the current values of ``params`` (first-order:
            ``torch.autograd.grad(loss, params)`` or a sharded module's backward).
        step: The perturbation length :math:`\varepsilon` (:func:`fd_step`).
        richardson: Richardson-extrapolated products :math:`(4 D_\varepsilon - D_{2\varepsilon})/3`
            (4 gradients per direction instead of 2).

    Returns:
        :class:`FDProducts`. The products are float64; a batch-weighted sum of them is the
        product of the data set's mean loss.
    """
    k = int(tangents[0].shape[0])
    saved = [p.detach().clone() for p in params]
    saved64 = [s.double() for s in saved]
    out = [torch.zeros((k, *p.shape), dtype=torch.float64, device=p.device) for p in params]
    loss_sum: Tensor | None = None
    spent = 0
    try:
        for j in range(k):
            direction = [t[j].double() for t in tangents]
            product, loss = _difference(params, saved, saved64, direction, step, grad_fn)
            spent += 2
            if richardson:
                coarse, loss_coarse = _difference(params, saved, saved64, direction, 2.0 * step, grad_fn)
                product = [(4.0 * f - c) / 3.0 for f, c in zip(product, coarse, strict=True)]
                loss, spent = loss + loss_coarse, spent + 2
            for o, h in zip(out, product, strict=True):
                o[j] = h
            loss_sum = loss if loss_sum is None else loss_sum + loss
    finally:
        _write(params, saved)
    if loss_sum is None:  # no direction
        loss_sum = torch.zeros((), dtype=torch.float64)
    return FDProducts(out, loss_sum / max(spent, 1), spent)


def fd_relative_error(product: Tensor, coarse: Tensor) -> float:
    r"""The error estimate :math:`\|S_\varepsilon - S_{2\varepsilon}\| / \|S_\varepsilon\|` (flat vectors).

    For sharded vectors pass the global norms' ratio instead (local partial sums, all-reduced).
    Returns ``0.0`` when both are zero and ``inf`` when only the product is.
    """
    num = float((product.double() - coarse.double()).norm())
    den = float(product.double().norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


class FiniteDifferenceState:
    """What a model-backed operator keeps for its finite-difference products.

    Args:
        step: The perturbation length :math:`\\varepsilon` (``None``: :func:`fd_step` at the first
            product, from the parameters then).
        richardson: Richardson-extrapolated products (4 gradients per vector instead of 2).

    Attributes:
        step: The length in use (``None`` before the first product without an override).
        error_estimate: :func:`fd_relative_error` of the first product's first nonzero vector
            (NaN before).
        num_gradients: Gradient evaluations so far (over all micro-batches).
    """

    def __init__(self, step: float | None = None, richardson: bool = False) -> None:
        self.override = check_fd_step(step)
        self.step: float | None = self.override
        self.richardson = bool(richardson)
        self.error_estimate = math.nan
        self.num_gradients = 0
        self.checking = False  # the current product's last column is the 2ε check of an earlier one
        self.use_backward = False  # gradients by loss.backward() (reentrant checkpointing), not autograd.grad

    def resolve_step(self, params: Sequence[Tensor], dtype: torch.dtype) -> float:
        """The step: the override, else the rule on the parameters' current values (once)."""
        if self.step is None:
            sq = sum(float(p.detach().double().pow(2).sum()) for p in params)
            self.step = fd_step(sq, sum(p.numel() for p in params), dtype)
        return self.step

    @property
    def gradients_per_product(self) -> int:
        """Gradient evaluations per vector and micro-batch: 2 (central) or 4 (Richardson)."""
        return 4 if self.richardson else 2


def unit_columns(tangents: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Directions ``[k, *shape]`` per parameter scaled to unit norm per column; and the norms (float64).

    Zero columns stay zero (their products are exactly zero after scaling back).
    """
    k = int(tangents[0].shape[0])
    sq = torch.zeros(k, dtype=torch.float64, device=tangents[0].device)
    for t in tangents:
        sq += t.reshape(k, -1).double().pow(2).sum(dim=1).to(sq.device)
    norms = sq.sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    units = [(t.double() * inv.to(t.device).view(k, *([1] * (t.ndim - 1)))).to(t.dtype) for t in tangents]
    return units, norms
