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
from lightning_hessian.operators.space import VectorSpace, space_of

__all__ = ["ROUNDING_FACTOR", "LanczosResult", "global_size", "lanczos", "rounding_floor"]

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


def _local_dot64(a: Tensor, b: Tensor) -> Tensor:
    """This process's part of ``a . b`` (1-D tensors), accumulated in float64 over slices."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), CHUNK_ELEMENTS):
        hi = min(lo + CHUNK_ELEMENTS, a.numel())
        total += torch.dot(a[lo:hi].to(torch.float64), b[lo:hi].to(torch.float64))
    return total


def _reduced_dots(space: VectorSpace, pairs: list[tuple[Tensor, Tensor]]) -> list[float]:
    """``[a . b for a, b in pairs]`` (global inner products) with one collective for all of them."""
    if not pairs:
        return []
    local = torch.stack([_local_dot64(a, b).cpu() for a, b in pairs])
    return [float(x) for x in space.all_reduce(local.to(pairs[0][0].device)).cpu()]


def global_size(space: VectorSpace, local: int, device: torch.device | str) -> int:
    """The global length of vectors whose local part has ``local`` entries (one collective)."""
    return int(space.all_reduce(torch.tensor([float(local)], dtype=torch.float64, device=device)).item())


def _slab_rows(num_params: int) -> int:
    """Basis rows per streamed slab (from the *global* size, so every shard streams alike)."""
    return max(1, CHUNK_ELEMENTS // max(num_params, 1))


def _reorthogonalise_many(space: VectorSpace, ws: list[Tensor], bases: list[Tensor], num_params: int) -> None:
    """Remove from each ``ws[i]`` (1-D, in place) its components along the rows of ``bases[i]``.

    Streams each basis in slabs of about :data:`CHUNK_ELEMENTS` numbers (moved to ``w``'s device
    if the basis lives elsewhere); one pass, classical Gram–Schmidt per slab. The coefficients
    ``slab @ w`` and the update ``coeffs @ slab`` are accumulated in float64 over column chunks,
    whatever the basis dtype: a float32 basis then costs only its storage rounding (a float32
    ``mv`` over millions of entries lost ~1e-5 relative on the top Ritz value), and no temporary
    is larger than a chunk. The coefficients of all vectors of one slab index are summed over
    the shards in one collective (all bases have the same number of rows).
    """
    if not ws:
        return
    steps = bases[0].shape[0]
    rows_per_slab = _slab_rows(num_params)
    for lo in range(0, steps, rows_per_slab):
        slabs = []
        partial = []
        for w, basis_rows in zip(ws, bases, strict=True):
            slab = basis_rows[lo : lo + rows_per_slab]
            if slab.device != w.device:
                slab = slab.to(w.device, non_blocking=True)
            cols = max(1, CHUNK_ELEMENTS // slab.shape[0])
            coeffs = torch.zeros(slab.shape[0], dtype=torch.float64, device=w.device)
            for c in range(0, w.numel(), cols):
                coeffs += slab[:, c : c + cols].to(torch.float64) @ w[c : c + cols].to(torch.float64)
            slabs.append(slab)
            partial.append(coeffs)
        reduced = space.all_reduce(torch.stack(partial))
        for w, slab, coeffs in zip(ws, slabs, reduced, strict=True):
            cols = max(1, CHUNK_ELEMENTS // slab.shape[0])
            for c in range(0, w.numel(), cols):
                w[c : c + cols] -= (coeffs @ slab[:, c : c + cols].to(torch.float64)).to(w.dtype)


def _full_reorthogonalise_many(
    space: VectorSpace, ws: list[Tensor], bases: list[Tensor], num_params: int
) -> list[float]:
    """Reorthogonalise each ``w`` once, or twice where DGKS asks for it; returns the new norms (float64).

    Collectives: the norms before and after each pass and one per slab of each pass, for all
    vectors together; a second pass runs for the vectors that need it (a decision taken from
    reduced norms, so every shard takes it alike).
    """
    before = [math.sqrt(max(x, 0.0)) for x in _reduced_dots(space, [(w, w) for w in ws])]
    after = list(before)
    pending = list(range(len(ws)))
    for _ in range(2):
        if not pending:
            break
        _reorthogonalise_many(space, [ws[i] for i in pending], [bases[i] for i in pending], num_params)
        norms = _reduced_dots(space, [(ws[i], ws[i]) for i in pending])
        still = []
        for i, sq in zip(pending, norms, strict=True):
            after[i] = math.sqrt(max(sq, 0.0))
            if after[i] < _DGKS_ETA * before[i]:
                before[i] = after[i]
                still.append(i)
        pending = still
    return after


def _check_starts(op: CurvatureOperator, starts: Tensor, num_steps: int) -> tuple[int, int]:
    """``(n, R)`` of valid start vectors ``[n, R]`` and step count; ``ValueError`` otherwise."""
    if starts.ndim != 2:
        raise ValueError(f"`starts` must be [num_params, R], got shape {tuple(starts.shape)}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    n, num_runs = starts.shape
    if n != op.num_params:
        raise ValueError(f"`starts` must have {op.num_params} rows, got {n}.")
    return n, num_runs


class _Recurrence:
    """The float64 scalars of ``R`` lockstep Lanczos runs (alphas, betas, breakdown flags)."""

    def __init__(self, num_runs: int) -> None:
        self.alphas: list[list[float]] = [[] for _ in range(num_runs)]
        self.betas: list[list[float]] = [[] for _ in range(num_runs)]
        self.residual = torch.zeros(num_runs, dtype=torch.float64)
        self.scale = [0.0] * num_runs
        self.active = [True] * num_runs
        self.breakdown = [False] * num_runs
        self.beta_prev = [0.0] * num_runs
        self.hvps = 0

    def record(self, run: int, alpha: float, beta: float) -> bool:
        """Append a step's ``alpha``/``beta``; False (and the run stops) on a breakdown."""
        self.alphas[run].append(alpha)
        self.betas[run].append(beta)
        self.residual[run] = beta
        self.scale[run] = max(self.scale[run], abs(alpha), beta)
        if beta <= BREAKDOWN_RTOL * self.scale[run]:
            self.active[run] = False
            self.breakdown[run] = True
            return False
        self.beta_prev[run] = beta
        return True

    def snapshot(self, basis: Tensor | None) -> LanczosResult:
        return LanczosResult(
            alphas=[torch.tensor(a, dtype=torch.float64) for a in self.alphas],
            betas=[
                torch.tensor(b[: max(len(self.alphas[r]) - 1, 0)], dtype=torch.float64)
                for r, b in enumerate(self.betas)
            ],
            residual_norms=self.residual.clone(),
            basis=basis,
            num_hvps=self.hvps,
            breakdown=list(self.breakdown),
        )


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
    n, num_runs = _check_starts(op, starts, num_steps)
    device = op.device
    space = space_of(op)
    # the global size: step caps and slab sizes must agree on every shard (same collectives)
    global_n = global_size(space, n, device)
    num_steps = int(min(num_steps, global_n))
    basis_device = torch.device(basis_device) if basis_device is not None else device
    norms = space.column_dots(starts, starts).sqrt().cpu()
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
    rec = _Recurrence(num_runs)
    beta_prev = rec.beta_prev

    def current(run: int, step: int) -> tuple[Tensor, Tensor | None]:
        if own_vectors:
            assert q_work is not None and q_prev_work is not None  # allocated whenever own_vectors
            return q_work[run], (q_prev_work[run] if step > 0 else None)
        assert basis is not None  # not own_vectors implies a stored basis
        return basis[run, step], (basis[run, step - 1] if step > 0 else None)

    for step in range(num_steps):
        idx = [r for r in range(num_runs) if rec.active[r]]
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
        rec.hvps += len(idx)
        cols = [w[:, slot] for slot in range(len(idx))]
        qs = [current(run, step) for run in idx]
        q_devs = [q_r.to(device) for q_r, _ in qs]
        step_alphas = _reduced_dots(space, list(zip(q_devs, cols, strict=True)))  # one collective
        for w_r, q_r_dev, (_, q_prev_r), alpha, run in zip(cols, q_devs, qs, step_alphas, idx, strict=True):
            w_r.sub_(q_r_dev, alpha=alpha)
            if q_prev_r is not None:
                w_r.sub_(q_prev_r.to(device), alpha=beta_prev[run])
        del q_devs, qs
        if basis is not None:
            step_betas = _full_reorthogonalise_many(space, cols, [basis[run, : step + 1] for run in idx], global_n)
        else:
            step_betas = [math.sqrt(max(x, 0.0)) for x in _reduced_dots(space, [(c, c) for c in cols])]
        for w_r, alpha, beta, run in zip(cols, step_alphas, step_betas, idx, strict=True):
            if not rec.record(run, alpha, beta):
                continue  # invariant subspace: T is exact for this run
            w_r.div_(beta)
            if own_vectors:
                assert q_work is not None and q_prev_work is not None
                q_prev_work[run].copy_(q_work[run])
                q_work[run].copy_(w_r)
            if basis is not None and step + 1 < num_steps:
                basis[run, step + 1].copy_(w_r)
        del w, w_r, cols  # the column views would keep this product alive during the next matmat
        if should_stop is not None and should_stop(step, rec.snapshot(basis)):
            break
    return rec.snapshot(basis)
