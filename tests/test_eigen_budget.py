"""HVP budgets of the default estimators, with their accuracy against exact spectra (issue 21).

The leaner defaults (verification that reuses the first run's Krylov information instead of a
fresh converged restart; the density's 3 x 40) must still keep every accuracy promise: each test
checks the HVP count *and* the error against an exact float64 eigendecomposition.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian import HessianOperator, MatrixOperator, spectral_density, top_eigenvalues
from lightning_hessian._utils.random import make_generator
from lightning_hessian.estimators.eigen import VERIFY_DELTA, _kw_epsilon, _kw_steps
from lightning_hessian.operators.space import LOCAL_SPACE
from tests.helpers import analysis_batches, exact_hessian, small_cnn, train
from tests.spectra import hessian_like_eigenvalues, with_eigenvectors

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_of_the_digits_mlp_in_at_most_20_hvps_at_1e6(mlp_truth, mlp_op64, seed):
    """k=1 on the trained digits MLP: <= 20 HVPs, within 1e-6 of the exact float64 lambda_max.

    The float64 model has no float32 rounding floor, so 1e-6 is the tolerance itself.
    """
    exact = float(mlp_truth.eigvals[-1])
    before = mlp_op64.num_hvps
    res = top_eigenvalues(mlp_op64, k=1, seed=seed)
    assert mlp_op64.num_hvps - before == res.num_hvps  # the count is what the operator did
    assert res.converged
    assert res.num_hvps <= 20, res.num_hvps
    assert abs(float(res.values[0]) - exact) <= 1e-6 * exact, (float(res.values[0]), exact)


def test_top_eigenvalue_of_the_float32_digits_mlp_in_at_most_20_hvps(mlp_truth):
    """The float32 model: the same budget; error at the float32 products' floor (~1e-6)."""
    exact = float(mlp_truth.eigvals[-1])
    op = HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches)
    for seed in range(3):
        res = top_eigenvalues(op, k=1, seed=seed)
        assert res.converged and res.num_hvps <= 20, (seed, res.num_hvps)
        assert abs(float(res.values[0]) - exact) <= 2e-6 * exact, (seed, float(res.values[0]), exact)


def test_top_eigenvalue_of_the_trained_digits_cnn_in_at_most_20_hvps():
    """The trained BatchNorm CNN of ``benchmarks/bench_core.py`` (374 parameters, 200 Adam steps)."""
    model = train(small_cnn(0), steps=200, images=True)
    batches = analysis_batches(fraction=0.1, seed=42, batch_size=60, images=True)
    exact = float(torch.linalg.eigvalsh(exact_hessian(model, batches))[-1])
    op = HessianOperator(model, F.cross_entropy, batches)
    for seed in range(3):
        res = top_eigenvalues(op, k=1, seed=seed)
        assert res.converged and res.num_hvps <= 20, (seed, res.num_hvps)
        assert abs(float(res.values[0]) - exact) <= 2e-6 * abs(exact), (seed, float(res.values[0]), exact)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_constructed_spectrum_k1_budget_and_accuracy(which):
    """Hessian-like spectrum (outliers 100 ... 5): k=1 verified within 20 HVPs, error <= tol."""
    lam = hessian_like_eigenvalues(300, seed=3)
    if which == "smallest":
        lam = -lam  # the outliers at the bottom
    exact = float(lam.max()) if which == "largest" else float(lam.min())
    for seed in range(5):
        op = MatrixOperator(with_eigenvectors(lam, "haar", seed=seed))
        res = top_eigenvalues(op, k=1, which=which, seed=seed)
        assert res.converged
        assert res.num_hvps <= 20, (seed, res.num_hvps)
        assert abs(float(res.values[0]) - exact) <= 1e-6 * abs(exact)


def test_a_start_blind_to_the_top_eigenvector_is_caught():
    """The first run's start is exactly orthogonal to the top eigenvector: the verification must
    not certify the second eigenvalue, and the result must be lambda_max (or not converged)."""
    n, seed = 200, 4
    start = LOCAL_SPACE.probes(n, 1, "gaussian", make_generator(seed))[:, 0]  # what the first run draws
    g = torch.Generator().manual_seed(11)
    v1 = torch.randn(n, generator=g, dtype=torch.float64)
    v1 = v1 - start * (start @ v1) / (start @ start)
    v1 = v1 / v1.norm()
    # Q's first column is +-v1 (QR keeps the span of the leading columns)
    q, _ = torch.linalg.qr(torch.cat([v1[:, None], torch.randn(n, n - 1, generator=g, dtype=torch.float64)], dim=1))
    assert abs(float(q[:, 0] @ start)) <= 1e-12 * float(start.norm())
    lam = hessian_like_eigenvalues(n, seed=5, outliers=(10.0, 6.0, 3.0))
    a = (q * lam) @ q.T
    res = top_eigenvalues(MatrixOperator(0.5 * (a + a.T)), k=1, seed=seed)
    if res.converged:
        assert abs(float(res.values[0]) - 10.0) <= 1e-5


def test_kuczynski_wozniakowski_steps_and_epsilon_agree():
    for eps in (0.5, 0.1, 1e-2):
        for dim in (50, 4809):
            steps = _kw_steps(eps, dim, VERIFY_DELTA)
            assert _kw_epsilon(steps, dim, VERIFY_DELTA) <= eps < _kw_epsilon(steps - 1, dim, VERIFY_DELTA)
            # the bound's failure probability at that epsilon is at most delta
            bound = (
                1.648 * math.sqrt(dim) * math.exp(-math.sqrt(_kw_epsilon(steps, dim, VERIFY_DELTA)) * (2 * steps - 1))
            )
            assert bound == pytest.approx(VERIFY_DELTA, rel=1e-9)


def test_spectral_density_default_is_120_hvps():
    lam = hessian_like_eigenvalues(300, seed=6)
    op = MatrixOperator(with_eigenvectors(lam, "haar", seed=6))
    sd = spectral_density(op)
    assert sd.num_hvps == 120 and sd.nodes.shape == (3, 40)
    # the 3 x 40 default still places the top outlier exactly (deflated, converged)
    assert abs(sd.max_eigenvalue - 100.0) <= 1e-8 * 100.0
