"""Extreme eigenvalues of the Hessian: Lanczos (default) and the paper's power iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_hessian._random import make_generator
from lightning_hessian.lanczos import LanczosResult, lanczos
from lightning_hessian.operators import CurvatureOperator

__all__ = ["EigenResult", "top_eigenvalues"]


@dataclass
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        values: ``[k]`` float64 eigenvalue estimates, most extreme first (descending for
            ``which="largest"``, ascending for ``which="smallest"``).
        vectors: ``[num_params, k]`` float64 unit eigenvector estimates (``None`` if not asked).
        residuals: ``[k]`` residual norms ``||H v - lambda v||`` (for Lanczos, the exact
            Ritz residual ``beta_m |u_{m,i}|``, which needs no extra HVP).
        num_hvps: HVPs spent.
        converged: Whether every requested value met ``tol``.
        method: ``"lanczos"`` or ``"power"``.
    """

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    num_hvps: int
    converged: bool
    method: str


def _lanczos_converged(
    theta: Tensor, resid: Tensor, wanted: Tensor, tol: float
) -> bool:
    """Error bound per wanted Ritz value: min(r, r^2 / gap) <= tol * |theta|."""
    for i in wanted.tolist():
        others = torch.cat([theta[:i], theta[i + 1 :]])
        gap = (others - theta[i]).abs().min() if others.numel() else torch.tensor(float("inf"))
        r = resid[i]
        bound = torch.minimum(r, r * r / gap) if gap > 0 else r
        if bound > tol * theta[i].abs().clamp_min(torch.finfo(torch.float64).tiny):
            return False
    return True


def _wanted(num: int, k: int, which: str) -> Tensor:
    # eigh returns ascending values
    if which == "largest":
        return torch.arange(num - 1, num - 1 - min(k, num), -1)
    return torch.arange(0, min(k, num))


def _top_lanczos(
    op: CurvatureOperator,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    return_vectors: bool,
    basis_dtype: torch.dtype,
    basis_device: torch.device | str | None,
) -> EigenResult:
    n = op.num_params
    start = torch.randn((n, 1), generator=generator, dtype=torch.float64)
    min_steps = min(n, max(k + 2, 3))

    def should_stop(step: int, partial: LanczosResult) -> bool:
        m = len(partial.alphas[0])
        if m < min_steps:
            return False
        theta, u = partial.ritz(0)
        resid = partial.residual_norms[0] * u[-1, :].abs()
        return _lanczos_converged(theta, resid, _wanted(m, k, which), tol)

    result = lanczos(
        op,
        start,
        max_iter,
        store_basis=True,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        should_stop=should_stop,
    )
    theta, u = result.ritz(0)
    m = theta.numel()
    resid = result.residual_norms[0] * u[-1, :].abs()
    wanted = _wanted(m, k, which)
    converged = _lanczos_converged(theta, resid, wanted, tol) or len(result.alphas[0]) >= n
    vectors = None
    if return_vectors and result.basis is not None:
        coeffs = u[:, wanted].to(device=result.basis.device, dtype=result.basis.dtype)
        vectors = (result.basis[0, :m].t() @ coeffs).to(
            device=op.device, dtype=torch.float64
        )
        vectors = vectors / vectors.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return EigenResult(
        values=theta[wanted].clone(),
        vectors=vectors,
        residuals=resid[wanted].clone(),
        num_hvps=result.num_hvps,
        converged=bool(converged),
        method="lanczos",
    )


def _top_power(
    op: CurvatureOperator,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> EigenResult:
    """Power iteration with deflation; ``which="smallest"`` iterates on ``H - shift I``."""
    n = op.num_params
    device = op.device
    hvps = 0
    values: list[float] = []
    vectors: list[Tensor] = []
    residuals: list[float] = []
    converged_all = True
    shift = 0.0

    def apply(v: Tensor) -> Tensor:
        nonlocal hvps
        w = op.matmat(v.unsqueeze(1)).squeeze(1).to(torch.float64) - shift * v
        hvps += 1
        for lam, vec in zip(values, vectors):
            w = w - (lam - shift) * vec * torch.dot(vec, v)
        return w

    def iterate() -> tuple[float, Tensor, float, bool]:
        v = torch.randn(n, generator=generator, dtype=torch.float64).to(device)
        for vec in vectors:
            v = v - vec * torch.dot(vec, v)
        v = v / v.norm()
        lam_prev = None
        lam = 0.0
        resid = float("inf")
        for _ in range(max_iter):
            w = apply(v)
            lam = float(torch.dot(v, w))  # Rayleigh quotient of the shifted, deflated operator
            resid = float((w - lam * v).norm())
            if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
                return lam, v, resid, True
            lam_prev = lam
            norm = w.norm()
            if norm == 0:
                return lam, v, resid, True
            v = w / norm
        return lam, v, resid, False

    if which == "smallest":
        # Magnitude-dominant eigenvalue first; if it is positive, H - lambda_d I has the
        # smallest eigenvalue of H (shifted) as its magnitude-dominant one.
        dominant, _, _, ok = iterate()
        converged_all &= ok
        if dominant > 0:
            shift = dominant
    for _ in range(k):
        lam, v, resid, ok = iterate()
        converged_all &= ok
        values.append(lam + shift)
        vectors.append(v)
        residuals.append(resid)
    vals = torch.tensor(values, dtype=torch.float64)
    # the deflation above finds magnitude order; report most extreme first in the asked sense
    order = torch.argsort(vals, descending=(which == "largest"))
    return EigenResult(
        values=vals[order],
        vectors=torch.stack(vectors, dim=1)[:, order.to(device)],
        residuals=torch.tensor(residuals, dtype=torch.float64)[order],
        num_hvps=hvps,
        converged=converged_all,
        method="power",
    )


def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    *,
    which: Literal["largest", "smallest"] = "largest",
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float | None = None,
    max_iter: int = 100,
    seed: int | torch.Generator | None = 0,
    return_vectors: bool = True,
    basis_dtype: torch.dtype = torch.float64,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    r"""The ``k`` largest (or smallest) eigenvalues of the Hessian operator.

    **Lanczos** (default, METHODS.md §2): a Krylov basis with full reorthogonalisation in
    float64; Ritz values :math:`\theta_i` of the tridiagonal :math:`T_m` converge to the extreme
    algebraic eigenvalues. Stops once every wanted Ritz value satisfies the a-posteriori bound
    :math:`\min(r_i, r_i^2/\mathrm{gap}_i) \le \mathrm{tol}\,|\theta_i|`, with the Ritz residual
    :math:`r_i = \beta_m |u_{m,i}| = \|Hy_i - \theta_i y_i\|` and :math:`\mathrm{gap}_i` the
    distance to the nearest other Ritz value. Default ``tol = 1e-6``.

    **Power iteration** (``method="power"``, the paper's algorithm,
    ``hessian-dynamics-trace-maxeig.txt`` §2.2, §7.4): :math:`v \leftarrow Hv/\|Hv\|`,
    :math:`\lambda = v^\top H v`, stopped when the relative change of :math:`\lambda` is below
    ``tol`` (default ``1e-3`` as in the paper's code); ``k > 1`` by deflation. It converges at
    rate :math:`|\lambda_2/\lambda_1|` to the eigenvalue of largest *magnitude*, which is
    negative when negative curvature dominates; ``which="smallest"`` shifts by that eigenvalue.

    Args:
        op: A :class:`~lightning_hessian.HessianOperator` (or any curvature operator).
        k: Number of eigenvalues, ``1 <= k < num_params``.
        which: ``"largest"`` (algebraic) or ``"smallest"``.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative tolerance (see above).
        max_iter: Maximum Lanczos steps (or power iterations per eigenvalue).
        seed: Seed or ``torch.Generator`` of the start vector (the global RNG is never used).
        return_vectors: Also return the eigenvectors.
        basis_dtype: Storage dtype of the Lanczos basis (memory at scale; scalars stay float64).
        basis_device: Storage device of the Lanczos basis.

    Returns:
        :class:`EigenResult`.

    Example:
        >>> import torch
        >>> from lightning_hessian import MatrixOperator, top_eigenvalues
        >>> op = MatrixOperator(torch.diag(torch.linspace(-2.0, 5.0, 50, dtype=torch.float64)))
        >>> top_eigenvalues(op, k=2).values
        tensor([5.0000, 4.8571], dtype=torch.float64)
        >>> top_eigenvalues(op, which="smallest").values
        tensor([-2.0000], dtype=torch.float64)
    """
    n = op.num_params
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if k >= n:
        raise ValueError(
            f"`k`={k} must be smaller than the number of parameters ({n}); "
            "for the full spectrum form the Hessian explicitly."
        )
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if method not in ("lanczos", "power"):
        raise ValueError(f"`method` must be 'lanczos' or 'power', got {method!r}.")
    if tol is None:
        tol = 1e-6 if method == "lanczos" else 1e-3
    if not tol > 0:
        raise ValueError(f"`tol` must be positive, got {tol}.")
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter}.")
    generator = make_generator(seed)
    if method == "lanczos":
        return _top_lanczos(op, k, which, tol, max_iter, generator, return_vectors, basis_dtype, basis_device)
    result = _top_power(op, k, which, tol, max_iter, generator)
    if not return_vectors:
        result.vectors = None
    return result
