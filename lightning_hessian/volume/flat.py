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
2. *Confirmation*: the cost stays below the cutoff with the candidates moved by ``± max_radius``:
   all candidates together; if that fails, each parameter tensor's candidates together; then the
   rest one by one (2 forward passes each, vmapped; at most 16,384). A zero Jacobian column alone
   is not enough: the incoming weights of a dead ReLU unit can revive it far away. On the digits
   MLP (4,810 parameters, 634 flat coordinates among 1,333 candidates) this costs about 2,400
   forward passes, five times the radius search with 100 directions: it runs for ``measure="lebesgue"`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hessian.volume.cost import CostEvaluator, reduce_with_failure_flag

__all__ = ["flat_coordinates"]

# Candidates confirmed one by one at most (the first ones in parameter order).
_MAX_INDIVIDUAL_CHECKS = 2**14


def _zero_jacobian_columns(
    evaluator: CostEvaluator, generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """``[n]`` bool: the coordinate's Jacobian column is exactly zero on every process's shard."""
    n = sum(evaluator.numels)
    total = torch.zeros(n, dtype=torch.float64, device=evaluator.device)
    failure: BaseException | None = None
    try:
        with torch.enable_grad():
            for entry in evaluator.batches:
                out, leaves = evaluator.forward_with_grad_leaves(entry.batch)
                if evaluator.cost == "kl":
                    out = torch.log_softmax(out.to(torch.float64), dim=-1)
                out = out.to(torch.float64)
                weights = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
                grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
                total += torch.cat(
                    [
                        torch.zeros(p.numel(), dtype=torch.float64, device=evaluator.device)
                        if g is None
                        else g.detach().reshape(-1).to(torch.float64).abs()
                        for g, p in zip(grads, evaluator.params, strict=False)
                    ]
                )
    except Exception as err:
        if all_reduce is None:
            raise
        failure = err
    if all_reduce is not None:
        total = reduce_with_failure_flag(total, failure, all_reduce, "checking for flat coordinates")
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
    bounds = torch.tensor([0, *evaluator.numels]).cumsum(0)
    owner = torch.bucketize(index, bounds[1:], right=True)
    # All candidates together, then each parameter tensor's, then one by one: flat coordinates come
    # in blocks (an input that is always zero, a dead unit's outgoing weights).
    stages = [[index], [index[owner == t] for t in owner.unique().tolist()], None]
    passes = 0
    remaining = index
    for sets in stages:
        if remaining.numel() == 0:
            break
        if sets is None:
            sets = [remaining[i : i + 1] for i in range(min(remaining.numel(), _MAX_INDIVIDUAL_CHECKS))]
        sets = [members[~flat[members]] for members in sets]
        sets = [members for members in sets if members.numel()]
        passed, spent = _moved_sets_stay_below(evaluator, theta, sets, max_radius, cutoff)
        passes += spent
        for members, ok in zip(sets, passed, strict=False):
            if ok:
                flat[members] = True
        remaining = index[~flat[index]]
    return flat, passes


def _moved_sets_stay_below(
    evaluator: CostEvaluator, theta: Tensor, sets: list[Tensor], max_radius: float, cutoff: float
) -> tuple[list[bool], int]:
    """For each set of coordinates: is the cost below ``cutoff`` with all of them moved by ``± max_radius``?"""
    n = theta.numel()
    device = theta.device
    group = max(1, 2**24 // max(n, 1) // 2)
    passed: list[bool] = []
    for start in range(0, len(sets), group):
        chunk = sets[start : start + group]
        dirs = torch.zeros(len(chunk), n, dtype=torch.float64, device=device)
        for row, members in enumerate(chunk):
            dirs[row, members.to(device)] = 1.0 / math.sqrt(members.numel())
        reach = torch.tensor([max_radius * math.sqrt(m.numel()) for m in chunk], dtype=torch.float64, device=device)
        costs = evaluator(theta, torch.cat([dirs, dirs]), torch.cat([reach, -reach])).reshape(2, len(chunk))
        passed.extend((costs < cutoff).all(dim=0).tolist())
    return passed, 2 * sum(len(sets[i : i + group]) for i in range(0, len(sets), group))
