"""Read-only views of optimizer state, parameter by parameter, across every optimizer of a model.

Several consumers need what the optimizers know about each parameter: the local volume's Adam
preconditioner (bias-corrected second moments), the preconditioned-sharpness operator
``P = diag(sqrt(v_hat) + eps)`` (Cohen et al. 2022) and the edge-of-stability thresholds (learning
rate, momentum, Adam's betas). One model may have several optimizers (manual optimization with a
body and a head optimizer) and one optimizer several param groups; this module maps every
trainable parameter to the optimizer and group that own it and reads, never writes, their state.

Adam's bias correction (Kingma & Ba 2015, Alg. 1): after ``t`` steps with decay ``beta2``,
``v_hat = exp_avg_sq / (1 - beta2**t)``. The raw buffer underestimates the second moment early in
training (by the factor ``1 - beta2**t``, 0.1 % at ``t = 1`` for ``beta2 = 0.999``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdamState", "ParamGroupInfo", "adam_state", "param_groups", "unwrap_optimizer"]

#: torch.optim classes that keep Adam's ``exp_avg_sq`` second-moment buffer.
ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a Lightning ``LightningOptimizer`` (or the object itself)."""
    inner = getattr(optimizer, "_optimizer", None)
    return inner if inner is not None else optimizer


def _as_list(optimizers: Any) -> list[Any]:
    if optimizers is None:
        return []
    if isinstance(optimizers, (list, tuple)):
        return [unwrap_optimizer(o) for o in optimizers]
    return [unwrap_optimizer(optimizers)]


@dataclass(frozen=True)
class ParamGroupInfo:
    """Where a parameter is optimized: the optimizer, its index, and the param group's settings.

    Attributes:
        optimizer: The (unwrapped) torch optimizer.
        optimizer_index: Its position in the list given.
        group: The param group dict (live: ``lr`` reflects the scheduler's current value).
    """

    optimizer: Any
    optimizer_index: int
    group: dict[str, Any]

    @property
    def lr(self) -> float:
        """The group's current learning rate."""
        return float(self.group["lr"])


def param_groups(params: Iterable[Tensor], optimizers: Any) -> list[ParamGroupInfo | None]:
    """For each parameter, the optimizer and param group that own it (``None`` if none does).

    Args:
        params: The parameters, in the order wanted.
        optimizers: One optimizer or a sequence (``trainer.optimizers``; Lightning wrappers are
            unwrapped).

    Raises:
        ValueError: A parameter appears in two optimizers (its state would be ambiguous).
    """
    owner: dict[int, ParamGroupInfo] = {}
    for index, optimizer in enumerate(_as_list(optimizers)):
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                info = ParamGroupInfo(optimizer, index, group)
                previous = owner.get(id(p))
                if previous is not None and previous.optimizer is not optimizer:
                    raise ValueError(
                        f"A parameter of shape {tuple(p.shape)} is in optimizers {previous.optimizer_index} "
                        f"and {index}; its optimizer state is ambiguous."
                    )
                owner[id(p)] = info
    return [owner.get(id(p)) for p in params]


def _step_count(state: dict[str, Any]) -> int:
    step = state.get("step", 0)
    if isinstance(step, Tensor):
        step = step.item()
    return int(step)


@dataclass
class AdamState:
    r"""Adam's per-parameter second moments and hyperparameters, gathered across optimizers.

    ``second_moments[i]`` is the bias-corrected :math:`\hat v = v / (1 - \beta_2^t)` of parameter
    ``i`` (a detached float copy; ``None`` where no optimizer holds an ``exp_avg_sq`` for it), or
    the raw buffer with ``bias_corrected=False``.

    Attributes:
        names: Parameter names.
        second_moments: Per parameter, :math:`\hat v` (or ``None``).
        eps: Per parameter, the owning group's ``eps`` (``nan`` without an Adam group).
        beta1: Per parameter, the group's :math:`\beta_1` (``nan`` without an Adam group).
        beta2: Per parameter, the group's :math:`\beta_2` (``nan`` without an Adam group).
        lr: Per parameter, the group's current learning rate (``nan`` without any optimizer).
        steps: Per parameter, Adam's step count (0 without state).
        optimizer_index: Per parameter, the owning optimizer's index (``-1`` for none).
        optimizer_names: Per parameter, the owning optimizer's class name (``""`` for none).
    """

    names: list[str]
    second_moments: list[Tensor | None]
    eps: list[float]
    beta1: list[float]
    beta2: list[float]
    lr: list[float]
    steps: list[int]
    optimizer_index: list[int]
    optimizer_names: list[str]

    @property
    def missing(self) -> list[str]:
        """Names of the parameters without a second-moment buffer."""
        return [n for n, v in zip(self.names, self.second_moments, strict=False) if v is None]

    @property
    def complete(self) -> bool:
        """Every parameter has a second-moment buffer."""
        return not self.missing

    def flat(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """All second moments concatenated in parameter order.

        Raises:
            ValueError: Some parameter has none (see :attr:`missing`).
        """
        if not self.complete:
            raise ValueError(f"No Adam second moments for {self.missing[:5]}{' ...' if len(self.missing) > 5 else ''}.")
        return torch.cat([v.reshape(-1).to(dtype) for v in self.second_moments if v is not None])


def adam_state(
    params: Sequence[Tensor],
    optimizers: Any,
    names: Sequence[str] | None = None,
    *,
    bias_corrected: bool = True,
) -> AdamState:
    r"""Gather Adam's second moments of ``params`` from every optimizer that owns one of them.

    Args:
        params: The parameters (e.g. the trainable ones in ``model.parameters()`` order).
        optimizers: One optimizer or a sequence of them (``trainer.optimizers``, manual
            optimization included; ``LightningOptimizer`` wrappers are unwrapped).
        names: Their names, for messages (default ``"param{i}"``).
        bias_corrected: Divide by :math:`1 - \beta_2^t` with the parameter's own step count
            (Kingma & Ba 2015, Alg. 1). ``False`` returns the raw ``exp_avg_sq``.

    Returns:
        An :class:`AdamState`; nothing in any optimizer is modified.
    """
    names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
    if len(names) != len(params):
        raise ValueError(f"`names` has {len(names)} entries for {len(params)} parameters.")
    owners = param_groups(params, optimizers)
    out = AdamState(names, [], [], [], [], [], [], [], [])
    nan = float("nan")
    for p, info in zip(params, owners, strict=True):
        v: Tensor | None = None
        eps = beta1 = beta2 = lr = nan
        steps, index, opt_name = 0, -1, ""
        if info is not None:
            index, opt_name, lr = info.optimizer_index, type(info.optimizer).__name__, info.lr
            betas = info.group.get("betas")
            if betas is not None:
                beta1, beta2 = float(betas[0]), float(betas[1])
                eps = float(info.group.get("eps", nan))
            state = info.optimizer.state.get(p, {})
            raw = state.get("exp_avg_sq")
            if isinstance(raw, Tensor) and betas is not None:
                steps = _step_count(state)
                v = raw.detach().to(torch.float64 if raw.dtype == torch.float64 else torch.float32).clone()
                if bias_corrected and steps > 0:
                    v.div_(1.0 - beta2**steps)
        out.second_moments.append(v)
        out.eps.append(eps)
        out.beta1.append(beta1)
        out.beta2.append(beta2)
        out.lr.append(lr)
        out.steps.append(steps)
        out.optimizer_index.append(index)
        out.optimizer_names.append(opt_name)
    return out
