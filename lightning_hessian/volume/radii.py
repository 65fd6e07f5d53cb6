r"""Radii of the star domain along groups of sampled directions (the sampling loop).

For every group of directions (:mod:`~lightning_hessian.volume.directions`) the crossing of the
cutoff is found by :func:`lightning_hessian.volume.radius.find_radii` (safeguarded secant on
:math:`\log C` versus :math:`\log r`), all directions of a group evaluated together. The radius is
*a* crossing found by bracketing outward from the first trial distance: it is the first one when
the cost is monotone along the ray; a cost that rises above the cutoff and falls back below it
between two trial points is not seen (no estimator can guarantee more without scanning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.volume.cost import CostEvaluator
from lightning_hessian.volume.directions import draw_directions
from lightning_hessian.volume.radius import RadiusSearchNaNError, find_radii
from lightning_hessian.volume.result import VolumeComputationError

__all__ = ["RadiiSearch", "search_radii"]


@dataclass
class RadiiSearch:
    """Per-direction results (CPU tensors, ``[k]``) of :func:`search_radii`.

    Attributes:
        log_radii: ``log r_i``.
        log_direction_norms: ``log ||P u_i||``.
        evaluations: Cost evaluations per direction.
        converged: Bracketed to ``rel_tol``.
        capped: Still below the cutoff at the maximum radius.
        prior_a: :math:`\\sum_j \\hat v_j^2/s_j^2` (Gaussian measure), else ``None``.
        prior_b: :math:`\\sum_j \\theta_j\\hat v_j/s_j^2` (Gaussian measure), else ``None``.
    """

    log_radii: Tensor
    log_direction_norms: Tensor
    evaluations: Tensor
    converged: Tensor
    capped: Tensor
    prior_a: Tensor | None
    prior_b: Tensor | None


def search_radii(
    evaluator: CostEvaluator,
    theta: Tensor,
    log_p: Tensor | None,
    *,
    base_seed: int,
    num_directions: int,
    per_batch: int,
    cutoff: float,
    rel_tol: float,
    log_max_radius: float,
    log_initial_radius: float,
    max_evaluations: int,
    root_finder: str,
    inv_prior_var: Tensor | None,
    progress: Callable[[float], None] | None = None,
) -> RadiiSearch:
    """Draw ``num_directions`` directions in groups of ``per_batch`` and find their radii.

    Later groups start from the median log radius found so far; ``progress(count)`` is called
    after each group with the number of directions it finished.

    Raises:
        VolumeComputationError: The cost is NaN along some direction.
    """
    device = theta.device
    n = theta.numel()
    log_radii, log_norms, evaluations, converged, capped, prior_a, prior_b = [], [], [], [], [], [], []
    found: list[float] = []
    for start in range(0, num_directions, per_batch):
        count = min(per_batch, num_directions - start)
        group = draw_directions(base_seed, start, count, n, log_p, device)
        v_hat = group.unit

        def evaluate(idx: Tensor, t: Tensor, v_hat: Tensor = v_hat) -> Tensor:
            return evaluator(theta, v_hat[idx.to(device)], t.to(device=device, dtype=torch.float64))

        x0_value = log_initial_radius if not found else float(torch.tensor(found).median())
        x0 = torch.full((count,), x0_value, dtype=torch.float64)
        try:
            search = find_radii(
                evaluate,
                x0,
                cutoff=cutoff,
                rel_tol=rel_tol,
                log_max_radius=log_max_radius,
                max_evaluations=max_evaluations,
                method=root_finder,  # type: ignore[arg-type]
            )
        except RadiusSearchNaNError as err:
            raise VolumeComputationError(
                f"The cost is NaN at distance t={err.t:.4g} along direction {start + err.index} "
                "(the perturbed model's outputs overflowed?). Lower `max_radius`, check the model "
                "for NaNs, or use a float64 model."
            ) from None
        found.extend(search.log_radius[search.converged].tolist())
        log_radii.append(search.log_radius)
        log_norms.append(group.log_norms)
        evaluations.append(search.evaluations)
        converged.append(search.converged)
        capped.append(search.capped)
        if inv_prior_var is not None:
            prior_a.append((v_hat * v_hat * inv_prior_var).sum(dim=1).cpu())
            prior_b.append((v_hat * theta * inv_prior_var).sum(dim=1).cpu())
        del v_hat, group
        if progress is not None:
            progress(count)
    return RadiiSearch(
        torch.cat(log_radii),
        torch.cat(log_norms),
        torch.cat(evaluations),
        torch.cat(converged),
        torch.cat(capped),
        torch.cat(prior_a) if prior_a else None,
        torch.cat(prior_b) if prior_b else None,
    )
