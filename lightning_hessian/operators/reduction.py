"""Detect a summed loss: the Hessian of a sum over the batch is the batch size times too large.

Every estimator here assumes the loss is a *mean* over the samples (as the paper and PyTorch's
defaults do). A ``reduction="sum"`` loss silently scales the Hessian, its trace and eigenvalues by
the micro-batch size, and mixes scales across micro-batches of different sizes. A dry run on
one batch tells the two apart exactly: split it into halves :math:`A, B`; for per-sample losses
:math:`\\ell_i`, a mean gives :math:`L = (|A|L_A + |B|L_B)/(|A|+|B|)` and a sum gives
:math:`L = L_A + L_B`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_hessian.operators._batches import _cast_floats

__all__ = [
    "LossReduction",
    "check_loss_reduction",
    "check_operator_loss_reduction",
    "detect_loss_reduction",
    "split_batch",
]

LossReduction = Literal["mean", "sum", "unknown"]


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, dict):
        sizes = [_leading_size(v) for v in batch.values()]
    elif isinstance(batch, (list, tuple)):
        sizes = [_leading_size(v) for v in batch]
    else:
        return None
    sizes = [s for s in sizes if s is not None]
    return sizes[0] if sizes and all(s == sizes[0] for s in sizes) else None


def split_batch(batch: Any, at: int) -> tuple[Any, Any]:
    """Split every tensor of a (nested tuple/list/dict) batch along dim 0 at ``at``."""
    if isinstance(batch, Tensor):
        return batch[:at], batch[at:]
    if isinstance(batch, dict):
        parts = {k: split_batch(v, at) for k, v in batch.items()}
        return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
    if isinstance(batch, (list, tuple)):
        pairs = [split_batch(v, at) for v in batch]
        first, second = [p[0] for p in pairs], [p[1] for p in pairs]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*first), type(batch)(*second)
        return type(batch)(first), type(batch)(second)
    return batch, batch  # non-tensor leaves (strings, flags) are shared


@torch.no_grad()
def detect_loss_reduction(loss_of_batch: Callable[[Any], Tensor], batch: Any, *, rtol: float = 1e-3) -> LossReduction:
    """Whether ``loss_of_batch`` averages or sums over the samples of ``batch`` (a dry run).

    Three forward passes (the batch and its two halves), no gradient. ``"unknown"`` when the
    batch has fewer than 2 samples, no common leading dimension, the losses are (near) zero, or
    samples interact (train-mode BatchNorm, in-batch negatives): neither identity then holds.

    Args:
        loss_of_batch: ``batch -> scalar loss``, evaluated in the state of the analysis (eval
            mode); must not depend on randomness (dropout off).
        batch: One batch, as the data yields it.
        rtol: Relative tolerance of the identities (float32 forward passes: ~1e-6).

    Returns:
        ``"mean"``, ``"sum"`` or ``"unknown"``.
    """
    size = _leading_size(batch)
    if size is None or size < 2:
        return "unknown"
    at = size // 2
    first, second = split_batch(batch, at)
    total = float(loss_of_batch(batch).double())
    loss_a, loss_b = float(loss_of_batch(first).double()), float(loss_of_batch(second).double())
    scale = max(abs(total), abs(loss_a), abs(loss_b))
    if scale == 0 or not all(math.isfinite(x) for x in (total, loss_a, loss_b)):
        return "unknown"
    as_mean = (at * loss_a + (size - at) * loss_b) / size
    as_sum = loss_a + loss_b
    mean_ok = abs(total - as_mean) <= rtol * scale
    sum_ok = abs(total - as_sum) <= rtol * scale
    if mean_ok and not sum_ok:
        return "mean"
    if sum_ok and not mean_ok:
        return "sum"
    return "unknown"


def check_loss_reduction(
    loss_of_batch: Callable[[Any], Tensor], batch: Any, *, where: str = "the loss"
) -> LossReduction:
    """:func:`detect_loss_reduction`, with a ``UserWarning`` naming the fix when the loss is summed."""
    reduction = detect_loss_reduction(loss_of_batch, batch)
    if reduction == "sum":
        warnings.warn(
            f"{where} scales with the batch size on a dry run (loss(batch) = loss(first half) + "
            "loss(second half)): it looks like a summed loss (reduction='sum'). The Hessian, its trace "
            "and eigenvalues are then the micro-batch size times those of the mean loss. Use a mean "
            "over the samples (reduction='mean', the default of torch.nn losses).",
            UserWarning,
            stacklevel=2,
        )
    return reduction


def check_operator_loss_reduction(op: Any) -> LossReduction:
    """Dry-run :func:`check_loss_reduction` on a :class:`HessianOperator`'s first local batch."""
    try:
        with op._guarded():
            for batch, _ in op._batches():
                params = list(op._wrapper.parameters())
                if params:  # the model's own dtype (batches may be cast for ``compute_dtype``)
                    batch = _cast_floats(batch, params[0].dtype)
                return check_loss_reduction(op._wrapper, batch, where="The Hessian operator's loss")
    except Exception:  # noqa: BLE001 - a diagnostic must never stop the analysis
        return "unknown"
    return "unknown"
