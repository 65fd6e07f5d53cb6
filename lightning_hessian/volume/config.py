"""Validated arguments of :func:`~lightning_hessian.volume.local_volume` (first step of the pipeline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lightning_hessian.volume.cost import CostFn, default_output_fn
from lightning_hessian.volume.preconditioner import PRECONDITIONER_NAMES

__all__ = [
    "CostFn",
    "CostName",
    "Measure",
    "PreconditionerName",
    "PriorStd",
    "VolumeConfig",
    "check_positive_float",
    "validate",
]

CostName = Literal["kl", "gaussian", "loss"]
PreconditionerName = Literal["adam", "adam_exp_avg", "hessian_diag", "hessian_diag_hutchinson"]
Measure = Literal["gaussian", "lebesgue"]
PriorStd = float | Mapping[str, float | Tensor]


def check_positive_float(value: Any, name: str, hint: str) -> float:
    """``float(value)`` if it is a positive finite real number, else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}. {hint}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be positive and finite, got {value}. {hint}")
    return value


def _check_int(value: Any, name: str, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.{(' ' + hint) if hint else ''}")
    return value


@dataclass
class VolumeConfig:
    """Everything :func:`local_volume` needs besides the model and data, checked."""

    data: Any
    cost: str | CostFn
    output_fn: Callable[[nn.Module, Any], Tensor]
    batch_loss: Callable[[nn.Module, Any], Tensor] | None
    cutoff: float
    num_directions: int
    preconditioner: Any
    preconditioner_eps: float | str | None
    exponent: float
    probes: int
    measure: str
    rel_tol: float
    max_radius: float | None
    initial_radius: float | None
    directions_per_batch: int | None
    root_finder: str
    max_evaluations: int


def _check_preconditioner(preconditioner: Any, optimizer: Any, eps: Any) -> None:
    if preconditioner is not None and not isinstance(preconditioner, (str, Tensor, Mapping)):
        raise ValueError(
            f"Unknown `preconditioner` {preconditioner!r}: use None, 'adam', 'adam_exp_avg', "
            "'hessian_diag', 'hessian_diag_hutchinson', or a positive tensor."
        )
    if isinstance(preconditioner, str) and preconditioner not in (*PRECONDITIONER_NAMES, "none"):
        raise ValueError(
            f"Unknown `preconditioner` {preconditioner!r}: use None, 'adam', 'adam_exp_avg', "
            "'hessian_diag', 'hessian_diag_hutchinson', or a positive tensor of num_params entries."
        )
    if isinstance(preconditioner, str) and preconditioner in ("adam", "adam_exp_avg") and optimizer is None:
        raise ValueError(
            f"preconditioner={preconditioner!r} needs the optimizer: pass `optimizer=` (an Adam-type "
            "optimizer that has taken at least one step, or the list of the model's optimizers), or "
            "use preconditioner=None or 'hessian_diag'."
        )
    if eps is None or eps == "auto":
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"`preconditioner_eps` must be a float, 'auto' or None, got {eps!r}.")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"`preconditioner_eps` must be >= 0 and finite (a fraction of the median scale), got {eps}.")


def validate(
    model: Any,
    data: Any,
    *,
    cost: Any,
    loss_fn: Any,
    batch_loss: Any,
    output_fn: Any,
    cutoff: Any,
    num_directions: Any,
    preconditioner: Any,
    optimizer: Any,
    preconditioner_eps: Any,
    preconditioner_exponent: Any,
    preconditioner_probes: Any,
    measure: Any,
    rel_tol: Any,
    max_radius: Any,
    initial_radius: Any,
    directions_per_batch: Any,
    root_finder: Any,
    max_evaluations: Any,
) -> VolumeConfig:
    """Check every argument, with messages naming the argument and the fix.

    Raises:
        TypeError: Wrong argument types.
        ValueError: Out-of-range values, unknown names, missing companions (``"adam"`` without
            ``optimizer``, ``cost="loss"`` without a loss).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if data is None:
        raise ValueError("`data` is required: a list of batches or a DataLoader over the analysis set.")
    if isinstance(data, Iterator):
        data = list(data)
    cutoff = check_positive_float(cutoff, "cutoff", "It is the cost level in nats, e.g. cutoff=1e-2.")
    if isinstance(num_directions, bool) or not isinstance(num_directions, int):
        raise TypeError(f"`num_directions` must be an int, got {type(num_directions).__name__}.")
    if num_directions < 1:
        raise ValueError(f"`num_directions` must be >= 1, got {num_directions}; the paper uses 100.")
    if not (isinstance(cost, str) and cost in ("kl", "gaussian", "loss")) and not callable(cost):
        raise ValueError(
            f"Unknown `cost` {cost!r}: use 'kl', 'gaussian', 'loss' or a callable cost(outputs, anchor_outputs, batch)."
        )
    if measure not in ("gaussian", "lebesgue"):
        raise ValueError(f"`measure` must be 'gaussian' or 'lebesgue', got {measure!r}.")
    if root_finder not in ("secant", "bisection"):
        raise ValueError(f"`root_finder` must be 'secant' or 'bisection', got {root_finder!r}.")
    rel_tol = check_positive_float(rel_tol, "rel_tol", "E.g. rel_tol=1e-4.")
    if rel_tol >= 0.5:
        raise ValueError(f"`rel_tol` must be < 0.5, got {rel_tol}.")
    exponent = check_positive_float(preconditioner_exponent, "preconditioner_exponent", "The default is 0.5.")
    _check_int(preconditioner_probes, "preconditioner_probes", 1)
    _check_int(max_evaluations, "max_evaluations", 2)
    if directions_per_batch is not None:
        _check_int(directions_per_batch, "directions_per_batch", 1, "Or None.")
    if max_radius is not None:
        check_positive_float(max_radius, "max_radius", "")
    if initial_radius is not None:
        check_positive_float(initial_radius, "initial_radius", "")
    _check_preconditioner(preconditioner, optimizer, preconditioner_eps)
    if cost == "loss" and (loss_fn is None) == (batch_loss is None):
        raise TypeError("cost='loss' needs exactly one of `loss_fn` (for (inputs, targets) batches) and `batch_loss`.")
    out_fn = output_fn if output_fn is not None else default_output_fn
    loss_of_batch = batch_loss
    if cost == "loss" and batch_loss is None:
        user_loss_fn = loss_fn

        def loss_of_batch(model: nn.Module, batch: Any) -> Tensor:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError("With `loss_fn`, batches must be (inputs, targets); pass `batch_loss` instead.")
            return user_loss_fn(out_fn(model, batch), batch[1])

    if isinstance(preconditioner, str) and preconditioner == "none":
        preconditioner = None
    return VolumeConfig(
        data=data,
        cost=cost,
        output_fn=out_fn,
        batch_loss=loss_of_batch,
        cutoff=cutoff,
        num_directions=num_directions,
        preconditioner=preconditioner,
        preconditioner_eps=preconditioner_eps,
        exponent=exponent,
        probes=preconditioner_probes,
        measure=measure,
        rel_tol=rel_tol,
        max_radius=None if max_radius is None else float(max_radius),
        initial_radius=None if initial_radius is None else float(initial_radius),
        directions_per_batch=directions_per_batch,
        root_finder=root_finder,
        max_evaluations=max_evaluations,
    )
