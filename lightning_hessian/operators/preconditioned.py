r"""Optimizer-preconditioned curvature: :math:`P^{-1/2} H P^{-1/2}` with Adam's preconditioner.

Adam's update is :math:`\theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`,
i.e. preconditioned gradient descent with :math:`P = \operatorname{diag}(\sqrt{\hat v} + \epsilon)`.
Its stability is governed by the *preconditioned sharpness* :math:`\lambda_\max(P^{-1} H)` (Cohen
et al. 2022, "Adaptive Gradient Methods at the Edge of Stability", §3), which equals
:math:`\lambda_\max(P^{-1/2} H P^{-1/2})`: the two matrices are similar, and the latter is
symmetric, so every estimator (Lanczos, SLQ, Hutchinson) applies to it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_hessian.operators.base import (
    CurvatureOperator,
    WrappedOperator,
    _check_matrix,
    _matvec_via_matmat,
)
from lightning_hessian.optim_state import adam_state

__all__ = ["PreconditionedOperator", "adam_preconditioner", "preconditioned_operator"]


class PreconditionedOperator(WrappedOperator):
    r""":math:`D H D` for a positive diagonal :math:`D` (here :math:`D = P^{-1/2}`), as a curvature operator.

    Args:
        op: The curvature operator :math:`H` (Hessian, GGN, a block of either, ...).
        inverse_sqrt_diagonal: :math:`D`'s diagonal, ``[op.num_params]``, positive.

    ``matmat(V)`` is ``D * op.matmat(D * V)``: one product of ``op`` per column, counted by
    :attr:`num_hvps` (which reads ``op``'s counter).
    """

    def __init__(self, op: CurvatureOperator, inverse_sqrt_diagonal: Tensor) -> None:
        if inverse_sqrt_diagonal.ndim != 1 or inverse_sqrt_diagonal.shape[0] != op.num_params:
            raise ValueError(
                f"The diagonal must have {op.num_params} entries (num_params), got shape "
                f"{tuple(inverse_sqrt_diagonal.shape)}."
            )
        if not bool(torch.isfinite(inverse_sqrt_diagonal).all()) or not bool((inverse_sqrt_diagonal > 0).all()):
            raise ValueError("The preconditioner's diagonal must be positive and finite.")
        self.op = op
        self.diagonal = inverse_sqrt_diagonal.to(device=op.device, dtype=torch.float64)

    def matmat(self, matrix: Tensor) -> Tensor:
        """Products ``D H D V`` for ``V`` of shape ``[num_params, k]``."""
        _check_matrix(matrix, self.num_params)
        d = self.diagonal.unsqueeze(1)
        scaled = (matrix.to(device=self.device, dtype=torch.float64) * d).to(matrix.dtype)
        return (self.op.matmat(scaled).to(torch.float64) * d).to(matrix.dtype)

    def matvec(self, vector: Tensor) -> Tensor:
        """Product ``D H D v`` for a flat vector."""
        return _matvec_via_matmat(self, vector)

    def parameters(self) -> list[Tensor]:
        """The parameters of the wrapped operator (if it exposes them)."""
        return self.op.parameters()  # type: ignore[attr-defined]

    def parameter_names(self) -> list[str]:
        """The parameter names of the wrapped operator (if it exposes them)."""
        return self.op.parameter_names()  # type: ignore[attr-defined]


def adam_preconditioner(params: list[Tensor], optimizers: Any, names: list[str] | None = None) -> Tensor:
    r"""Adam's flat preconditioner :math:`\sqrt{\hat v} + \epsilon` for ``params`` (float64).

    :math:`\hat v = v / (1 - \beta_2^t)` is the bias-corrected ``exp_avg_sq`` with each
    parameter's own step count :math:`t`, and :math:`\epsilon` the owning param group's ``eps``
    (Adam, AdamW, NAdam, RAdam; any number of param groups and optimizers, read through
    :func:`~lightning_hessian.optim_state.adam_state`).

    Raises:
        ValueError: Some parameter has no Adam second moment (owned by a non-Adam optimizer, by
            none, or before the optimizer's first step); the message names them.
    """
    state = adam_state(params, optimizers, names)
    if not state.complete:
        missing = state.missing
        owners = sorted({state.optimizer_names[state.names.index(n)] or "no optimizer" for n in missing})
        raise ValueError(
            f"No Adam second moments (exp_avg_sq) for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(owned by: {', '.join(owners)}). The preconditioned operator needs every parameter under an "
            "Adam-family optimizer that has taken at least one step."
        )
    moments = state.flat(torch.float64)
    eps = torch.cat([torch.full((p.numel(),), e, dtype=torch.float64) for p, e in zip(params, state.eps, strict=True)])
    return moments.clamp_min(0).sqrt() + eps.to(moments.device)


def preconditioned_operator(op: Any, optimizers: Any) -> PreconditionedOperator:
    r"""The symmetric preconditioned curvature :math:`P^{-1/2} H P^{-1/2}` with Adam's :math:`P`.

    :math:`P = \operatorname{diag}(\sqrt{\hat v} + \epsilon)`.

    Its eigenvalues are those of :math:`P^{-1} H`; its largest is Cohen et al.'s (2022)
    preconditioned sharpness, which under Adam with :math:`\beta_1` and learning rate
    :math:`\eta` equilibrates near :math:`(2 + 2\beta_1)/((1-\beta_1)\eta)` (see
    :func:`~lightning_hessian.signals.stability.adam_preconditioned_threshold`).

    Args:
        op: A curvature operator exposing ``parameters()`` and ``parameter_names()``
            (:class:`~lightning_hessian.HessianOperator`, :class:`~lightning_hessian.GGNOperator`,
            or a block of either).
        optimizers: One optimizer or a sequence (``trainer.optimizers``; Lightning wrappers are
            unwrapped). Each parameter's state is read from the optimizer that owns it.

    Returns:
        A :class:`PreconditionedOperator`; the preconditioner is a snapshot of the optimizer
        state at this call (nothing in any optimizer is modified).

    Raises:
        ValueError: A parameter without Adam state (see :func:`adam_preconditioner`).
    """
    if not hasattr(op, "parameters") or not hasattr(op, "parameter_names"):
        raise TypeError(
            "`op` must expose parameters() and parameter_names() (HessianOperator, GGNOperator or a block) "
            "so that each parameter's optimizer state can be found."
        )
    diagonal = adam_preconditioner(list(op.parameters()), optimizers, list(op.parameter_names()))
    return PreconditionedOperator(op, diagonal.rsqrt())
