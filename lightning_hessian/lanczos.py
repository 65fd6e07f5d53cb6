"""Batched Lanczos with full reorthogonalisation (float64 recurrences).

Several independent Lanczos runs advance together: every step is one ``matmat`` over the active
runs' current vectors, so a vmapped HVP serves all runs at once (METHODS.md §0, §3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian.operators import CurvatureOperator

__all__ = ["LanczosResult", "lanczos"]

#: A run stops ("happy breakdown": its Krylov space is invariant) when the new residual norm
#: falls below this fraction of the largest |alpha|/beta seen so far in that run.
BREAKDOWN_RTOL = 1e-10


@dataclass
class LanczosResult:
    """Output of :func:`lanczos` for ``R`` runs.

    Attributes:
        alphas: Per run, the diagonal of the tridiagonal ``T`` (float64, length ``m_r``).
        betas: Per run, the off-diagonal (float64, length ``m_r - 1``).
        residual_norms: Per run, the norm ``beta_{m_r}`` of the last (unused) Lanczos residual.
        basis: ``[R, m, n]`` Lanczos vectors if stored, else ``None`` (run ``r`` uses
            ``basis[r, :m_r]``).
        num_hvps: HVPs spent.
    """

    alphas: list[Tensor]
    betas: list[Tensor]
    residual_norms: Tensor
    basis: Tensor | None
    num_hvps: int

    @property
    def num_runs(self) -> int:
        return len(self.alphas)

    @property
    def steps(self) -> list[int]:
        """Steps taken by each run (``m_r``)."""
        return [a.numel() for a in self.alphas]

    def tridiagonal(self, run: int) -> Tensor:
        """The ``m_r x m_r`` tridiagonal matrix of run ``run`` (float64)."""
        alpha, beta = self.alphas[run], self.betas[run]
        return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)

    def ritz(self, run: int) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and eigenvectors of ``T`` for run ``run``."""
        return torch.linalg.eigh(self.tridiagonal(run))


#: Daniel-Gragg-Kaufman-Stewart threshold: reorthogonalise again when a pass leaves less than
#: this fraction of the vector's norm ("twice is enough").
_DGKS_ETA = 0.7071067811865476


def _orthogonalise(w: Tensor, basis: Tensor, steps: int, active: Tensor, all_active: bool) -> Tensor:
    """Remove from ``w[:, r]`` its components along ``basis[r, :steps]`` (once or twice: DGKS)."""
    if steps == 0:
        return w
    q = basis[:, :steps] if all_active else basis[active, :steps]  # [a, j, n]
    wb = w.t().unsqueeze(2).to(device=q.device, dtype=q.dtype)  # [a, n, 1]
    before = wb.norm(dim=1)
    for _ in range(2):
        coeffs = torch.bmm(q, wb)  # [a, j, 1]
        wb = wb - torch.bmm(q.transpose(1, 2), coeffs)
        # DGKS criterion: a second pass only where the first cancelled much of the vector.
        if bool((wb.norm(dim=1) >= _DGKS_ETA * before).all()):
            break
        before = wb.norm(dim=1)
    return wb.squeeze(2).t().to(device=w.device, dtype=w.dtype)


def lanczos(
    op: CurvatureOperator,
    starts: Tensor,
    num_steps: int,
    *,
    store_basis: bool = True,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
    should_stop: Callable[[int, LanczosResult], bool] | None = None,
) -> LanczosResult:
    r"""Run ``R`` Lanczos processes in lockstep from the columns of ``starts`` (``[n, R]``).

    For each run: :math:`q_1 = v/\|v\|`, then
    :math:`w = H q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}` with :math:`\alpha_j = q_j^\top H q_j`,
    fully reorthogonalised against all stored :math:`q` (twice, in ``basis_dtype``),
    :math:`\beta_j = \|w\|`, :math:`q_{j+1} = w/\beta_j`. Recurrence scalars are float64.

    Args:
        op: The symmetric operator.
        starts: ``[n, R]`` start vectors (any scale).
        num_steps: Maximum steps ``m`` (HVPs per run); capped at ``n``.
        store_basis: Keep the Lanczos vectors (needed for reorthogonalisation and Ritz vectors).
            Without it only local (three-term) orthogonality is kept.
        basis_dtype: Dtype of the stored basis (float32 halves its memory; scalars stay float64).
        basis_device: Where the stored basis lives (e.g. ``"cpu"`` to spare GPU memory).
        should_stop: Called after every step with ``(step, partial_result)``; True ends all runs.
    """
    if starts.ndim != 2:
        raise ValueError(f"`starts` must be [num_params, R], got shape {tuple(starts.shape)}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    n, num_runs = starts.shape
    if n != op.num_params:
        raise ValueError(f"`starts` must have {op.num_params} rows, got {n}.")
    num_steps = int(min(num_steps, n))
    device = op.device
    basis_device = torch.device(basis_device) if basis_device is not None else device
    q = starts.to(device=device, dtype=torch.float64)
    norms = q.norm(dim=0)
    if not torch.all(norms > 0):
        raise ValueError("Lanczos start vectors must be non-zero.")
    q = q / norms
    basis = (
        torch.zeros((num_runs, num_steps, n), dtype=basis_dtype, device=basis_device) if store_basis else None
    )
    alphas: list[list[float]] = [[] for _ in range(num_runs)]
    betas: list[list[float]] = [[] for _ in range(num_runs)]
    residual = torch.zeros(num_runs, dtype=torch.float64)
    scale = torch.zeros(num_runs, dtype=torch.float64)
    active = torch.ones(num_runs, dtype=torch.bool)
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(num_runs, dtype=torch.float64, device=device)
    hvps = 0

    def snapshot() -> LanczosResult:
        return LanczosResult(
            alphas=[torch.tensor(a, dtype=torch.float64) for a in alphas],
            betas=[torch.tensor(b[: max(len(alphas[r]) - 1, 0)], dtype=torch.float64) for r, b in enumerate(betas)],
            residual_norms=residual.clone(),
            basis=basis,
            num_hvps=hvps,
        )

    for step in range(num_steps):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        idx_dev = idx.to(device)
        if basis is not None:
            basis[idx.to(basis_device), step] = q[:, idx_dev].t().to(dtype=basis_dtype, device=basis_device)
        w = op.matmat(q[:, idx_dev]).to(torch.float64)
        hvps += idx.numel()
        alpha = (q[:, idx_dev] * w).sum(dim=0)
        w = w - alpha * q[:, idx_dev] - beta_prev[idx_dev] * q_prev[:, idx_dev]
        if basis is not None:
            w = _orthogonalise(w, basis, step + 1, idx.to(basis_device), bool(active.all()))
        beta = w.norm(dim=0)
        alpha_cpu, beta_cpu = alpha.cpu(), beta.cpu()
        for slot, run in enumerate(idx.tolist()):
            alphas[run].append(float(alpha_cpu[slot]))
            betas[run].append(float(beta_cpu[slot]))
            residual[run] = beta_cpu[slot]
            scale[run] = max(float(scale[run]), abs(float(alpha_cpu[slot])), float(beta_cpu[slot]))
            if float(beta_cpu[slot]) <= BREAKDOWN_RTOL * float(scale[run]):
                active[run] = False  # invariant subspace: T is exact for this run
        safe_beta = torch.where(beta > 0, beta, torch.ones_like(beta))
        q_prev[:, idx_dev] = q[:, idx_dev]
        q[:, idx_dev] = w / safe_beta
        beta_prev[idx_dev] = beta
        if should_stop is not None and should_stop(step, snapshot()):
            break
    return snapshot()
