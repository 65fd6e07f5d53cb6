"""SLQ trace, interval and negative mass on constructed Hessian-like spectra (issue 13 items 2-4).

Several hundred seeds of the monitor's default SLQ (3 runs x 40 steps) on small explicit
matrices; each loop takes a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_hessian.estimators.density import spectral_density
from lightning_hessian.operators import MatrixOperator
from tests.spectra import hessian_like_eigenvalues, with_eigenvectors

pytestmark = pytest.mark.usefixtures("single_thread")

N = 200


def _slq_trace(a: torch.Tensor, seeds: range, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = MatrixOperator(a)
    means, lows, highs = [], [], []
    for seed in seeds:
        sd = spectral_density(op, num_runs=3, num_steps=40, seed=seed, grid_size=2, **kwargs)
        means.append(sd.deflated_trace)
        low, high = sd.trace_confidence_interval(0.95)
        lows.append(low)
        highs.append(high)
    return torch.tensor(means), torch.tensor(lows), torch.tensor(highs)


@pytest.mark.parametrize("kind", ["haar", "axis"])
def test_deflated_trace_is_unbiased_with_a_repeated_outlier(kind):
    """Old estimator: -30 +- 4 (of 446) with axis-aligned vectors and a double outlier."""
    lam = hessian_like_eigenvalues(N, seed=0, outliers=(100.0, 100.0, 50.0, 20.0, 10.0, 5.0))
    a = with_eigenvectors(lam, kind, seed=1)
    exact = float(lam.sum())
    means, _, _ = _slq_trace(a, range(150))
    bias = float(means.mean()) - exact
    stderr = float(means.std()) / math.sqrt(means.numel())
    assert abs(bias) <= 3 * stderr, (bias, stderr)
    assert stderr > 0  # a real spread (the old one reported stderr 0.0 while 100 too low)


def test_deflated_trace_is_unbiased_on_a_power_law_tail():
    """Selection bias of the old same-run deflation: -0.27 +- 0.07 at 15 steps."""
    lam = torch.cat([10.0 * torch.arange(1, 41, dtype=torch.float64) ** -1.5, torch.zeros(N - 40, dtype=torch.float64)])
    a = with_eigenvectors(lam, "haar", seed=2)
    op = MatrixOperator(a)
    values = torch.tensor(
        [spectral_density(op, num_runs=3, num_steps=15, seed=s, grid_size=2).deflated_trace for s in range(200)]
    )
    bias = float(values.mean()) - float(lam.sum())
    stderr = float(values.std()) / math.sqrt(values.numel())
    assert abs(bias) <= 3 * stderr, (bias, stderr)


@pytest.mark.parametrize("kind", ["haar", "axis"])
def test_trace_interval_coverage_at_the_monitor_defaults(kind):
    lam = hessian_like_eigenvalues(N, seed=3)
    a = with_eigenvectors(lam, kind, seed=3)
    _, lows, highs = _slq_trace(a, range(300))
    exact = float(lam.sum())
    coverage = float(((lows <= exact) & (exact <= highs)).double().mean())
    assert 0.92 <= coverage <= 0.985, coverage


def test_negative_mass_does_not_follow_lambda_max():
    """Old threshold (1e-3 x spectral radius): 0.045 -> 0.034 -> 0.0 as lambda_max went 10 -> 1000."""
    readings = []
    for top in (10.0, 100.0, 1000.0):
        lam = hessian_like_eigenvalues(N, seed=4, outliers=(top, 8.0, 7.0, 6.0, 5.0))
        op = MatrixOperator(with_eigenvectors(lam, "haar", seed=4))
        sds = [spectral_density(op, num_runs=3, num_steps=40, seed=s, grid_size=2) for s in range(4)]
        readings.append(sum(sd.negative_mass for sd in sds) / len(sds))
        tau = sds[0].negative_mass_threshold
        assert 1e-3 < tau < 0.1  # the bulk's scale (<= 1), not lambda_max
        true = float((lam < -tau).double().mean())
        assert readings[-1] == pytest.approx(true, rel=0.35), (readings[-1], true)
    assert max(readings) <= 1.25 * min(readings), readings


def test_absolute_negative_threshold_is_used_and_reported():
    lam = hessian_like_eigenvalues(N, seed=5)
    op = MatrixOperator(with_eigenvectors(lam, "haar", seed=5))
    sd = spectral_density(op, num_runs=3, num_steps=40, negative_threshold=0.1)
    assert sd.negative_mass_threshold == 0.1
    assert sd.negative_mass == sd.negative_fraction(threshold=0.1)
    assert sd.negative_mass == pytest.approx(float((lam < -0.1).double().mean()), abs=0.03)


def test_float32_ritz_residuals_are_not_below_half_the_true_ones():
    """Old: beta_m |u_mi| underflowed to 0.0 with float32 products."""
    lam = hessian_like_eigenvalues(N, seed=6)
    a = with_eigenvectors(lam, "haar", seed=6)
    from lightning_hessian.estimators.deflation import ritz_vectors
    from lightning_hessian.estimators.lanczos import lanczos

    op = MatrixOperator(a.to(torch.float32))
    sd = spectral_density(op, num_runs=3, num_steps=40, basis_dtype=torch.float32)
    starts = torch.randn(N, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = lanczos(op, starts, 40, basis_dtype=torch.float32)
    theta, _ = result.ritz(0)
    top = [theta.numel() - 1 - i for i in range(5)]
    y = ritz_vectors(result, 0, top)
    true = (a @ y - y * theta[top]).norm(dim=0)
    floor = float(sd.ritz_residuals.min())
    assert floor > 0
    assert torch.all(torch.clamp_min(result.residual_norms[0] * result.ritz(0)[1][-1, top].abs(), floor) >= 0.5 * true)


@pytest.mark.parametrize("kind", ["haar", "axis"])
def test_monitor_top_values_see_a_repeated_outlier_through_the_block_of_runs(kind):
    """One Krylov space holds one copy of a repeated eigenvalue; the runs together see two."""
    lam = hessian_like_eigenvalues(N, seed=7, outliers=(100.0, 100.0, 50.0, 20.0))
    op = MatrixOperator(with_eigenvectors(lam, kind, seed=7))
    hits = 0
    for seed in range(10):
        sd = spectral_density(op, num_runs=3, num_steps=40, seed=seed, grid_size=2)
        values, residuals = sd.top_ritz_values(3)
        assert values.numel() == 3 and torch.all(residuals >= 0)
        assert torch.all(values <= torch.tensor([100.0, 100.0, 50.0], dtype=torch.float64) + 1e-6)  # never above
        hits += int(torch.allclose(values, torch.tensor([100.0, 100.0, 50.0], dtype=torch.float64), atol=1e-6))
    assert hits >= 9
