r"""Diagonal preconditioners :math:`P` for the local-volume estimator (METHODS.md §4).

Every named preconditioner is built from a per-coordinate *scale* :math:`s_j = |d_j|^{e}`
(``e = preconditioner_exponent``, default ½) and a scale-free :math:`\varepsilon`:

.. math::
    p_j \propto \frac{1}{s_j + \varepsilon_j},\qquad
    \varepsilon_j = \max(\rho\cdot\operatorname{median}_{s_i > 0} s_i,\ \varepsilon^{\text{floor}}_j),
    \qquad \textstyle\sum_j \log p_j = 0,

so multiplying :math:`d` by any constant (the same weights reached with the loss scaled ×10 have
Adam's :math:`\hat v` ×100) leaves :math:`P` unchanged. ``ρ`` is ``preconditioner_eps``.

- ``"adam"``: :math:`d = \hat v`, the bias-corrected second moment
  ``exp_avg_sq / (1 - beta2**t)`` of every optimizer that holds the parameter, with that
  optimizer's own step count ``t`` (:func:`~lightning_hessian.optim_state.adam_state`); the floor
  is the owning group's Adam ``eps``. Parameters owned by a non-Adam optimizer (SGD for the head,
  Adam for the body) get the median scale of the Adam ones, with a warning. A parameter owned by
  no optimizer given, or by an Adam-type optimizer that has no state for it (it never received a
  gradient), is an error naming it.
- ``"adam_exp_avg"``: :math:`d = |\hat m|`, ``exp_avg / (1 - beta1**t)``, same rules.
- ``"hessian_diag"``: :math:`d` = the exact Gauss-Newton (Fisher) diagonal of the cost at the
  anchor (:mod:`~lightning_hessian.volume.ggn_diagonal`), deterministic.
- ``"hessian_diag_hutchinson"``: Hutchinson's estimate of diag(H) with ``preconditioner_probes``
  Rademacher probes (explicit opt-in: on the digits MLP with 32 probes its median relative error
  against the exact diagonal is 280 % and 29 % of its entries are negative before ``abs()``; its
  estimates trail the exact diagonal's by 60–170 nats there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.operators import HessianOperator
from lightning_hessian.operators.space import space_of
from lightning_hessian.optim_state import (
    ADAM_LIKE,
    ParamGroupInfo,
    adam_state,
    param_groups,
    unwrap_optimizer,
)
from lightning_hessian.volume.cost import CostEvaluator
from lightning_hessian.volume.ggn_diagonal import ggn_diagonal
from lightning_hessian.volume.prior import flat_from_mapping

__all__ = [
    "DEFAULT_RELATIVE_EPS",
    "EPS_GRID",
    "PRECONDITIONER_NAMES",
    "MissingOptimizerStateError",
    "PreconditionerScale",
    "holds_adam_moment",
    "log_preconditioner",
    "preconditioner_scale",
]

PRECONDITIONER_NAMES = ("adam", "adam_exp_avg", "hessian_diag", "hessian_diag_hutchinson")
#: Default ρ: ε as a fraction of the median scale. Chosen on the digits MLP (64-64-10, 4,810
#: parameters, ``tests/test_volume.py``), where it is the value that beats the naive estimator
#: under both priors: with N(0, 1), ρ = 0.3 is best (+2,470 nats over naive) and ρ = 3 gives
#: +750; with the initialisation prior (s ≈ 0.07) every ρ ≤ 1.5 *loses* to naive (ρ = 0.01 by
#: 11,000 nats: stretching flat coordinates far beyond the prior's scale wastes the directions)
#: and ρ = 3 gives +150. The stretch of any coordinate is then at most (1 + ρ)/ρ = 1.33 relative
#: to the median one. ``preconditioner_eps="auto"`` finds the better ρ per problem.
DEFAULT_RELATIVE_EPS = {"adam": 3.0, "adam_exp_avg": 3.0, "hessian_diag": 3.0, "hessian_diag_hutchinson": 3.0}
#: ``preconditioner_eps="auto"`` tries these ρ with shared directions and keeps the best.
EPS_GRID = (0.1, 0.3, 1.0, 3.0)


class MissingOptimizerStateError(ValueError):
    """A trainable parameter has no optimizer state to precondition with (a configuration error)."""


@dataclass
class PreconditionerScale:
    """The per-coordinate scale ``s = |d|^e`` a named preconditioner is built from.

    Attributes:
        kind: The preconditioner's name.
        scale: float64 ``[n]``, ``>= 0``.
        floor: float64 ``[n]`` lower bound on ε (Adam's own ``eps``), or ``None``.
        hvps: Hessian-vector products spent (Hutchinson).
        passes: Per-example backward passes spent (exact GGN diagonal).
    """

    kind: str
    scale: Tensor
    floor: Tensor | None = None
    hvps: int = 0
    passes: int = 0

    @property
    def reference(self) -> float:
        """The median of the positive entries of ``scale`` (ε is a multiple of it)."""
        positive = self.scale[self.scale > 0]
        return float(positive.median()) if positive.numel() else 0.0


def _optimizer_list(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return [unwrap_optimizer(o) for o in optimizer]
    return [unwrap_optimizer(optimizer)]


def _moment(kind: str, state: Any, index: int, entry: dict[str, Any]) -> Tensor | None:
    """Parameter ``index``'s bias-corrected ``exp_avg_sq`` (``"adam"``) or ``|exp_avg|``, or None."""
    if kind == "adam":
        return state.second_moments[index]
    raw = entry.get("exp_avg")
    if not isinstance(raw, Tensor):
        return None
    moment = raw.detach().to(torch.float64).abs()
    steps, beta1 = state.steps[index], state.beta1[index]
    if steps > 0 and math.isfinite(beta1):
        moment = moment / (1.0 - beta1**steps)
    return moment


def holds_adam_moment(info: ParamGroupInfo, kind: str) -> bool:
    """Whether the optimizer/group owning a parameter keeps the moment ``kind`` reads.

    Adam-type classes (:data:`~lightning_hessian.optim_state.ADAM_LIKE`) or any group with
    ``betas``; Adamax keeps an infinity norm (``exp_inf``), not ``exp_avg_sq``.
    """
    cls = type(info.optimizer).__name__
    return (cls in ADAM_LIKE or "betas" in info.group) and not (kind == "adam" and cls == "Adamax")


def _check_owned(kind: str, names: list[str], owners: list[Any]) -> None:
    unowned = [name for name, info in zip(names, owners, strict=False) if info is None]
    if unowned:
        raise MissingOptimizerStateError(
            f"preconditioner={kind!r}: trainable parameter(s) {unowned[:5]}{' ...' if len(unowned) > 5 else ''} "
            "belong to none of the optimizers given; pass every optimizer of the model (a list), or "
            "freeze those parameters (requires_grad=False)."
        )


def _adam_moment_scale(
    kind: str, optimizer: Any, names: list[str], params: list[Tensor], exponent: float
) -> PreconditionerScale:
    """Bias-corrected Adam moments of every optimizer, per parameter, as ``|d|^e`` with a floor."""
    optimizers = _optimizer_list(optimizer)
    if not optimizers:
        raise ValueError(
            f"preconditioner={kind!r} needs the optimizer(s): pass `optimizer=` (an Adam-type optimizer, "
            "or a list of the model's optimizers, that has taken at least one step), or use "
            "preconditioner=None or 'hessian_diag'."
        )
    owners = param_groups(params, optimizers)
    _check_owned(kind, names, owners)
    state = adam_state(params, optimizers, names, bias_corrected=True)
    blocks: list[Tensor | None] = []
    floors: list[float] = []
    missing: list[str] = []
    for i, (name, p, info) in enumerate(zip(names, params, owners, strict=False)):
        assert info is not None  # _check_owned
        is_adam = holds_adam_moment(info, kind)
        moment = _moment(kind, state, i, info.optimizer.state.get(p, {})) if is_adam else None
        if is_adam and moment is None:
            missing.append(name)
        blocks.append(
            None if moment is None else moment.to(device=p.device, dtype=torch.float64).abs().pow(exponent).reshape(-1)
        )
        floors.append(state.eps[i] if moment is not None and math.isfinite(state.eps[i]) else 0.0)
    if missing:
        key = "exp_avg_sq" if kind == "adam" else "exp_avg"
        raise MissingOptimizerStateError(
            f"preconditioner={kind!r}: no Adam `{key}` for trainable parameter(s) "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}: an Adam-type optimizer creates its state "
            "lazily, so it must have taken at least one step that updated them (no step yet, or they "
            "never receive a gradient). Freeze parameters that never get a gradient "
            "(requires_grad=False), or use preconditioner=None / 'hessian_diag'."
        )
    present = [b for b in blocks if b is not None]
    if not present:
        raise ValueError(
            f"preconditioner={kind!r} reads Adam's `{'exp_avg_sq' if kind == 'adam' else 'exp_avg'}`, but none of "
            f"the optimizers given ({', '.join(sorted({type(o).__name__ for o in optimizers}))}) keeps one; "
            "use an Adam-type optimizer, or preconditioner=None / 'hessian_diag'."
        )
    all_adam = torch.cat(present)
    positive = all_adam[all_adam > 0]
    median = float(positive.median()) if positive.numel() else 0.0
    others = [name for name, b in zip(names, blocks, strict=False) if b is None]
    if others:
        warnings.warn(
            f"preconditioner={kind!r}: parameter(s) {others[:5]}{' ...' if len(others) > 5 else ''} are optimized "
            "by a non-Adam optimizer; they get the median scale of the Adam-preconditioned ones "
            "(p_j = 1/(median + eps)).",
            UserWarning,
            stacklevel=4,
        )
    scale = torch.cat(
        [
            b if b is not None else torch.full((p.numel(),), median, dtype=torch.float64, device=p.device)
            for b, p in zip(blocks, params, strict=False)
        ]
    )
    floor = torch.cat(
        [
            torch.full((p.numel(),), f, dtype=torch.float64, device=p.device)
            for f, p in zip(floors, params, strict=False)
        ]
    )
    return PreconditionerScale(kind, scale, floor)


def _hutchinson_diagonal(
    evaluator: CostEvaluator, probes: int, generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """diag(H) of the cost at the anchor, ``mean_k z_k * (H z_k)`` with Rademacher ``z_k``."""
    items = [(i, None) for i in range(len(evaluator.batches))]
    weights = [entry.weight for entry in evaluator.batches]
    op = HessianOperator(
        evaluator.model,
        data=items,
        batch_loss=evaluator.batch_mean_cost,
        batch_size_fn=lambda item: weights[item[0]],
        device=evaluator.device,
        all_reduce=all_reduce,
        max_batched_vectors=8,
    )
    z = space_of(op).probes(
        op.num_params, probes, "rademacher", generator, device=evaluator.device, dtype=evaluator.dtype
    )
    hz = op.matmat(z).to(torch.float64)
    return (z.to(torch.float64) * hz).mean(dim=1)


def preconditioner_scale(
    kind: str,
    *,
    optimizer: Any,
    exponent: float,
    probes: int,
    names: list[str],
    params: list[Tensor],
    evaluator: CostEvaluator,
    generator: torch.Generator,
    all_reduce: Callable[[Tensor], Tensor] | None,
) -> PreconditionerScale:
    """The scale ``|d|^e`` of the named preconditioner ``kind`` (see the module docstring)."""
    if kind in ("adam", "adam_exp_avg"):
        return _adam_moment_scale(kind, optimizer, names, params, exponent)
    if kind == "hessian_diag":
        diag, passes = ggn_diagonal(evaluator, all_reduce=all_reduce)
        return PreconditionerScale(kind, diag.abs().pow(exponent), None, passes=passes)
    if kind == "hessian_diag_hutchinson":
        diag = _hutchinson_diagonal(evaluator, probes, generator, all_reduce)
        return PreconditionerScale(kind, diag.abs().pow(exponent), None, hvps=probes)
    raise ValueError(f"Unknown preconditioner {kind!r}; use one of {PRECONDITIONER_NAMES}, None or a tensor.")


def log_preconditioner(scale: PreconditionerScale, relative_eps: float) -> tuple[Tensor, float]:
    r"""``log p`` (float64 ``[n]``, summing to zero) for ``p_j ∝ 1/(s_j + ε_j)``, and the ε used.

    ``ε = max(relative_eps * median_{s>0}(s), floor)``; ``relative_eps = 0`` leaves only the
    floor (Adam's own ε), which is invalid where ``s_j = 0`` without one.

    Raises:
        ValueError: Zero or non-finite ``s_j + ε_j`` (e.g. an all-zero diagonal and ε = 0).
    """
    eps_value = relative_eps * scale.reference
    eps = torch.full_like(scale.scale, eps_value)
    if scale.floor is not None:
        eps = torch.maximum(eps, scale.floor)
    denom = scale.scale + eps
    if not (torch.isfinite(denom).all() and (denom > 0).all()):
        raise ValueError(
            f"The {scale.kind!r} preconditioner has zero or non-finite entries (|d|^e + eps, with "
            f"eps = {eps_value:.3g}); use `preconditioner_eps` > 0 (a fraction of the median |d|^e)."
        )
    log_p = -torch.log(denom)
    return log_p - log_p.mean(), eps_value


def tensor_log_preconditioner(
    preconditioner: Tensor | Mapping[str, Any], names: list[str], params: list[Tensor]
) -> Tensor:
    """``log p`` normalised to sum zero from a user-given positive diagonal (flat tensor or mapping)."""
    n = sum(p.numel() for p in params)
    if isinstance(preconditioner, Tensor):
        diag = preconditioner.detach().to(device=params[0].device, dtype=torch.float64).reshape(-1)
        if diag.numel() != n:
            raise ValueError(
                f"A tensor `preconditioner` must have num_params={n} entries (flat, in "
                f"model.named_parameters() order), got {diag.numel()}."
            )
    else:
        diag = flat_from_mapping(preconditioner, names, params, "preconditioner")
    if not (torch.isfinite(diag).all() and (diag > 0).all()):
        raise ValueError("A tensor `preconditioner` must be finite and strictly positive (it is P's diagonal).")
    log_p = torch.log(diag)
    return log_p - log_p.mean()


def relative_eps_grid(preconditioner_eps: float | str | None, kind: str) -> Sequence[float]:
    """The ρ values to try: the one given, the default, or :data:`EPS_GRID` for ``"auto"``."""
    if preconditioner_eps == "auto":
        return EPS_GRID
    if preconditioner_eps is None:
        return (DEFAULT_RELATIVE_EPS[kind],)
    return (float(preconditioner_eps),)
