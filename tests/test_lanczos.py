"""The batched Lanczos process: orthonormal bases, exact tridiagonalisation, happy breakdown,
memory options for the stored basis."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian._utils.random import draw_probes, make_generator
from lightning_hessian.estimators.density import spectral_density
from lightning_hessian.estimators.eigen import top_eigenvalues
from lightning_hessian.estimators.lanczos import lanczos
from lightning_hessian.operators import HessianOperator, MatrixOperator

pytestmark = pytest.mark.usefixtures("single_thread")


def _rotated(eigvals: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(eigvals.numel(), eigvals.numel(), generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * eigvals) @ q.T
    return 0.5 * (a + a.T)


def _starts(n: int, runs: int, seed: int) -> torch.Tensor:
    return torch.randn(n, runs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def mlp_op(mlp_truth):
    return HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches)


def test_full_reorthogonalisation_keeps_basis_orthonormal(mlp_truth):
    """60 steps on the exact MLP Hessian, whose top eigenvalues converge early (the regime where
    plain Lanczos loses orthogonality): Q^T Q = I and Q^T H Q = T to ~1e-12."""
    H = mlp_truth.hessian
    res = lanczos(MatrixOperator(H), _starts(H.shape[0], 2, seed=0), 60)
    assert res.steps == [60, 60] and res.num_hvps == 120
    for r in range(2):
        Q = res.basis[r].T  # [n, m]
        assert float((Q.T @ Q - torch.eye(60, dtype=torch.float64)).abs().max()) < 1e-12
        T = res.tridiagonal(r)
        assert float((Q.T @ H @ Q - T).abs().max()) < 1e-12 * float(mlp_truth.eigvals.abs().max())
    # the top Ritz value has converged to the exact top eigenvalue
    assert float(res.ritz(0)[0][-1]) == pytest.approx(float(mlp_truth.eigvals[-1]), rel=1e-12)


def test_orthonormal_on_real_operator(mlp_truth, mlp_op):
    res = lanczos(mlp_op, _starts(mlp_truth.num_params, 3, seed=1), 40)
    for r in range(3):
        Q = res.basis[r].T
        assert float((Q.T @ Q - torch.eye(40, dtype=torch.float64)).abs().max()) < 1e-12
        # T is the projection of the exact Hessian up to float32 HVP noise
        err = float((Q.T @ mlp_truth.hessian @ Q - res.tridiagonal(r)).abs().max())
        assert err < 1e-5 * float(mlp_truth.eigvals[-1])


def test_breakdown_with_few_distinct_eigenvalues():
    distinct = torch.tensor([-1.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    lam = distinct.repeat_interleave(75)  # n = 300, four eigenvalues of multiplicity 75
    A = _rotated(lam, seed=5)
    op = MatrixOperator(A)
    starts = _starts(300, 3, seed=6)
    # a fourth run started inside the span of two eigenspaces: its Krylov space has dimension 2
    _evals, evecs = torch.linalg.eigh(A)
    starts = torch.cat([starts, (evecs[:, :75].sum(1) + 2 * evecs[:, -75:].sum(1))[:, None]], dim=1)
    res = lanczos(op, starts, 50)
    assert res.steps == [4, 4, 4, 2]  # terminated early, not after 50 steps
    assert res.num_hvps == op.num_hvps == 14
    for r in range(3):
        assert torch.allclose(res.ritz(r)[0], distinct, atol=1e-10, rtol=0)
        assert float(res.residual_norms[r]) < 1e-10
    assert torch.allclose(res.ritz(3)[0], torch.tensor([-1.0, 7.0], dtype=torch.float64), atol=1e-10, rtol=0)
    # the quadrature is exact: weights are the squared projections on the eigenspaces
    sd = spectral_density(op, num_runs=3, num_steps=50, seed=0)
    assert sd.steps == [4, 4, 4]
    assert torch.allclose(sd.nodes, distinct.expand(3, 4), atol=1e-10, rtol=0)
    assert torch.allclose(sd.weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    probes = draw_probes(300, 3, "rademacher", make_generator(0))
    assert torch.allclose(sd.trace_samples, (probes * (A @ probes)).sum(0), rtol=1e-10, atol=0)
    # top_eigenvalues restarts in the complement of what it found: 7 has multiplicity 75
    top = top_eigenvalues(op, k=2)
    assert top.converged
    assert torch.allclose(top.values, torch.tensor([7.0, 7.0], dtype=torch.float64), atol=1e-10)
    assert abs(float(top.vectors[:, 0] @ top.vectors[:, 1])) < 1e-8


@pytest.mark.parametrize(
    "options",
    [{"basis_dtype": torch.float32}, {"basis_device": "cpu"}, {"basis_dtype": torch.float32, "basis_device": "cpu"}],
    ids=["float32", "cpu", "float32-cpu"],
)
def test_basis_storage_options_keep_top_eigenvalue(mlp_truth, mlp_op64, options):
    """On the float64 model, so that the stored basis is the only reduced precision."""
    lam = float(mlp_truth.eigvals[-1])
    default = top_eigenvalues(mlp_op64, k=1)
    res = top_eigenvalues(mlp_op64, k=1, **options)
    assert res.converged
    assert abs(float(res.values[0]) - lam) / lam <= 1e-6
    assert abs(float(res.values[0]) - float(default.values[0])) / lam <= 1e-6
    assert res.vectors.dtype == torch.float64
    assert abs(float(res.vectors[:, 0] @ mlp_truth.top_vectors[:, 0])) >= 1 - 1e-6
    raw = lanczos(mlp_op64, _starts(mlp_truth.num_params, 1, seed=2), 30, **options)
    expected = options.get("basis_dtype", torch.float64)
    assert raw.basis.dtype == expected and raw.basis.device.type == "cpu"
    Q = raw.basis[0].T.double()
    ortho = float((Q.T @ Q - torch.eye(30, dtype=torch.float64)).abs().max())
    assert ortho < (1e-5 if expected == torch.float32 else 1e-12)


def test_basis_options_on_float32_model(mlp_truth, mlp_op):
    lam = float(mlp_truth.eigvals[-1])
    res = top_eigenvalues(mlp_op, k=1, basis_dtype=torch.float32, basis_device="cpu")
    assert abs(float(res.values[0]) - lam) / lam <= 2e-6  # float32 HVP noise floor ~1e-6


def test_without_stored_basis_top_value_still_converges(mlp_truth):
    H = mlp_truth.hessian
    res = lanczos(MatrixOperator(H), _starts(H.shape[0], 1, seed=3), 40, store_basis=False)
    assert res.basis is None and res.steps == [40]
    assert float(res.ritz(0)[0][-1]) == pytest.approx(float(mlp_truth.eigvals[-1]), rel=1e-10)


def test_should_stop_ends_all_runs():
    op = MatrixOperator(_rotated(torch.linspace(1.0, 2.0, 50, dtype=torch.float64), seed=7))
    calls = []

    def stop(step, partial):
        calls.append((step, partial.steps))
        return step == 4

    res = lanczos(op, _starts(50, 2, seed=8), 30, should_stop=stop)
    assert res.steps == [5, 5] and res.num_hvps == 10
    assert calls[-1] == (4, [5, 5])


def test_steps_capped_at_dimension():
    lam = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    res = lanczos(MatrixOperator(_rotated(lam, seed=9)), _starts(12, 1, seed=10), 100)
    assert res.steps[0] <= 12
    assert torch.allclose(res.ritz(0)[0], lam, atol=1e-10)


def test_basis_free_mode_keeps_extremes_and_shows_ghosts():
    """store_basis=False (the monitor's lanczos_basis="none"): local orthogonality only.

    Extreme Ritz values still converge; once the top one has, orthogonality is lost and it comes
    back as a spurious copy (a "ghost"): measured here, as the documentation says.
    """
    lam = torch.cat(
        [torch.tensor([50.0, 20.0], dtype=torch.float64), torch.linspace(0.0, 1.0, 298, dtype=torch.float64)]
    )
    op = MatrixOperator(_rotated(lam, seed=9))
    starts = _starts(300, 2, seed=9)
    full = lanczos(op, starts, 80)
    free = lanczos(op, starts, 80, store_basis=False)
    assert free.basis is None
    for r in range(2):
        top_full, top_free = full.ritz(r)[0], free.ritz(r)[0]
        assert abs(float(top_free[-1]) - 50.0) < 1e-8 and abs(float(top_full[-1]) - 50.0) < 1e-8
        ghosts_free = int(((top_free - 50.0).abs() < 1e-6).sum())
        ghosts_full = int(((top_full - 50.0).abs() < 1e-6).sum())
        assert ghosts_full == 1
        assert ghosts_free >= 2  # the ghost copies of the converged outlier
        # the quadrature weight is shared between the copies: their total stays the probe's weight
        theta, u = free.ritz(r)
        w_free = float((u[0, (theta - 50.0).abs() < 1e-6] ** 2).sum())
        theta_f, u_f = full.ritz(r)
        w_full = float((u_f[0, (theta_f - 50.0).abs() < 1e-6] ** 2).sum())
        assert w_free == pytest.approx(w_full, rel=1e-3)
    sd = spectral_density(op, num_runs=2, num_steps=80, store_basis=False)
    assert sd.loo_trace_samples is None and sd.deflated_weights is None
    assert sd.deflated_trace == sd.trace


class _DiagonalOperator:
    """``diag(d)`` behind the CurvatureOperator interface (products in the input's dtype)."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self._num_hvps = 0

    @property
    def num_params(self) -> int:
        return self.diagonal.numel()

    @property
    def device(self) -> torch.device:
        return self.diagonal.device

    @property
    def num_hvps(self) -> int:
        return self._num_hvps

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        self._num_hvps += matrix.shape[1]
        return self.diagonal.to(matrix.dtype)[:, None] * matrix


def test_float32_basis_costs_only_its_storage_rounding_at_a_million_parameters():
    """Reorthogonalisation against a float32 basis accumulates in float64: with float32 coefficients
    (a float32 ``mv`` over 1 M entries) the top Ritz value was 2.5e-5 off the float64 basis's."""
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(1 << 20, dtype=torch.float64, generator=generator)
    diagonal[0], diagonal[1] = 10.0, 5.0
    tops = {}
    for dtype in (torch.float64, torch.float32):
        sd = spectral_density(_DiagonalOperator(diagonal), num_runs=3, num_steps=10, seed=0, basis_dtype=dtype)
        tops[dtype] = float(sd.top_ritz_values(1)[0][0])
    assert abs(tops[torch.float64] - 10.0) < 1e-9
    assert abs(tops[torch.float32] - tops[torch.float64]) / 10.0 < 1e-6
