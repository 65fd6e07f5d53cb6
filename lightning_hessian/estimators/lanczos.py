"""Batched Lanczos with full reorthogonalisation (float64 recurrence scalars, lean working memory).

Several independent Lanczos runs advance together: every step is one ``matmat`` over the active
runs' current vectors, so a vmapped HVP serves all runs at once (METHODS.md §0, §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_hessian.operators import CurvatureOperator

__all__ = ["ROUNDING_FACTOR", "LanczosResult", "lanczos", "rounding_floor"]

#: A run stops ("happy breakdown": its Krylov space is invariant) when the new residual norm
#: falls below this fraction of the largest |alpha|/beta seen so far in that run.
BREAKDOWN_RTOL = 1e-10


#: Rounding error of a network's HVP in units of ``eps_dtype * ||H||``: the float32 digits MLP's
#: products differ from its exact float64 Hessian by up to 8 of them (forward and backward
#: rounding both count), so reported residuals are floored at this many.
ROUNDING_FACTOR = 10.0


def rounding_floor(dtype: torch.dtype, scale: float) -> float:
    """``eps_dtype * scale``: the rounding level of products in ``dtype`` of an operator of norm ``scale``."""
    return float(torch.finfo(dtype).eps) * scale


def product_error_level(op: object) -> float:
    """Relative error level of ``op``'s products, in the units of :func:`rounding_floor`'s ``eps``.

    ``eps`` of the operator's dtype; for finite-difference products (an operator exposing a
    finite ``fd_error_estimate``) at least that measured error over :data:`ROUNDING_FACTOR`, so
    that floors of ``ROUNDING_FACTOR`` levels sit at the measured error.
    """
    level = float(torch.finfo(getattr(op, "dtype", torch.float64)).eps)
    fd_error = getattr(op, "fd_error_estimate", math.nan)
    if isinstance(fd_error, float) and math.isfinite(fd_error):
        level = max(level, fd_error / ROUNDING_FACTOR)
    return level


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
        breakdown: Per run, whether it stopped on an invariant Krylov space (``beta`` at
            rounding level): its Ritz values are then exact eigenvalues of the operator.
    """

    alphas: list[Tensor]
    betas: list[Tensor]
    residual_norms: Tensor
    basis: Tensor | None
    num_hvps: int
    breakdown: list[bool] = field(default_factory=list)

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

#: Elements per slice of a float64 dot product / per streamed slab of the basis: bounds the
#: temporaries of the lean recurrence (a few MiB) independently of the model's size.
CHUNK_ELEMENTS = 1 << 20


def _dot64(a: Tensor, b: Tensor) -> float:
    """``a . b`` of two 1-D tensors accumulated in float64, over slices (no full-size copies)."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), CHUNK_ELEMENTS):
        hi = min(lo + CHUNK_ELEMENTS, a.numel())
        total += torch.dot(a[lo:hi].to(torch.float64), b[lo:hi].to(torch.float64))
    return float(total)


def _reorthogonalise(w: Tensor, basis_rows: Tensor) -> None:
    """Remove from ``w`` (1-D, in place) its components along the rows of ``basis_rows``.

    Streams the basis in slabs of about :data:`CHUNK_ELEMENTS` numbers (moved to ``w``'s device
    if the basis lives elsewhere); one pass, classical Gram–Schmidt per slab. The coefficients
    ``slab @ w`` and the update ``coeffs @ slab`` are accumulated in float64 over column chunks,
    whatever the basis dtype: a float32 basis then costs only its storage rounding (a float32
    ``mv`` over millions of entries lost ~1e-5 relative on the top Ritz value), and no temporary
    is larger than a chunk.
    """
    steps, n = basis_rows.shape
    rows_per_slab = max(1, CHUNK_ELEMENTS // max(n, 1))
    for lo in range(0, steps, rows_per_slab):
        slab = basis_rows[lo : lo + rows_per_slab]
        if slab.device != w.device:
            slab = slab.to(w.device, non_blocking=True)
        cols = max(1, CHUNK_ELEMENTS // slab.shape[0])
        coeffs = torch.zeros(slab.shape[0], dtype=torch.float64, device=w.device)
        for c in range(0, n, cols):
            coeffs += slab[:, c : c + cols].to(torch.float64) @ w[c : c + cols].to(torch.float64)
        for c in range(0, n, cols):
            w[c : c + cols] -= (coeffs @ slab[:, c : c + cols].to(torch.float64)).to(w.dtype)


def _full_reorthogonalise(w: Tensor, basis_rows: Tensor) -> float:
    """Reorthogonalise ``w`` once, or twice where DGKS asks for it; returns its new norm (float64)."""
    before = math.sqrt(max(_dot64(w, w), 0.0))
    for _ in range(2):
        _reorthogonalise(w, basis_rows)
        after = math.sqrt(max(_dot64(w, w), 0.0))
        if after >= _DGKS_ETA * before:
            return after
        before = after
    return after


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
    fully reorthogonalised against all stored :math:`q` (once, twice where the
    Daniel–Gragg–Kaufman–Stewart test asks), :math:`\beta_j = \|w\|`,
    :math:`q_{j+1} = w/\beta_j`.

    **Memory** (issue 11): the Lanczos vectors live in ``basis_dtype`` and, with a stored basis on
    the operator's device, :math:`q_j` and :math:`q_{j-1}` *are* rows of the basis (no copies);
    the only full-size working array is the product :math:`w` (``num_params x R`` in
    ``basis_dtype``). :math:`\alpha_j`, :math:`\beta_j` and norms are accumulated in float64 over
    slices; reorthogonalisation streams the basis in slabs of :data:`CHUNK_ELEMENTS` numbers (from
    host memory with ``basis_device="cpu"``), with coefficients in ``basis_dtype`` (they only
    remove rounding-level components). Without a stored basis (``store_basis=False``) only local
    (three-term) orthogonality is kept: extreme Ritz values still converge, but once one has
    converged orthogonality is lost and it reappears as a spurious copy ("ghost"); quadrature
    weights then split between the copies, so densities stay usable while multiplicities and
    trace deflation do not.

    Args:
        op: The symmetric operator.
        starts: ``[n, R]`` start vectors (any scale).
        num_steps: Maximum steps ``m`` (HVPs per run); capped at ``n``.
        store_basis: Keep the Lanczos vectors (needed for full reorthogonalisation and Ritz
            vectors).
        basis_dtype: Dtype of the Lanczos vectors and of the product ``w`` (float32 halves the
            memory; the recurrence scalars stay float64).
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
    norms = starts.to(torch.float64).norm(dim=0)
    if not torch.all(norms > 0):
        raise ValueError("Lanczos start vectors must be non-zero.")
    first = (starts.to(device=device, dtype=torch.float64) / norms.to(device)).t().to(basis_dtype)  # [R, n]
    basis = None
    if store_basis:
        basis = torch.zeros((num_runs, num_steps, n), dtype=basis_dtype, device=basis_device)
        basis[:, 0].copy_(first)
    # Working q / q_prev only when the basis cannot serve them (absent, or on another device).
    own_vectors = basis is None or basis.device != torch.device(device)
    q_work = first if own_vectors else None
    q_prev_work = torch.zeros_like(first) if own_vectors else None
    del first
    alphas: list[list[float]] = [[] for _ in range(num_runs)]
    betas: list[list[float]] = [[] for _ in range(num_runs)]
    residual = torch.zeros(num_runs, dtype=torch.float64)
    scale = [0.0] * num_runs
    active = [True] * num_runs
    breakdown = [False] * num_runs
    beta_prev = [0.0] * num_runs
    hvps = 0

    def snapshot() -> LanczosResult:
        return LanczosResult(
            alphas=[torch.tensor(a, dtype=torch.float64) for a in alphas],
            betas=[torch.tensor(b[: max(len(alphas[r]) - 1, 0)], dtype=torch.float64) for r, b in enumerate(betas)],
            residual_norms=residual.clone(),
            basis=basis,
            num_hvps=hvps,
            breakdown=list(breakdown),
        )

    def current(run: int, step: int) -> tuple[Tensor, Tensor | None]:
        if own_vectors:
            assert q_work is not None and q_prev_work is not None  # allocated whenever own_vectors
            return q_work[run], (q_prev_work[run] if step > 0 else None)
        assert basis is not None  # not own_vectors implies a stored basis
        return basis[run, step], (basis[run, step - 1] if step > 0 else None)

    for step in range(num_steps):
        idx = [r for r in range(num_runs) if active[r]]
        if not idx:
            break
        if own_vectors:
            assert q_work is not None
            block = q_work if len(idx) == num_runs else q_work[idx]
        else:
            assert basis is not None
            block = basis[:, step] if len(idx) == num_runs else basis[idx, step]
        w = op.matmat(block.t().to(device)).to(basis_dtype)  # [n, a]: the one full-size working array
        del block
        hvps += len(idx)
        for slot, run in enumerate(idx):
            w_r = w[:, slot]
            q_r, q_prev_r = current(run, step)
            q_r_dev = q_r.to(device)
            alpha = _dot64(q_r_dev, w_r)
            w_r.sub_(q_r_dev, alpha=alpha)
            if q_prev_r is not None:
                w_r.sub_(q_prev_r.to(device), alpha=beta_prev[run])
            if basis is not None:
                beta = _full_reorthogonalise(w_r, basis[run, : step + 1])
            else:
                beta = math.sqrt(max(_dot64(w_r, w_r), 0.0))
            alphas[run].append(alpha)
            betas[run].append(beta)
            residual[run] = beta
            scale[run] = max(scale[run], abs(alpha), beta)
            if beta <= BREAKDOWN_RTOL * scale[run]:
                active[run] = False  # invariant subspace: T is exact for this run
                breakdown[run] = True
                continue
            w_r.div_(beta)
            if own_vectors:
                assert q_work is not None and q_prev_work is not None
                q_prev_work[run].copy_(q_work[run])
                q_work[run].copy_(w_r)
            if basis is not None and step + 1 < num_steps:
                basis[run, step + 1].copy_(w_r)
            beta_prev[run] = beta
        del w, w_r  # the column view w_r would keep this product alive during the next matmat
        if should_stop is not None and should_stop(step, snapshot()):
            break
    return snapshot()
