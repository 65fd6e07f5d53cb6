r"""Exactly flat coordinates: parameters the cost does not depend on at all (Lebesgue volume = ∞).

Weights reading an input that is always zero (the border pixels of the digits images), or the
outgoing weights of a unit that is dead on every analysis example, can be moved arbitrarily far
without changing any output: the neighbourhood is then a cylinder and its Lebesgue volume is
infinite, while a finite-direction estimator would silently report a finite number.

Detection, two steps:

1. *Candidates*: coordinates whose Jacobian column is exactly zero on the analysis set. One
   backward pass per batch of :math:`\sum_b \langle w_b, g(f(x_b))\rangle` with random Gaussian
   cotangents :math:`w_b` (``g`` = ``log_softmax`` for the KL cost, the identity otherwise); an
   entry of the gradient is exactly zero for every draw iff its column is zero (a non-zero column
   gives zero with probability 0).
2. *Confirmation*: the cost along the candidates stays below the cutoff at ``± max_radius``
   (all candidates moved together, then one by one if that fails). A zero Jacobian column alone
   is not enough: the incoming weights of a dead ReLU unit can revive it far away.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hessian.volume.cost import CostEvaluator

__all__ = ["flat_coordinates"]

# Candidates confirmed one by one at most (beyond: only the joint check counts).
_MAX_INDIVIDUAL_CHECKS = 4096


def _zero_jacobian_columns(
    evaluator: CostEvaluator, generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """``[n]`` bool: the coordinate's Jacobian column is exactly zero on every process's shard."""
    n = sum(evaluator.numels)
    total = torch.zeros(n, dtype=torch.float64, device=evaluator.device)
    with torch.enable_grad():
        for entry in evaluator.batches:
            out = evaluator.wrapper(entry.batch)
            if evaluator.cost == "kl":
                out = torch.log_softmax(out.to(torch.float64), dim=-1)
            out = out.to(torch.float64)
            weights = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
            grads = torch.autograd.grad((out * weights).sum(), evaluator.params, allow_unused=True)
            total += torch.cat(
                [
                    torch.zeros(p.numel(), dtype=torch.float64, device=evaluator.device)
                    if g is None
                    else g.detach().reshape(-1).to(torch.float64).abs()
                    for g, p in zip(grads, evaluator.params)
                ]
            )
    if all_reduce is not None:
        total = all_reduce(total)
    return total == 0


def flat_coordinates(
    evaluator: CostEvaluator,
    theta: Tensor,
    *,
    max_radius: float,
    cutoff: float,
    generator: torch.Generator,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """Coordinates along which the cost stays below ``cutoff`` out to ``± max_radius``.

    Args:
        evaluator: The cost with its anchored analysis batches.
        theta: float64 ``[n]`` anchor.
        max_radius: How far to check.
        cutoff: The neighbourhood's cost level.
        generator: CPU generator of the random cotangents.
        all_reduce: Sum across processes (DDP): every process joins the same collectives.

    Returns:
        ``(mask, forward_passes)``: bool ``[n]`` of the confirmed flat coordinates (on the CPU), and
        the cost evaluations spent confirming them.
    """
    candidates = _zero_jacobian_columns(evaluator, generator, all_reduce).cpu()
    index = torch.nonzero(candidates).reshape(-1)
    flat = torch.zeros_like(candidates)
    if index.numel() == 0:
        return flat, 0
    device = theta.device
    n = theta.numel()
    joint = torch.zeros(1, n, dtype=torch.float64, device=device)
    joint[0, index.to(device)] = 1.0 / math.sqrt(index.numel())
    reach = max_radius * math.sqrt(index.numel())
    costs = evaluator(theta, joint.expand(2, n), torch.tensor([reach, -reach], dtype=torch.float64, device=device))
    passes = 2
    if bool((costs < cutoff).all()):
        flat[index] = True
        return flat, passes
    checked = index[:_MAX_INDIVIDUAL_CHECKS]
    group = max(1, min(checked.numel(), 2**24 // max(n, 1)))
    for start in range(0, checked.numel(), group):
        part = checked[start : start + group]
        dirs = torch.zeros(part.numel(), n, dtype=torch.float64, device=device)
        dirs[torch.arange(part.numel(), device=device), part.to(device)] = 1.0
        t = torch.full((part.numel(),), max_radius, dtype=torch.float64, device=device)
        up = evaluator(theta, dirs, t)
        down = evaluator(theta, dirs, -t)
        passes += 2 * part.numel()
        flat[part[(up < cutoff) & (down < cutoff)]] = True
    return flat, passes
