"""Converged extreme Ritz pairs of SLQ runs: exact masses for the density, leave-one-out trace.

Lanczos runs from random probes converge their extreme Ritz pairs (the Hessian's outliers) in a
few steps. Two uses, at no extra HVP (METHODS.md §3):

* **density deflation**: a converged extreme eigenvalue found by every run gets its exact mass
  :math:`d/n` (multiplicity :math:`d`) instead of the probe's :math:`\\chi^2`-distributed weight;
* **leave-one-out control variate for the trace**: run :math:`r`'s Hutchinson sample minus the
  zero-mean variate built from the *other* runs' converged pairs, which is independent of probe
  :math:`r` and therefore unbiased (issue 13: the same run's pairs bias it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_hessian.estimators.lanczos import LanczosResult
from lightning_hessian.operators.space import LOCAL_SPACE, VectorSpace

__all__ = ["converged_extremes", "deflated_weights", "leave_one_out_trace_samples", "ritz_vectors"]

#: Two unit Ritz vectors of the same eigenvalue span a new direction when the second keeps at
#: least this norm after projecting off the first (otherwise they are the same eigenvector).
_NEW_DIRECTION = 0.5


def converged_extremes(residuals: Tensor, steps: list[int], rtol: float, scale: float) -> list[list[int]]:
    """Per run, the indices (ascending) of converged Ritz values walking in from both ends."""
    chosen_all: list[list[int]] = []
    for r, size in enumerate(steps):
        ok = (residuals[r, :size] <= rtol * scale).tolist()
        chosen: list[int] = []
        i = size - 1
        while i >= 0 and ok[i]:
            chosen.append(i)
            i -= 1
        j = 0
        while j < i and ok[j]:
            chosen.append(j)
            j += 1
        chosen_all.append(sorted(set(chosen)))
    return chosen_all


def ritz_vectors(result: LanczosResult, run: int, indices: list[int], space: VectorSpace = LOCAL_SPACE) -> Tensor:
    """``[n, len(indices)]`` float64 unit Ritz vectors of run ``run`` (on the basis' device).

    Collective for a sharded ``space`` (the norms), also when ``indices`` is empty.
    """
    assert result.basis is not None
    size = result.steps[run]
    basis = result.basis[run, :size]
    _, u = result.ritz(run)
    coeffs = u[:, indices].to(device=basis.device, dtype=basis.dtype)
    y = (basis.t() @ coeffs).to(torch.float64)
    norms = space.column_dots(y, y).clamp_min(0.0).sqrt().to(y.device)  # called on every shard alike
    if not indices:
        return y
    return y / norms.clamp_min(1e-300)


def _orthonormal_union(
    values: list[Tensor], vectors: list[Tensor], space: VectorSpace = LOCAL_SPACE
) -> tuple[Tensor, Tensor]:
    """Greedy Gram–Schmidt over several runs' Ritz pairs (largest ``|value|`` first).

    A vector that keeps less than :data:`_NEW_DIRECTION` of its norm after projection is the
    same eigenvector found again and is dropped; one that keeps more is a new direction (e.g.
    another vector of a repeated eigenvalue's eigenspace) and keeps its value.
    """
    vals = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    if vals.numel() == 0:
        device = vectors[0].device if vectors else "cpu"
        return vals, torch.zeros((vectors[0].shape[0] if vectors else 0, 0), dtype=torch.float64, device=device)
    vecs = torch.cat(vectors, dim=1)
    kept_vals: list[float] = []
    kept: list[Tensor] = []
    for i in torch.argsort(vals.abs(), descending=True).tolist():
        y = vecs[:, i]
        for _ in range(2):
            for z in kept:
                y = y - z * float(space.column_dots(z[:, None], y[:, None])[0])
        norm = float(space.column_dots(y[:, None], y[:, None]).clamp_min(0.0).sqrt()[0])
        if norm >= _NEW_DIRECTION:
            kept.append(y / norm)
            kept_vals.append(float(vals[i]))
    return torch.tensor(kept_vals, dtype=torch.float64), torch.stack(kept, dim=1)


def leave_one_out_trace_samples(
    result: LanczosResult,
    pairs: list[tuple[Tensor, Tensor]],
    num_params: int,
    space: VectorSpace = LOCAL_SPACE,
) -> Tensor:
    r"""Per-run trace samples with the other runs' converged pairs as control variate.

    For run :math:`r` with unit start :math:`q_r` (:math:`n\,q_r^\top H q_r = n\alpha_{r,1}` is
    its Hutchinson sample) and the orthonormalised converged pairs :math:`(\lambda_j, y_j)` of
    all runs :math:`s \ne r`:

    .. math:: t_r = n\,q_r^\top H q_r - n\sum_j \lambda_j (y_j^\top q_r)^2 + \sum_j \lambda_j.

    :math:`E[n (y^\top q_r)^2] = 1` for a fixed unit :math:`y` (Rademacher or spherical
    :math:`q_r`), and the pairs do not depend on probe :math:`r`, so :math:`E[t_r] =
    \mathrm{tr}(H)` exactly, whatever the pairs' accuracy or multiplicity; accurate pairs remove
    the outliers' share of the variance.
    """
    num_runs = result.num_runs
    assert result.basis is not None
    samples = torch.zeros(num_runs, dtype=torch.float64)
    for r in range(num_runs):
        hutchinson = num_params * float(result.alphas[r][0])
        others = [pairs[s] for s in range(num_runs) if s != r]
        vals, ys = _orthonormal_union([p[0] for p in others], [p[1] for p in others], space)
        if vals.numel() == 0:
            samples[r] = hutchinson
            continue
        q = result.basis[r, 0].to(device=ys.device, dtype=torch.float64)
        proj = space.gram(ys, q[:, None]).reshape(-1).cpu()
        samples[r] = hutchinson - num_params * float((vals * proj * proj).sum()) + float(vals.sum())
    return samples


def _multiplicity(
    clusters: list[list[int]],
    vectors: list[Tensor],
    slots: list[dict[int, int]],
    weights: Tensor,
    num_params: int,
    space: VectorSpace = LOCAL_SPACE,
) -> int | None:
    """Multiplicity of an eigenvalue found by every run, or ``None`` when it cannot be told.

    ``clusters[r]`` are run ``r``'s converged nodes at that value (after convergence, rounding
    can make a run grow a second copy of a repeated eigenvalue). Integer weights first: with
    Rademacher probes and an eigenspace spanned by coordinate axes (then every run may see the
    *same* Ritz vector) a run's total weight there is exactly :math:`d/n`; otherwise the rank of
    all runs' Ritz vectors there, if below their number (each run sees a random direction of
    the eigenspace, so as many independent directions as vectors means ``d`` is larger).
    """
    counts = [float(weights[r, cluster].sum()) * num_params for r, cluster in enumerate(clusters)]
    rounded = round(counts[0])
    if rounded >= 1 and all(abs(c - rounded) <= 1e-6 * max(1.0, c) for c in counts):
        return int(rounded)
    stack = torch.cat(
        [vectors[r][:, [slots[r][i] for i in cluster]].to(vectors[0].device) for r, cluster in enumerate(clusters)],
        dim=1,
    )
    # singular values of the stack from its (global) Gram matrix
    singular = torch.linalg.eigvalsh(space.gram(stack, stack).cpu()).clamp_min(0.0).sqrt()
    rank = int((singular >= _NEW_DIRECTION).sum())
    return rank if rank < stack.shape[1] else None


def deflated_weights(
    nodes: Tensor,
    weights: Tensor,
    residuals: Tensor,
    candidates: list[list[int]],
    vectors: list[Tensor],
    num_params: int,
    space: VectorSpace = LOCAL_SPACE,
) -> tuple[Tensor | None, float, Tensor | None]:
    """Give converged extreme eigenvalues found by every run their exact mass ``d / n``.

    Returns the deflated weights (other nodes rescaled to the remaining mass), the average
    number of eigenvalues deflated per run, and the ``[R, m]`` mask of deflated nodes.
    """
    num_runs = nodes.shape[0]
    scale = float(nodes.abs().max())
    if num_runs < 2 or scale == 0:
        return None, 0.0, None
    slots = [{i: slot for slot, i in enumerate(c)} for c in candidates]
    deflated = weights.clone()
    mask = torch.zeros_like(nodes, dtype=torch.bool)
    total = 0.0
    for r in range(num_runs):
        masses: dict[int, float] = {}
        for i in candidates[r]:
            if i in masses:
                continue
            value = float(nodes[r, i])
            tol = 1e-6 * scale + 10 * float(residuals[r, i])
            clusters = [[k for k in candidates[s] if abs(float(nodes[s, k]) - value) <= tol] for s in range(num_runs)]
            if any(not cluster for cluster in clusters):
                continue
            # the run's own cluster first, so that counts[0] is this run's
            clusters = [clusters[r]] + [c for s, c in enumerate(clusters) if s != r]
            order = [r] + [s for s in range(num_runs) if s != r]
            d = _multiplicity(
                clusters, [vectors[s] for s in order], [slots[s] for s in order], weights[order], num_params, space
            )
            if d is not None:
                for k in clusters[0]:
                    masses[k] = d / len(clusters[0])
        exact = sum(masses.values()) / num_params
        rest_idx = torch.ones(nodes.shape[1], dtype=torch.bool)
        rest_idx[list(masses)] = False
        rest = float(weights[r][rest_idx].sum())
        if not masses or exact >= 1.0 or (rest <= 0 and exact < 1 - 1e-12):
            continue
        for i, share in masses.items():
            deflated[r, i] = share / num_params
            mask[r, i] = True
        if rest > 0:
            deflated[r][rest_idx] = weights[r][rest_idx] * ((1.0 - exact) / rest)
        total += sum(masses.values())
    if not bool(mask.any()):
        return None, 0.0, None
    return deflated, total / num_runs, mask
