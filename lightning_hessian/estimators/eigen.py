"""Extreme eigenvalues of the Hessian: Lanczos (default) and the paper's power iteration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_hessian._utils.random import make_generator
from lightning_hessian.estimators._orthonormal import column_norms, orthonormal_columns
from lightning_hessian.estimators.lanczos import (
    ROUNDING_FACTOR,
    LanczosResult,
    global_size,
    lanczos,
    product_error_level,
)
from lightning_hessian.operators.base import CurvatureOperator, WrappedOperator
from lightning_hessian.operators.space import VectorSpace, space_of

__all__ = ["EigenResult", "top_eigenvalues"]


@dataclass
class EigenResult:
    r"""Extreme eigenpairs of a symmetric operator.

    Attributes:
        values: ``[k]`` float64 eigenvalue estimates, most extreme first (descending for
            ``which="largest"``, ascending for ``which="smallest"``). Fewer than ``k`` (then
            ``converged`` is False) only when the Krylov spaces were exhausted first.
        vectors: ``[num_params, k]`` float64 unit eigenvector estimates (``None`` if not asked).
        residuals: ``[k]`` true residual norms :math:`\|H y_i - \theta_i y_i\|`, measured with
            one extra batched product of the returned vectors (Lanczos) or taken from the last
            iteration's product (power); both include the products' own rounding error.
        num_hvps: HVPs spent (the residual product included).
        converged: Whether every requested value met ``tol`` and the search found no further
            eigenvalue among the ``k`` most extreme (see :func:`top_eigenvalues`).
        method: ``"lanczos"`` or ``"power"``.
    """

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    num_hvps: int
    converged: bool
    method: str


def _rounding_floor(op: CurvatureOperator, scale: float) -> float:
    """Residual floor of products in the operator's dtype: ``eps_dtype * ||H||``."""
    return product_error_level(op) * scale


def _error_bounds(theta: Tensor, resid: Tensor, target: Tensor) -> Tensor:
    r"""A-posteriori error bound of every Ritz value that cannot pass on an unresolved pair.

    :math:`r_i` always bounds the distance of :math:`\theta_i` to *some* eigenvalue. The sharper
    :math:`r_i^2/\mathrm{gap}_i` (Kato–Temple) needs the gap to the rest of the spectrum; it is
    used only when the nearest other Ritz value :math:`\theta_j` has itself converged
    (:math:`r_j \le \mathrm{tol}\,|\theta_j|`), with :math:`\mathrm{gap}_i = |\theta_i -
    \theta_j| - r_j`. While a close pair is unresolved its second member has no converged Ritz
    value, so only the residual counts.
    """
    bounds = resid.clone()
    if theta.numel() < 2:
        return bounds
    converged = resid <= target
    dist = (theta[:, None] - theta[None, :]).abs()
    dist.fill_diagonal_(float("inf"))
    nearest = dist.argmin(dim=1)
    gap = dist.min(dim=1).values - resid[nearest]
    usable = converged[nearest] & (gap > 0)
    kato = resid * resid / gap.clamp_min(torch.finfo(torch.float64).tiny)
    bounds[usable] = torch.minimum(resid[usable], kato[usable])
    return bounds


def _order(values: Tensor, which: str) -> Tensor:
    return torch.argsort(values, descending=(which == "largest"))


def _far_shift(values: Tensor, which: str) -> float:
    """A value beyond the found ones on the side away from the wanted end."""
    scale = float(values.abs().max()) if values.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    return float(values.min()) - 2 * scale if which == "largest" else float(values.max()) + 2 * scale


class _ComplementOperator(WrappedOperator):
    r""":math:`P H P + \sigma YY^\top` with :math:`P = I - YY^\top`: ``H`` on the complement of found vectors.

    The found directions get the value :math:`\sigma`, placed beyond the values still wanted
    (below them for ``which="largest"``), so that rounding-level components along them cannot
    surface as spurious extreme Ritz values.
    """

    def __init__(self, op: CurvatureOperator, vectors: Tensor, shift: float) -> None:
        self.op = op
        self.vectors = vectors  # [n, p] float64 orthonormal, on op.device
        self.shift = shift

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.op, "dtype", torch.float64)

    def _coefficients(self, matrix: Tensor) -> Tensor:
        """``Y^T matrix`` (global inner products, one collective), in ``matrix``'s dtype."""
        return space_of(self.op).gram(self.vectors, matrix).to(device=matrix.device, dtype=matrix.dtype)

    def project(self, matrix: Tensor) -> Tensor:
        y = self.vectors.to(matrix.dtype)
        return matrix - y @ self._coefficients(matrix)

    def matmat(self, matrix: Tensor) -> Tensor:
        y = self.vectors.to(matrix.dtype)
        coeffs = self._coefficients(matrix)
        return self.project(self.op.matmat(matrix - y @ coeffs)) + self.shift * (y @ coeffs)


def _measured_residuals(op: CurvatureOperator, values: Tensor, vectors: Tensor) -> tuple[Tensor, int]:
    r"""True residuals :math:`\|Hy_i - \theta_i y_i\|` from one batched product, with its rounding.

    In a reduced-precision operator (float32 products) the product's own rounding error is of the
    size of converged residuals, and it differs from the error against the exact Hessian. The
    block then also holds :math:`3y_i` (a non-power-of-two scaling rounds differently):
    :math:`e_i = \|H(3y_i)/3 - Hy_i\|` measures the rounding, and the reported residual is
    :math:`\sqrt{r_i^2 + e_i^2}`, floored at :data:`ROUNDING_FACTOR` :math:`\epsilon_{dtype}\|H\|`
    (the products' deviation from the exact Hessian also has a systematic part, from the forward
    pass, that no product of the same operator can see).
    """
    dtype = getattr(op, "dtype", torch.float64)
    k = vectors.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=torch.float64), 0
    block = vectors if dtype == torch.float64 else torch.cat([vectors, 3.0 * vectors], dim=1)
    product = op.matmat(block.to(dtype)).to(torch.float64)
    space = space_of(op)
    diffs = product[:, :k] - vectors * values.to(vectors.device)
    if dtype != torch.float64:
        diffs = torch.cat([diffs, product[:, k:] / 3.0 - product[:, :k]], dim=1)
    norms = column_norms(space, diffs)  # one collective for both
    resid = norms[:k] if dtype == torch.float64 else torch.hypot(norms[:k], norms[k:])
    floor = ROUNDING_FACTOR * _rounding_floor(op, float(values.abs().max()))
    return resid.cpu().clamp_min(floor), block.shape[1]


@dataclass
class _Run:
    """One Lanczos run of :func:`_lanczos_run`: its wanted Ritz pairs and what it showed."""

    theta: Tensor
    vectors: Tensor
    ok: Tensor
    exhausted: bool
    hvps: int
    below: bool = False  # a verification run: certified that nothing passes ``kth``
    limit: float = math.nan  # ... and the certified limit of its space's extreme eigenvalue
    verified: bool = False  # a first run: its embedded verification certified the value


#: ``verify(y, theta, steps)``: the certified limit of the extreme eigenvalue of the complement of
#: the unit vector ``y`` (``None`` when not certified within ``steps``), and the HVPs spent.
_Verifier = Callable[[Tensor, float, int], tuple[float | None, int]]


def _lanczos_run(
    op: CurvatureOperator,
    start: Tensor,
    wanted: int,
    which: str,
    tol: float,
    max_iter: int,
    basis_dtype: torch.dtype,
    basis_device: torch.device | str | None,
    dim: int,
    kth: float | None = None,
    verify: _Verifier | None = None,
) -> _Run:
    r"""One single-vector Lanczos run: its ``wanted`` most extreme Ritz pairs and whether they converged.

    ``dim`` is the dimension of the space the run lives in (Krylov space exhausted at ``dim`` steps).
    With ``kth`` (a verification run in the complement of ``k`` found values, ``kth`` the
    ``k``-th of them) the run also stops as soon as its space is certified to hold no eigenvalue
    beyond ``kth`` (:func:`_kw_limit`). With ``verify`` (a first run for ``k = 1``), once the
    extreme Ritz value would pass with the gap to the next Ritz value, the verification runs on
    the complement of the current Ritz vector; its certified limit :math:`U \ge \lambda_2` (Cauchy
    interlacing: the compression of ``H`` to a complement of one vector has its largest eigenvalue
    at least :math:`\lambda_2`) gives the Kato–Temple bound :math:`r^2/(	heta - U)`, and the run
    goes on only until that bound meets the tolerance (no restart).
    """
    min_steps = min(dim, max(wanted + 2, 3))
    found: dict[str, float] = {}  # the embedded verification's limit, once certified
    spent = [0, 0]  # verification HVPs, attempts

    def target(theta: Tensor) -> Tensor:
        # a tolerance below the products' rounding level is raised to it
        return torch.clamp_min(tol * theta.abs(), _rounding_floor(op, float(theta.abs().max())))

    def bounds(partial: LanczosResult) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        theta, u = partial.ritz(0)
        resid = (partial.residual_norms[0] * u[-1, :].abs()).clamp_min(_rounding_floor(op, float(theta.abs().max())))
        bound = _error_bounds(theta, resid, target(theta))
        if "limit" in found:  # Kato-Temple with the certified gap to the rest of the spectrum
            e = int(_order(theta, which)[0])
            gap = float(theta[e]) - found["limit"] if which == "largest" else found["limit"] - float(theta[e])
            if gap > 0:
                bound[e] = min(float(bound[e]), float(resid[e]) ** 2 / gap)
        return theta, u, resid, bound

    def done(theta: Tensor, bound: Tensor) -> bool:
        pick = _order(theta, which)[:wanted]
        return bool((bound[pick] <= target(theta)[pick]).all())

    def certified(theta: Tensor, steps: int) -> bool:
        if kth is None:
            return False
        limit = _kw_limit(theta, which, steps, dim)
        return limit <= kth + tol * abs(kth) if which == "largest" else limit >= kth - tol * abs(kth)

    def try_verify(partial: LanczosResult, theta: Tensor, u: Tensor, resid: Tensor) -> None:
        assert verify is not None and partial.basis is not None
        order = _order(theta, which)
        e, nxt = int(order[0]), int(order[1])
        gap = abs(float(theta[e]) - float(theta[nxt]))  # optimistic: theta_2 is inside the spectrum
        if not (gap > 0 and float(resid[e]) ** 2 / gap <= float(target(theta)[e])):
            return
        spent[1] += 1
        # the fewest steps whose certificate could come below theta_e (with the optimistic gap):
        # a dense cluster at the end needs more than a run has, so the verification is not tried
        steps = _kw_steps(gap / (gap + float(theta.max() - theta.min())), dim - 1, VERIFY_DELTA)
        if steps > min(max_iter, dim - 1):
            return
        basis = partial.basis[0, : theta.numel()]
        y = (basis.t() @ u[:, e : e + 1].to(device=basis.device, dtype=basis.dtype)).to(op.device, torch.float64)
        limit, used = verify(y, float(theta[e]), min(2 * steps + 3, max_iter, dim - 1))
        spent[0] += used
        if limit is not None:
            found["limit"] = limit

    def should_stop(step: int, partial: LanczosResult) -> bool:
        if len(partial.alphas[0]) < min_steps:
            return False
        theta, u, resid, bound = bounds(partial)
        if verify is not None and not spent[1] and theta.numel() >= 2 and not done(theta, bound):
            try_verify(partial, theta, u, resid)
            theta, u, resid, bound = bounds(partial)
        return done(theta, bound) or certified(theta, len(partial.alphas[0]))

    result = lanczos(op, start, max_iter, basis_dtype=basis_dtype, basis_device=basis_device, should_stop=should_stop)
    theta, u, _, bound = bounds(result)
    below = kth is not None and result.steps[0] >= min_steps and certified(theta, result.steps[0])
    pick = _order(theta, which)[:wanted]
    ok = bound[pick] <= target(theta)[pick]
    exhausted = bool(result.breakdown[0]) or result.steps[0] >= dim
    ok = ok | torch.tensor(exhausted)  # invariant Krylov space: its Ritz pairs are exact
    assert result.basis is not None  # lanczos() stores the basis by default
    basis = result.basis[0, : theta.numel()]
    coeffs = u[:, pick].to(device=basis.device, dtype=basis.dtype)
    vectors = (basis.t() @ coeffs).to(device=op.device, dtype=torch.float64)
    return _Run(
        theta=theta[pick],
        vectors=vectors,
        ok=ok,
        exhausted=exhausted,
        hvps=result.num_hvps + spent[0],
        below=below,
        limit=_kw_limit(theta, which, result.steps[0], dim) if below else math.nan,
        verified="limit" in found,
    )


#: Failure probability of a verification run's certificate (see :func:`_kw_limit`).
VERIFY_DELTA = 1e-2


def _kw_epsilon(steps: int, dim: int, delta: float) -> float:
    r"""Relative error :math:`\varepsilon` that ``steps`` Lanczos steps reach with probability ``1 - delta``.

    Kuczyński & Woźniakowski, *Estimating the largest eigenvalue by the power and Lanczos
    algorithms with a random start* (SIAM J. Matrix Anal. Appl. 13(4), 1992), Theorem 4.2: for
    a positive semidefinite matrix of order ``dim`` and a start uniform on the sphere,
    :math:`P[(\lambda_1 - \theta_1)/\lambda_1 \ge \varepsilon] \le 1.648\sqrt{n}\,
    e^{-\sqrt\varepsilon(2k-1)}`; solved for :math:`\varepsilon` at probability ``delta``.
    """
    if steps < 2:
        return math.inf
    root = math.log(1.648 * math.sqrt(max(dim, 8)) / delta) / (2 * steps - 1)
    return root * root


def _kw_steps(eps: float, dim: int, delta: float) -> int:
    """The fewest steps for which :func:`_kw_epsilon` is at most ``eps``."""
    if not eps > 0:
        return 1 << 30
    return math.ceil((math.log(1.648 * math.sqrt(max(dim, 8)) / delta) / math.sqrt(eps) + 1) / 2)


def _kw_limit(theta: Tensor, which: str, steps: int, dim: int) -> float:
    r"""A limit that the run's space's extreme eigenvalue passes with probability at most :data:`VERIFY_DELTA`.

    With the extreme Ritz value :math:`\theta_e` (a bound from inside) and the far-end Ritz
    value :math:`\theta_f` standing for the far end of the spectrum (the operator shifted by it
    is semidefinite), the Kuczyński–Woźniakowski bound (:func:`_kw_epsilon`) gives, with
    probability at least ``1 -`` :data:`VERIFY_DELTA` over the run's random start,
    :math:`\lambda_e \le \theta_e + \frac{\varepsilon}{1-\varepsilon}(\theta_e - \theta_f)`
    (largest; mirrored for smallest). A verification run is certified when this limit does not
    pass the ``k``-th found value: its space then holds no further eigenvalue among the ``k``
    most extreme. A well separated extreme is certified in a few steps; one in a dense cluster
    is not, and the run goes on to converge as before.
    """
    eps = _kw_epsilon(steps, dim, VERIFY_DELTA)
    if not eps < 1.0:
        return math.inf if which == "largest" else -math.inf
    top, bottom = float(theta.max()), float(theta.min())
    if which == "largest":
        return top + eps / (1.0 - eps) * (top - bottom)
    return bottom - eps / (1.0 - eps) * (top - bottom)


def _verifier(
    op: CurvatureOperator,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    basis_dtype: torch.dtype,
    basis_device: torch.device | str | None,
    n: int,
) -> _Verifier:
    """The verification of a ``k = 1`` run: a random-start run in the complement of its Ritz vector."""
    space = space_of(op)

    def verify(y: Tensor, theta: float, steps: int) -> tuple[float | None, int]:
        y = y / column_norms(space, y).to(y.device)
        complement = _ComplementOperator(op, y, _far_shift(torch.tensor([theta], dtype=torch.float64), which))
        start = complement.project(space.probes(op.num_params, 1, "gaussian", generator, device=op.device))
        run = _lanczos_run(complement, start, 1, which, tol, steps, basis_dtype, basis_device, n - 1, kth=theta)
        return (run.limit if run.below else None), run.hvps

    return verify


def _orthonormal_new(space: VectorSpace, vecs: Tensor, vectors: Tensor) -> Tensor:
    """``vecs`` orthonormalised against the orthonormal ``vectors`` and each other (one column each)."""
    new = orthonormal_columns(space, vecs, vectors)
    if new.shape[1] != vecs.shape[1]:  # converged Ritz vectors are independent; rounding cannot drop one
        raise RuntimeError("Lanczos restart produced linearly dependent Ritz vectors.")
    return new


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
    """Lanczos, then restarts in the complement of the converged vectors until nothing new enters the top ``k``.

    A single-vector Krylov space holds one vector per eigenspace, so an eigenvalue of multiplicity
    ``d`` appears once. Each restart draws a fresh random start, projects it and every product off
    the converged vectors found so far (:class:`_ComplementOperator`) and converges the extreme
    Ritz values of the complement; they join the found set when they rank among the ``k`` most
    extreme. The search ends, verified, when a restart's converged extreme value ranks below the
    ``k``-th found one; ``converged=False`` when a run ran out of steps first.
    """
    space = space_of(op)
    local_n = op.num_params
    n = global_size(space, local_n, op.device)  # Krylov dimensions count every shard
    values = torch.zeros(0, dtype=torch.float64)
    vectors = torch.zeros((local_n, 0), dtype=torch.float64, device=op.device)
    hvps = 0
    verified = False
    for _attempt in range(2 * k + 2):
        found = vectors.shape[1]
        if found >= n:
            verified = True
            break
        complement = _ComplementOperator(op, vectors, _far_shift(values, which)) if found else None
        sub_op = op if complement is None else complement
        start = space.probes(local_n, 1, "gaussian", generator, device=op.device)
        if complement is not None:
            start = complement.project(start)
        wanted = max(1, min(k - min(found, k), n - found))
        kth = float(values[_order(values, which)[k - 1]]) if found >= k else None
        verify = _verifier(op, which, tol, max_iter, generator, basis_dtype, basis_device, n) if k == 1 else None
        run = _lanczos_run(
            sub_op,
            start,
            wanted,
            which,
            tol,
            min(max_iter, n - found),
            basis_dtype,
            basis_device,
            n - found,
            kth,
            verify if not found else None,
        )
        theta, vecs, ok = run.theta, run.vectors, run.ok
        hvps += run.hvps
        if run.below:  # the complement's extreme value is certified not to enter the top k
            verified = True
            break
        if run.verified and bool(ok.all()):  # k = 1: certified by the run's embedded verification
            values, vectors, verified = theta, vecs, True
            break
        if found:  # drop Ritz pairs that live in the found space (the shifted directions)
            keep = space.gram(vectors, vecs).norm(dim=0) < 0.5
            theta, vecs, ok = theta[keep.cpu()], vecs[:, keep], ok[keep.cpu()]
            if theta.numel() == 0:
                verified = found >= k
                break
        if not bool(ok.all()):
            # keep what converged, report the rest unconverged
            values = torch.cat([values, theta])
            vectors = torch.cat([vectors, vecs], dim=1)
            break
        if found >= k:
            kth = float(values[_order(values, which)[k - 1]])
            slack = tol * abs(kth)
            beyond = float(theta[0]) <= kth + slack if which == "largest" else float(theta[0]) >= kth - slack
            if beyond:
                verified = True
                break
        values = torch.cat([values, theta])
        # re-orthonormalise the union (the new vectors are orthogonal to the old up to rounding)
        vectors = torch.cat([vectors, _orthonormal_new(space, vecs, vectors)], dim=1)
    order = _order(values, which)[:k]
    out_values, out_vectors = values[order], vectors[:, order.to(vectors.device)]
    residuals, used = _measured_residuals(op, out_values, out_vectors)
    hvps += used
    return EigenResult(
        values=out_values.clone(),
        vectors=out_vectors if return_vectors else None,
        residuals=residuals,
        num_hvps=hvps,
        converged=bool(verified and out_values.numel() == k),
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
    space = space_of(op)
    hvps = 0
    values: list[float] = []
    vectors: list[Tensor] = []
    residuals: list[float] = []
    converged_all = True
    shift = 0.0

    def dot(a: Tensor, b: Tensor) -> float:
        return float(space.column_dots(a.unsqueeze(1), b.unsqueeze(1))[0])

    def step(v: Tensor) -> tuple[Tensor, Tensor]:
        """``(H v, (H - shift I) v`` deflated of the found pairs``)``."""
        nonlocal hvps
        hv = op.matmat(v.unsqueeze(1)).squeeze(1).to(torch.float64)
        hvps += 1
        w = hv - shift * v
        if vectors:  # all coefficients y_j . v in one collective
            coeffs = space.gram(torch.stack(vectors, dim=1), v.unsqueeze(1)).reshape(-1).tolist()
            for lam, vec, c in zip(values, vectors, coeffs, strict=True):
                w = w - (lam - shift) * vec * c
        for vec in vectors:  # P (H - shift I - deflation) P: the found pairs' own errors drop out
            w = w - vec * dot(vec, w)
        return hv, w

    def iterate() -> tuple[float, Tensor, float, bool]:
        v = space.probes(n, 1, "gaussian", generator, device=device).squeeze(1)
        for vec in vectors:
            v = v - vec * dot(vec, v)
        v = v / math.sqrt(dot(v, v))
        lam_prev = None
        lam = 0.0
        resid = float("inf")
        for _ in range(max_iter):
            hv, w = step(v)
            lam = dot(v, w) + shift  # Rayleigh quotient, unshifted
            # reported: the residual against H itself; tested: the residual of the deflated
            # operator (earlier pairs' errors excluded); and ||w|| for the next iterate (one collective)
            norms = column_norms(space, torch.stack([hv - lam * v, w - (lam - shift) * v, w], dim=1)).tolist()
            resid, deflated_resid, norm = norms
            small_change = lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam)
            floor = ROUNDING_FACTOR * _rounding_floor(op, max(abs(lam), abs(shift)))
            if small_change and deflated_resid <= max(tol * abs(lam), floor):
                return lam, v, resid, True
            lam_prev = lam
            if norm == 0:
                return lam, v, resid, resid == 0.0
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
        values.append(lam)
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

    **Lanczos** (default, METHODS.md §2): a Krylov basis with full reorthogonalisation; Ritz
    values :math:`\theta_i` of the tridiagonal :math:`T_m` converge to the extreme algebraic
    eigenvalues. A run stops once every wanted Ritz value has an error bound
    :math:`b_i \le \mathrm{tol}\,|\theta_i|` (default ``tol = 1e-6``; a tolerance below the
    products' rounding level :math:`\epsilon_{dtype}\|H\|` is raised to it), where
    :math:`b_i = r_i` (the Ritz residual :math:`\beta_m|u_{m,i}|`, floored at the rounding level),
    or :math:`r_i^2/\mathrm{gap}_i` only once the nearest other Ritz value has converged itself:
    an unresolved close pair (one Ritz value for two eigenvalues) cannot pass. A single Krylov
    space sees one vector per eigenspace, so the search then **restarts** from a fresh random
    vector in the orthogonal complement of the converged vectors (the operator
    :math:`PHP + \sigma YY^\top`) and adds every converged value that ranks among the ``k`` most
    extreme. Repeated eigenvalues thus come out with their multiplicity, and a breakdown
    (invariant Krylov space) continues in the complement. The search ends when a restart's
    converged extreme value ranks below the ``k``-th, or, usually much earlier, when the restart
    is **certified** not to reach it: by the Kuczyński–Woźniakowski bound for random-start
    Lanczos (*Estimating the largest eigenvalue by the power and Lanczos algorithms with a random
    start*, SIAM J. Matrix Anal. Appl. 1992), after ``j`` steps its space's extreme eigenvalue
    exceeds :math:`\theta_e + \frac{\varepsilon_j}{1-\varepsilon_j}(\theta_e - \theta_f)`
    (:math:`\theta_f` its far-end Ritz value) with probability at most ``1e-2`` over the
    restart's start; a certificate below the ``k``-th value ends the search. For ``k = 1`` the
    verification runs *inside* the first run, as soon as its top Ritz value would pass with the
    gap to the next Ritz value: the certified limit :math:`U` bounds :math:`\lambda_2` (Cauchy
    interlacing), so the first run stops at the Kato–Temple bound :math:`r^2/(\theta - U)`
    instead of :math:`r` (no converged restart at all). A dense cluster at the wanted end (the
    smallest eigenvalue of a trained network) cannot be certified in a few steps; there the
    restart converges as before, or ends unconverged at ``max_iter``. ``converged=True`` requires
    ``k`` converged values and that final check. Costs (``benchmarks/bench_core.py``): ``k = 1``
    17 HVPs on the trained digits MLP, 12–13 on the digits CNN (both float32, residual product
    included), 42–45 on an untrained MLP.
    ``residuals`` are measured: one batched product of the returned vectors
    (:math:`\|Hy_i-\theta_iy_i\|`, with float32 products also their rounding, floored at
    ``ROUNDING_FACTOR`` :math:`\epsilon_{dtype}\|H\|`).

    **Power iteration** (``method="power"``, the paper's algorithm,
    ``hessian-dynamics-trace-maxeig.txt`` §2.2, §7.4): :math:`v \leftarrow Hv/\|Hv\|`,
    :math:`\lambda = v^\top H v`; ``k > 1`` by deflation, ``which="smallest"`` on
    :math:`H - \lambda_d I` (shifted by the magnitude-dominant eigenvalue when it is positive).
    It stops when the relative change of the *unshifted* :math:`\lambda` is at most ``tol``
    (default ``1e-3`` as in the paper's code) **and** the residual of the (deflated) operator is
    at most :math:`\mathrm{tol}\,|\lambda|`, so :math:`\lambda` is within
    :math:`\mathrm{tol}\,|\lambda|` of an eigenvalue; reported residuals are against ``H``
    itself. It converges at rate :math:`|\lambda_2/\lambda_1|` to the eigenvalue of largest
    *magnitude*, which is negative when negative curvature dominates.

    Args:
        op: A :class:`~lightning_hessian.HessianOperator` (or any curvature operator).
        k: Number of eigenvalues, ``1 <= k < num_params``.
        which: ``"largest"`` (algebraic) or ``"smallest"``.
        method: ``"lanczos"`` or ``"power"``.
        tol: Relative tolerance (see above).
        max_iter: Maximum steps of each Lanczos run (or power iterations per eigenvalue).
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
