"""spectral_density (docs/methods/spectral-density.md): stochastic Lanczos quadrature against exact spectra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_hessian._utils.random import draw_probes, make_generator
from lightning_hessian.estimators.density import spectral_density
from lightning_hessian.estimators.trace import hessian_trace
from lightning_hessian.operators import HessianOperator, MatrixOperator

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = (0, 1)


def w1(nodes: torch.Tensor, weights: torch.Tensor, eigvals: torch.Tensor) -> float:
    """1-Wasserstein distance between a discrete measure and the uniform measure on ``eigvals``."""
    from scipy.stats import wasserstein_distance

    return float(
        wasserstein_distance(nodes.reshape(-1).numpy(), eigvals.numpy(), u_weights=weights.reshape(-1).numpy())
    )


def _rotated(eigvals: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(eigvals.numel(), eigvals.numel(), generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * eigvals) @ q.T
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def mlp_op(mlp_truth):
    return HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches)


@pytest.fixture(scope="module")
def slq(mlp_op):
    """Default SLQ (80 steps) on the trained digits MLP: 3 and 8 runs, two seeds each (~16 s)."""
    return {
        (runs, seed): spectral_density(mlp_op, num_runs=runs, num_steps=80, seed=seed)
        for runs in (3, 8)
        for seed in SEEDS
    }


def _assert_weights_are_probabilities(sd) -> None:
    for weights in (sd.weights, sd.deflated_weights):
        if weights is None:
            continue
        assert torch.all(weights >= 0)
        assert torch.allclose(weights.sum(dim=1), torch.ones(sd.num_runs, dtype=torch.float64), atol=1e-12, rtol=0)
    _nodes, weights = sd.measure()
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_mlp_weights_sum_to_one(slq):
    for sd in slq.values():
        assert sd.deflated_weights is not None and sd.num_deflated > 0
        _assert_weights_are_probabilities(sd)
        assert sd.num_hvps == sd.num_runs * 80


def test_mlp_w1_falls_with_runs_and_deflation_helps(slq, mlp_truth):
    ev = mlp_truth.eigvals
    # one run: each run of the 8-run results on its own (no deflation with a single run)
    single = [w1(sd.nodes[r], sd.weights[r], ev) for seed in SEEDS for sd in [slq[8, seed]] for r in range(8)]
    raw = {1: sum(single) / len(single)}
    deflated = {1: raw[1]}
    for runs in (3, 8):
        raw[runs] = sum(w1(slq[runs, s].nodes, slq[runs, s].weights, ev) for s in SEEDS) / len(SEEDS)
        deflated[runs] = sum(w1(slq[runs, s].nodes, slq[runs, s].measure_weights, ev) for s in SEEDS) / len(SEEDS)
    # measured: raw 4.5e-4 > 3.3e-4 > 2.2e-4; deflated 4.5e-4 > 5.8e-5 > 4.6e-5 (lambda_max = 1.44)
    assert raw[1] > raw[3] > raw[8], raw
    assert deflated[1] > deflated[3] > deflated[8], deflated
    assert deflated[3] < 0.5 * raw[3] and deflated[8] < 0.5 * raw[8], (raw, deflated)
    assert deflated[8] < 1e-4  # on a spectrum of width 1.45


def test_mlp_extremes_and_negative_mass(slq, mlp_truth):
    ev = mlp_truth.eigvals
    lam_max = float(ev[-1])
    for seed in SEEDS:
        sd = slq[8, seed]
        assert abs(sd.max_eigenvalue - lam_max) <= 1e-6 * lam_max
        assert sd.min_eigenvalue >= float(ev[0]) - 1e-6 * lam_max  # Ritz values lie inside the spectrum
    # fraction of eigenvalues below -tau, tau = 0.03 x the bulk's scale (the default threshold)
    for s in SEEDS:
        tau = slq[8, s].negative_mass_threshold
        assert 1e-5 < tau < 1e-3  # the bulk's scale, not lambda_max (1.44)
        true_fraction = float((ev < -tau).double().mean())
        # measured 0.109 and 0.173 vs 0.087: 80 nodes over a spectrum with ~60 % of its mass
        # within 1e-5 of 0 pool some of that mass below -tau (see negative_fraction)
        assert slq[8, s].negative_mass == pytest.approx(true_fraction, rel=1.0)
    # with the old absolute threshold 1e-3 * lambda_max the estimate is close to exact
    tau = 1e-3 * float(ev.abs().max())
    estimate = sum(slq[8, s].negative_fraction(threshold=tau) for s in SEEDS) / len(SEEDS)
    assert estimate == pytest.approx(float((ev < -tau).double().mean()), abs=0.005)  # 0.027 exact


def test_trace_samples_are_hutchinson_samples_of_the_same_probes(mlp_truth):
    H, n = mlp_truth.hessian, mlp_truth.num_params
    op = MatrixOperator(H)
    seed, runs = 11, 4
    sd = spectral_density(op, num_runs=runs, num_steps=3, seed=seed)
    probes = draw_probes(n, runs, "rademacher", make_generator(seed))
    exact = (probes * (H @ probes)).sum(dim=0)  # v^T H v, exact Hessian
    assert torch.allclose(sd.trace_samples, exact, rtol=1e-8, atol=0)
    hutchinson = hessian_trace(op, num_probes=runs, seed=seed, batch_size=runs)
    assert torch.allclose(sd.trace_samples, hutchinson.samples, rtol=1e-8, atol=0)
    assert sd.trace == pytest.approx(hutchinson.value, rel=1e-8)
    # Gaussian probes: the samples are n * q^T H q with q = v / ||v||
    sd = spectral_density(op, num_runs=runs, num_steps=3, seed=seed, probe="gaussian")
    v = draw_probes(n, runs, "gaussian", make_generator(seed))
    assert torch.allclose(sd.trace_samples, n * (v * (H @ v)).sum(dim=0) / (v * v).sum(dim=0), rtol=1e-8, atol=0)


def test_trace_samples_real_operator(slq, mlp_truth, mlp_op):
    H, n = mlp_truth.hessian, mlp_truth.num_params
    sd = slq[8, 0]
    probes = draw_probes(n, 8, "rademacher", make_generator(0))
    exact = (probes * (H @ probes)).sum(dim=0)
    assert torch.allclose(sd.trace_samples, exact, rtol=1e-5, atol=0)
    hutchinson = hessian_trace(mlp_op, num_probes=8, seed=0, batch_size=8)
    assert torch.allclose(sd.trace_samples, hutchinson.samples, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# Constructed operators with known spectra
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_clusters():
    """n = 800: 240 eigenvalues U(-2, -1) (30 % negative), 552 U(3, 4), 8 outliers 20..60."""
    g = torch.Generator().manual_seed(1)
    lam = torch.cat(
        [
            -2 + torch.rand(240, generator=g, dtype=torch.float64),
            3 + torch.rand(552, generator=g, dtype=torch.float64),
            torch.linspace(20.0, 60.0, 8, dtype=torch.float64),
        ]
    )
    return lam, MatrixOperator(_rotated(lam, seed=2))


def test_known_spectrum_is_recovered(two_clusters):
    lam, op = two_clusters
    n = lam.numel()
    sd = spectral_density(op, num_runs=8, num_steps=80, seed=0)
    _assert_weights_are_probabilities(sd)
    # extremes: the outliers are found to machine precision; the continuum edge closely
    assert sd.max_eigenvalue == pytest.approx(60.0, rel=1e-10)
    top, top_res = sd.top_ritz_values(8)
    assert torch.allclose(top, torch.linspace(60.0, 20.0, 8, dtype=torch.float64), rtol=1e-8, atol=0)
    assert torch.all(top_res < 1e-6)
    assert float(lam.min()) - 1e-10 <= sd.min_eigenvalue <= float(lam.min()) + 0.02
    # negative mass = the known 30 %
    assert sd.negative_mass == pytest.approx(0.3, abs=0.03)
    assert sd.negative_fraction(0.0) == pytest.approx(0.3, abs=0.03)
    raw_negative = float(sd.spectral_sum(lambda x: (x < 0).double(), deflated=False).mean())
    assert raw_negative == pytest.approx(0.3, abs=0.03)
    # mass of each cluster in the quadrature measure
    nodes, weights = sd.measure()
    mass = lambda lo, hi: float(weights[(nodes >= lo) & (nodes <= hi)].sum())  # noqa: E731
    assert mass(-2.0, -1.0) == pytest.approx(0.3, abs=0.03)
    assert mass(3.0, 4.0) == pytest.approx(0.69, abs=0.03)
    # the outliers are deflated to their exact mass 1/n each
    assert sd.num_deflated == 8
    assert mass(19.0, 61.0) == pytest.approx(8 / n, rel=1e-9)
    # the smoothed density integrates to one and peaks at the clusters, not in the gap
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
    at = sd.density_at(torch.tensor([-1.5, 1.0, 3.5], dtype=torch.float64))
    assert at[0] > 5 * at[1] and at[2] > 5 * at[1]
    peak = float(sd.grid[sd.density.argmax()])
    assert 3.0 <= peak <= 4.0
    left = (sd.grid >= -2.5) & (sd.grid <= 0.0)
    assert -2.0 <= float(sd.grid[left][sd.density[left].argmax()]) <= -1.0
    # deflation helps here too
    assert w1(sd.nodes, sd.measure_weights, lam) < w1(sd.nodes, sd.weights, lam)


def test_single_run_is_not_deflated(two_clusters):
    _lam, op = two_clusters
    sd = spectral_density(op, num_runs=1, num_steps=40, seed=3)
    assert sd.deflated_weights is None and sd.num_deflated == 0
    _assert_weights_are_probabilities(sd)
    off = spectral_density(op, num_runs=3, num_steps=40, seed=3, deflate=False)
    assert off.deflated_weights is None and off.num_deflated == 0


def test_repeated_eigenvalue_is_not_deflated_as_simple():
    """200 exact zeros at the bottom of the spectrum: an extreme, converged Ritz value, but of
    multiplicity 200; its mass is 1/3, and deflation must not give it 1/n."""
    g = torch.Generator().manual_seed(3)
    lam = torch.cat(
        [
            torch.zeros(200, dtype=torch.float64),
            1 + torch.rand(395, generator=g, dtype=torch.float64),
            torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0], dtype=torch.float64),
        ]
    )
    n = lam.numel()
    sd = spectral_density(MatrixOperator(_rotated(lam, seed=4)), num_runs=6, num_steps=60, seed=0)
    _assert_weights_are_probabilities(sd)
    assert sd.num_deflated == 5  # the five simple outliers, not the zero
    at_zero = sd.nodes.abs() < 1e-8  # (rounding errors later add near-copies of weight ~1e-30)
    assert torch.all(at_zero.any(dim=1))  # every run found the eigenvalue 0
    raw_mass = (sd.weights * at_zero).sum(dim=1)
    deflated_mass = (sd.deflated_weights * at_zero).sum(dim=1)
    assert torch.all(deflated_mass > 10 / n)  # not 1/n
    assert float(deflated_mass.mean()) == pytest.approx(1 / 3, abs=0.05)
    assert torch.allclose(deflated_mass, raw_mass, rtol=0.02)  # only rescaled by 1 - 5/n
    assert w1(sd.nodes, sd.measure_weights, lam) <= w1(sd.nodes, sd.weights, lam)
    assert w1(sd.nodes, sd.measure_weights, lam) < 0.05


def test_ritz_value_bounds_ignore_padding_of_runs_that_stopped_early():
    """Eigenvalue 3 lies along (1, -1, 0, ...)/sqrt(2), which a Rademacher probe with v1 == v2
    misses: those runs break down after 2 steps, the others after 3, and the short runs are
    padded. ``top_ritz_values`` promises lower bounds of the i-th largest eigenvalues (5, 3)."""
    n = 12
    e = torch.zeros(n, dtype=torch.float64)
    e[0], e[1] = 2**-0.5, -(2**-0.5)
    u = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u -= (u @ e) * e
    u /= u.norm()
    op = MatrixOperator(torch.eye(n, dtype=torch.float64) + 2 * torch.outer(e, e) + 4 * torch.outer(u, u))
    mixed = 0
    for seed in range(6):
        sd = spectral_density(op, num_runs=4, num_steps=10, seed=seed)
        mixed += len(set(sd.steps)) > 1
        top, _res = sd.top_ritz_values(2)
        assert float(top[0]) == pytest.approx(5.0, abs=1e-12)
        assert float(top[1]) <= 3.0 + 1e-12  # never the padded copy of 5
        if 3 in sd.steps:
            assert float(top[1]) == pytest.approx(3.0, abs=1e-12)
        bottom, _ = sd.bottom_ritz_values(2)
        assert torch.all(bottom >= 1.0 - 1e-12)
        _assert_weights_are_probabilities(sd)
    assert mixed >= 2  # the situation under test occurred
