"""The Gaussian measure's prior: per-tensor initialisation standard deviations, flattened log-stds.

The "initialisation prior" is a *Gaussian stand-in*: PyTorch initialises ``Linear``/``Conv``
weights uniformly on ``±1/sqrt(fan_in)``, not normally. The prior used is the diagonal normal
:math:`N(0, s_T^2)` with :math:`s_T` the standard deviation of tensor ``T`` at initialisation
(same mean and variance as the actual init, not the same distribution): probabilities under it
are those of a Gaussian re-draw of the initial weights, close to but not exactly the
probability of drawing the trained network's neighbourhood with PyTorch's initialiser.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flat_from_mapping", "init_prior_std", "log_prior_std"]


def init_prior_std(model: nn.Module, *, fallback: float = 1.0) -> dict[str, float]:
    r"""Per-tensor standard deviation of the (freshly initialised) parameters, for the prior.

    Call it right after initialisation (the local-volume callback does so at fit start and keeps
    the result in its ``state_dict``); pass the result as ``prior_std`` to :func:`local_volume`,
    which then uses the diagonal prior :math:`N(0, s_T^2)` for every entry of tensor ``T``.

    ``s_T`` is the population standard deviation of the entries of ``T``. A tensor whose entries
    are all equal (zero-initialised biases, normalisation weights set to one, single-element
    tensors) has ``s_T = 0``, which would make the prior degenerate. Fallback, in order:

    1. the standard deviation of the largest non-constant parameter of the same module (a
       zero-initialised ``Linear``/``Conv`` bias gets its weight's std; with PyTorch's default
       initialisation, bias and weight are both drawn from ``U(±1/sqrt(fan_in))``, so this is
       the std the bias would have had under the default init);
    2. otherwise ``fallback`` (default ``1.0``, e.g. for LayerNorm/BatchNorm affine parameters).

    Args:
        model: The module, at initialisation.
        fallback: Standard deviation used when neither the tensor nor its module gives one.

    Returns:
        ``{name: std}`` for every parameter in ``model.named_parameters()``.

    Raises:
        ValueError: ``fallback`` is not positive and finite.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.volume import init_prior_std
        >>> layer = nn.Linear(100, 10)
        >>> _ = nn.init.zeros_(layer.bias)
        >>> stds = init_prior_std(layer)
        >>> stds["bias"] == stds["weight"]
        True
    """
    if not (isinstance(fallback, (int, float)) and math.isfinite(fallback) and fallback > 0):
        raise ValueError(f"`fallback` must be a positive finite float, got {fallback!r}.")
    own: dict[str, float] = {}
    numel: dict[str, int] = {}
    for name, p in model.named_parameters():
        data = p.detach()
        std = float(data.double().std(unbiased=False)) if data.numel() > 1 else 0.0
        own[name] = std if math.isfinite(std) else 0.0
        numel[name] = data.numel()
    result: dict[str, float] = {}
    for name, std in own.items():
        if std > 0:
            result[name] = std
            continue
        prefix = name.rpartition(".")[0]
        siblings = [
            (numel[other], own[other])
            for other in own
            if other.rpartition(".")[0] == prefix and other != name and own[other] > 0
        ]
        result[name] = max(siblings)[1] if siblings else float(fallback)
    return result


def flat_from_mapping(value: Mapping[str, Any], names: list[str], params: list[Tensor], what: str) -> Tensor:
    """Flatten ``{name: float or tensor broadcastable to the parameter}`` to float64 ``[n]``."""
    missing = [n for n in names if n not in value]
    if missing:
        raise ValueError(
            f"`{what}` has no entry for trainable parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "give one per name in model.named_parameters()."
        )
    blocks = []
    for name, p in zip(names, params, strict=False):
        item = value[name]
        if isinstance(item, Tensor):
            t = item.detach().to(device=p.device, dtype=torch.float64)
            try:
                t = torch.broadcast_to(t, p.shape)
            except RuntimeError:
                raise ValueError(
                    f"`{what}[{name!r}]` has shape {tuple(item.shape)}, not broadcastable to {tuple(p.shape)}."
                ) from None
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            t = torch.full(p.shape, float(item), dtype=torch.float64, device=p.device)
        else:
            raise TypeError(f"`{what}[{name!r}]` must be a float or a tensor, got {type(item).__name__}.")
        blocks.append(t.reshape(-1))
    return torch.cat(blocks)


def log_prior_std(prior_std: Any, names: list[str], params: list[Tensor]) -> Tensor:
    """``log s`` (float64 ``[n]``) of the diagonal prior ``N(0, diag(s^2))`` from a float or mapping."""
    if isinstance(prior_std, str):
        raise ValueError(
            f"`prior_std={prior_std!r}`: the functional API takes a float or a mapping name -> float/"
            "tensor; for the initialisation prior pass `init_prior_std(model_at_init)` (the callback "
            "resolves 'init' itself)."
        )
    if isinstance(prior_std, Mapping):
        s = flat_from_mapping(prior_std, names, params, "prior_std")
    elif isinstance(prior_std, (int, float)) and not isinstance(prior_std, bool):
        n = sum(p.numel() for p in params)
        s = torch.full((n,), float(prior_std), dtype=torch.float64, device=params[0].device)
    else:
        raise TypeError(
            f"`prior_std` must be a float or a mapping name -> float/tensor, got {type(prior_std).__name__}."
        )
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("`prior_std` must be strictly positive and finite for every parameter.")
    return torch.log(s)
