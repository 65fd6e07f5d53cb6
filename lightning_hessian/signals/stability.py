r"""Edge-of-stability thresholds of SGD and Adam (Cohen et al. 2021, 2022).

On a quadratic with curvature :math:`\lambda`, gradient descent with step :math:`\eta` and
heavy-ball momentum :math:`\beta` is stable iff :math:`\lambda < (2 + 2\beta)/\eta` (``2/η``
without momentum; Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability", §2 and App. B). Full-batch training drives the sharpness
:math:`\lambda_\max(H)` up to that threshold and then hovers there (the edge of stability).

Adam with a frozen preconditioner :math:`P = \operatorname{diag}(\sqrt{\hat v}+\epsilon)` is
preconditioned heavy-ball on :math:`P^{-1}H` with an exponential moving average of the
gradients; it is stable iff :math:`\lambda_\max(P^{-1}H) < (2 + 2\beta_1)/((1 - \beta_1)\eta)`,
``38/η`` for :math:`\beta_1 = 0.9` (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of
Stability", §3, eq. 2). The *sharpness ratio* (sharpness / threshold) is the number to watch:
about 1 at the edge of stability.

**Several param groups or optimizers.** Each group has its own threshold (its learning rate and
momentum). :func:`stability_threshold` returns the *smallest* of them, the group that becomes
unstable first. It is exact when all groups share the learning rate and momentum (the usual
case). When learning rates differ it is conservative: with
:math:`\eta_\max` the largest rate, :math:`\lambda_\max(\operatorname{diag}(\eta) P^{-1} H) \le
\eta_\max \lambda_\max(P^{-1}H)`, so a ratio below 1 still guarantees stability of the linearised
dynamics, while a ratio near 1 may overstate how close the run is to the edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hessian.optim_state import ADAM_LIKE, param_groups

__all__ = ["StabilityThreshold", "adam_preconditioned_threshold", "sgd_sharpness_threshold", "stability_threshold"]


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"The learning rate must be positive and finite, got {lr}.")
    return lr


def sgd_sharpness_threshold(
    lr: float, momentum: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False
) -> float:
    r"""Largest stable curvature of (momentum) SGD on a quadratic.

    Heavy ball (PyTorch's ``SGD``, buffer :math:`b \leftarrow \beta b + (1-d) g`):
    :math:`(2 + 2\beta)/((1-d)\,\eta)`, i.e. :math:`2/\eta` without momentum. Nesterov
    (``nesterov=True``, :math:`d = 0`): :math:`(2 + 2\beta)/((1 + 2\beta)\,\eta)` (the root
    :math:`z=-1` of the iteration's characteristic polynomial
    :math:`z^2 - (1 + \beta - \eta\lambda(1+\beta))z + \beta(1 - \eta\lambda)`).
    """
    lr = _check_lr(lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
    if not 0 <= dampening < 1:
        raise ValueError(f"`dampening` must be in [0, 1), got {dampening}.")
    if nesterov:
        return (2.0 + 2.0 * momentum) / ((1.0 + 2.0 * momentum) * lr)
    return (2.0 + 2.0 * momentum) / ((1.0 - dampening) * lr)


def adam_preconditioned_threshold(lr: float, beta1: float) -> float:
    r"""Adam's preconditioned-sharpness threshold :math:`(2 + 2\beta_1)/((1 - \beta_1)\,\eta)`.

    ``38/η`` at :math:`\beta_1 = 0.9` (Cohen et al. 2022, §3).
    """
    lr = _check_lr(lr)
    if not 0 <= beta1 < 1:
        raise ValueError(f"`beta1` must be in [0, 1), got {beta1}.")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


@dataclass(frozen=True)
class StabilityThreshold:
    """The edge-of-stability threshold of a model's optimizers.

    Attributes:
        kind: ``"sgd"`` (compare with the sharpness :math:`\\lambda_\\max(H)`) or ``"adam"``
            (compare with the preconditioned sharpness :math:`\\lambda_\\max(P^{-1}H)`).
        value: The smallest group threshold (see the module docstring for several groups).
        lr: The learning rate of the group that sets ``value``.
        momentum: Its momentum (SGD) or :math:`\\beta_1` (Adam).
        group_values: Every owning group's threshold.
    """

    kind: Literal["sgd", "adam"]
    value: float
    lr: float
    momentum: float
    group_values: list[float] = field(default_factory=list)


def _family(optimizer: Any, group: dict[str, Any]) -> str:
    name = type(optimizer).__name__
    if name in ADAM_LIKE or "betas" in group:
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return name


def stability_threshold(
    params: Sequence[Tensor], optimizers: Any, names: Sequence[str] | None = None
) -> StabilityThreshold:
    """The threshold for ``params`` under their optimizers' current param groups.

    Reads each owning group's current ``lr`` (schedulers included) and ``momentum`` /
    ``dampening`` / ``nesterov`` (SGD) or ``betas`` (Adam family), and returns the smallest group
    threshold.

    Raises:
        ValueError: A parameter owned by no optimizer; an optimizer without a known threshold
            (only SGD and the Adam family have one); SGD and Adam groups mixed (their sharpness
            notions differ).
    """
    params = list(params)
    names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
    owners = param_groups(params, optimizers)
    orphans = [n for n, o in zip(names, owners, strict=True) if o is None]
    if orphans:
        raise ValueError(f"Parameters {orphans[:5]} are in no optimizer; the stability threshold is undefined.")
    seen: dict[int, tuple[str, float, float, float]] = {}
    for info in owners:
        assert info is not None
        key = id(info.group)
        if key in seen:
            continue
        family = _family(info.optimizer, info.group)
        group = info.group
        if family == "sgd":
            beta = float(group.get("momentum", 0.0))
            value = sgd_sharpness_threshold(
                info.lr, beta, dampening=float(group.get("dampening", 0.0)), nesterov=bool(group.get("nesterov", False))
            )
        elif family == "adam":
            beta = float(group["betas"][0])
            value = adam_preconditioned_threshold(info.lr, beta)
        else:
            raise ValueError(
                f"No edge-of-stability threshold is defined for {family} (only SGD and Adam-family optimizers)."
            )
        seen[key] = (family, value, info.lr, beta)
    families = {v[0] for v in seen.values()}
    if len(families) > 1:
        raise ValueError(
            "SGD and Adam-family optimizers own parameters of the same model; their thresholds apply to "
            "different sharpness notions. Restrict the analysis to one family."
        )
    family, value, lr, beta = min(seen.values(), key=lambda v: v[1])
    return StabilityThreshold(
        kind=family,  # type: ignore[arg-type]
        value=value,
        lr=lr,
        momentum=beta,
        group_values=[v[1] for v in seen.values()],
    )
