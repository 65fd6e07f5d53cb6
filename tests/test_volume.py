"""Tests of :func:`lightning_hessian.volume.local_volume` (docs/methods/local-volume.md, paper §3)."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.errors import HessianComputationError
from lightning_hessian.volume import (
    EPS_GRID,
    MissingOptimizerStateError,
    VolumeComputationError,
    ggn_diagonal,
    init_prior_std,
    local_volume,
    log_radial_gaussian_integral,
)
from lightning_hessian.volume.radius import find_radii


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models: intra-op threads only add overhead (and oversubscribe a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Fixtures: an exactly quadratic cost, and a trained digits MLP
# --------------------------------------------------------------------------------------------

OUT, IN, N = 4, 10, 200


def _quadratic_problem(curvatures: torch.Tensor, n_rows: int = N, seed: int = 1):
    """Linear model f(x) = W x with inputs whose Gram matrix X^T X / N = diag(curvatures).

    With the Gaussian-output cost C = 1/2 mean ||(W' - W) x||^2 the cost is exactly
    1/2 d^T F d with F = diag(curvatures) repeated for every output row (row-major W).
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_rows, curvatures.numel(), generator=gen, dtype=torch.float64))
    x = q * curvatures.sqrt() * math.sqrt(n_rows)
    model = nn.Linear(curvatures.numel(), OUT, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(OUT, curvatures.numel(), generator=gen, dtype=torch.float64))
    half = n_rows // 2
    data = [(x[:half],), (x[half:],)]
    return model, data, curvatures.repeat(OUT)


def _closed_form_log_volume(fisher_diag: torch.Tensor, cutoff: float) -> float:
    n = fisher_diag.numel()
    return (
        0.5 * n * math.log(math.pi)
        - math.lgamma(0.5 * n + 1)
        + 0.5 * n * math.log(2 * cutoff)
        - 0.5 * float(fisher_diag.log().sum())
    )


@pytest.fixture(scope="module")
def digits():
    """MLP 64-64-10 with ReLU (4,810 parameters) trained briefly with Adam on sklearn digits."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x_np, y_np = sklearn_datasets.load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)  # inputs scaled to [0, 1]
    y = torch.tensor(y_np)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    n_analysis = len(x) // 10  # analysis set: 10 % of the data (179 images)
    analysis, train = perm[:n_analysis], perm[n_analysis:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    prior = init_prior_std(model)  # snapshot at initialisation
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        idx = train[torch.randint(0, len(train), (128,), generator=gen)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = [(x[analysis[:90]], y[analysis[:90]]), (x[analysis[90:]], y[analysis[90:]])]
    return model, optimizer, data, prior


@pytest.fixture(scope="module")
def digits_estimates(digits):
    """Naive and Adam-preconditioned KL-cost estimates under the Gaussian measure N(0, 1)."""
    model, optimizer, data, _ = digits
    naive = local_volume(model, data, prior_std=1.0, num_directions=100, seed=0)
    adam = local_volume(
        model, data, prior_std=1.0, num_directions=100, seed=0, preconditioner="adam", optimizer=optimizer
    )
    return naive, adam


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------


def test_quadratic_lebesgue_matches_closed_form_with_exact_preconditioner():
    curv = torch.logspace(-1, 1, IN, dtype=torch.float64)
    model, data, fisher = _quadratic_problem(curv)
    cutoff = 1e-2
    closed = _closed_form_log_volume(fisher, cutoff)
    k = 50
    exact = local_volume(
        model, data, cost="gaussian", measure="lebesgue", cutoff=cutoff, num_directions=k, preconditioner=fisher.rsqrt()
    )
    naive = local_volume(model, data, cost="gaussian", measure="lebesgue", cutoff=cutoff, num_directions=k)
    assert exact.num_params == OUT * IN
    assert abs(exact.log_volume - closed) < 1.0
    assert abs(exact.log_volume - closed) < 1e-6  # zero-variance estimator, radii to ~1e-10
    assert exact.log_contribution_std < 1e-8
    assert naive.log_volume < closed + math.log(k)
    assert naive.log_volume < exact.log_volume - 1.0
    assert naive.num_capped == exact.num_capped == 0
    assert math.isclose(exact.lebesgue_log_volume, exact.log_volume)
    assert math.isclose(exact.description_length_bits, -exact.log_volume / math.log(2))
    assert math.isclose(exact.log10_probability, exact.log_volume / math.log(10))
    # The exact Gauss-Newton diagonal, and Hutchinson's diag(H) (exact for a diagonal Hessian):
    # with eps = 0 both "hessian_diag" preconditioners are the exact one.
    common = dict(cost="gaussian", measure="lebesgue", cutoff=cutoff, num_directions=8, preconditioner_eps=0.0)
    hdiag = local_volume(model, data, preconditioner="hessian_diag", **common)
    assert abs(hdiag.log_volume - closed) < 1e-6
    assert hdiag.preconditioner_hvps == 0 and hdiag.preconditioner_passes == N * OUT  # one row per output
    hutch = local_volume(model, data, preconditioner="hessian_diag_hutchinson", preconditioner_probes=4, **common)
    assert abs(hutch.log_volume - closed) < 1e-6
    assert hutch.preconditioner_hvps == 4


def test_loss_cost_on_least_squares_matches_closed_form():
    # L(w) = mean (x^T w - y)^2 at its minimiser: L(w) - L(w*) = d^T (X^T X / N) d, F = 2 diag(curv).
    curv = torch.logspace(-0.5, 0.5, IN, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(N, IN, generator=gen, dtype=torch.float64))
    x = q * curv.sqrt() * math.sqrt(N)
    y = x @ torch.randn(IN, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        N, generator=gen, dtype=torch.float64
    )
    model = nn.Linear(IN, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.t())
    data = [(x[:100], y[:100]), (x[100:], y[100:])]
    fisher = 2 * curv
    closed = _closed_form_log_volume(fisher, 1e-2)

    def mse(out, target):
        return F.mse_loss(out.squeeze(-1), target)

    est = local_volume(
        model, data, cost="loss", loss_fn=mse, measure="lebesgue", num_directions=10, preconditioner=fisher.rsqrt()
    )
    assert abs(est.log_volume - closed) < 1e-6
    est2 = local_volume(
        model,
        data,
        cost="loss",
        batch_loss=lambda m, b: mse(m(b[0]), b[1]),
        measure="lebesgue",
        num_directions=10,
        preconditioner=fisher.rsqrt(),
    )
    assert abs(est2.log_volume - est.log_volume) < 1e-9


def _ball_problem(weight_scale: float, seed: int = 2):
    """Orthonormal inputs: the Gaussian-output cost is 1/2 ||W' - W||_F^2 (a ball of radius sqrt(2c))."""
    out_dim, in_dim, rows = 4, 16, 64
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, in_dim, generator=gen, dtype=torch.float64))
    model = nn.Linear(in_dim, out_dim, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weight_scale * torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64))
    return model, [(q * math.sqrt(rows),)], out_dim * in_dim


@pytest.mark.parametrize(
    ("weight_scale", "prior_std", "cutoff"),
    [
        (0.0, 0.05, 1e-2),  # central chi^2, r < t*
        (0.0, 0.015, 1e-2),  # central chi^2, r > t* (probability close to one)
        (0.002, 0.02, 1e-2),  # non-central, r < t*
        (0.002, 0.012, 1e-2),  # non-central, r > t*
    ],
)
def test_ball_gaussian_measure_matches_ncx2(weight_scale, prior_std, cutoff):
    stats = pytest.importorskip("scipy.stats")
    model, data, n = _ball_problem(weight_scale)
    radius = math.sqrt(2 * cutoff)
    lam = float((model.weight.detach() ** 2).sum()) / prior_std**2
    exact = float(
        stats.ncx2.logcdf(radius**2 / prior_std**2, n, lam)
        if lam > 0
        else stats.chi2.logcdf(radius**2 / prior_std**2, n)
    )
    est = local_volume(model, data, cost="gaussian", cutoff=cutoff, prior_std=prior_std, num_directions=100)
    assert abs(est.log_volume - exact) < 0.1, (est.log_volume, exact)
    # Every direction has the same, known radius.
    assert torch.all((est.log_radii - math.log(radius)).abs() <= 1e-4)
    assert est.description_length_bits == pytest.approx(-est.log_volume / math.log(2))


def test_radial_integral_against_incomplete_gamma_and_quadrature():
    special = pytest.importorskip("scipy.special")
    np = pytest.importorskip("numpy")
    f64 = torch.float64
    # b = 0: 1/2 (2/a)^{n/2} gamma_lower(n/2, a r^2 / 2)
    for n in (50, 500, 4810, 10**6):
        for a in (0.5, 3.0):
            t_star = math.sqrt((n - 1) / a)
            for r in (0.1 * t_star, 0.9 * t_star, t_star, 1.5 * t_star, 30 * t_star):
                reg = special.gammainc(n / 2, a * r * r / 2)  # regularised lower incomplete gamma
                if not reg > 0:  # underflows for r far below t* at large n
                    continue
                exact = math.log(0.5) + (n / 2) * math.log(2 / a) + special.gammaln(n / 2) + math.log(reg)
                got = log_radial_gaussian_integral(
                    torch.tensor([a], dtype=f64), torch.zeros(1, dtype=f64), n, torch.tensor([r], dtype=f64)
                )
                assert abs(float(got) - exact) < 0.25 / math.sqrt(n), (n, a, r, float(got), exact)
    # b != 0: quadrature in log space
    for n in (50, 400):
        for a, b in ((0.3, -5.0), (2.0, 0.5), (2.0, 5.0), (0.3, 40.0)):
            for r in (0.2, 1.0, 5.0):
                ts = np.linspace(1e-12, r, 400001)
                g = -0.5 * a * ts * ts - b * ts + (n - 1) * np.log(ts)
                exact = g.max() + math.log(np.trapezoid(np.exp(g - g.max()), ts))
                got = log_radial_gaussian_integral(
                    torch.tensor([a], dtype=f64), torch.tensor([b], dtype=f64), n, torch.tensor([r], dtype=f64)
                )
                assert abs(float(got) - exact) < 0.25 / math.sqrt(n), (n, a, b, r, float(got), exact)


# --------------------------------------------------------------------------------------------
# Radius finder
# --------------------------------------------------------------------------------------------


def _known_root_problem(num: int):
    gen = torch.Generator().manual_seed(0)
    a = torch.exp(2 * torch.randn(num, generator=gen, dtype=torch.float64))
    kappa = 0.6 * torch.rand(num, generator=gen, dtype=torch.float64)
    cutoff = 1e-2

    def cost(idx, t):  # near quadratic: 1/2 a t^2 (1 + kappa t + 0.3 kappa t^2)
        return 0.5 * a[idx] * t**2 * (1 + kappa[idx] * t + 0.3 * kappa[idx] * t**2)

    # Known roots to machine precision by bisection on the monotone cost.
    lo = torch.full((num,), 1e-12, dtype=torch.float64)
    hi = torch.full((num,), 1e3, dtype=torch.float64)
    idx = torch.arange(num)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = cost(idx, mid) >= cutoff
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return cost, cutoff, 0.5 * (lo + hi)


@pytest.mark.parametrize("x0", [-5.0, 0.0, 3.0])
def test_radius_finder_accuracy_and_passes(x0):
    num = 200
    cost, cutoff, roots = _known_root_problem(num)
    calls = []

    def evaluate(idx, t):
        calls.append(len(idx))
        return cost(idx, t)

    res = find_radii(evaluate, torch.full((num,), x0, dtype=torch.float64), cutoff=cutoff, rel_tol=1e-4)
    rel_err = (res.log_radius.exp() - roots).abs() / roots
    assert res.converged.all() and not res.capped.any()
    assert rel_err.max() <= 1e-4
    assert res.evaluations.double().mean() <= 8
    assert sum(calls) == int(res.evaluations.sum())  # one batched call per iteration
    bis = find_radii(cost, torch.full((num,), x0, dtype=torch.float64), cutoff=cutoff, rel_tol=1e-4, method="bisection")
    assert ((bis.log_radius.exp() - roots).abs() / roots).max() <= 1e-4
    assert bis.evaluations.double().mean() >= 2.5 * res.evaluations.double().mean()


def test_radius_finder_exact_quadratic_needs_three_evaluations_and_caps():
    a = torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64)
    res = find_radii(
        lambda idx, t: 0.5 * a[idx] * t**2,
        torch.zeros(3, dtype=torch.float64),
        cutoff=1e-2,
        log_max_radius=math.log(1e3),
    )
    assert res.evaluations[:2].tolist() == [3, 3]
    assert torch.allclose(res.log_radius[:2], torch.log(torch.sqrt(2e-2 / a[:2])), atol=1e-12)
    assert res.capped.tolist() == [False, False, True]
    assert res.log_radius[2] == pytest.approx(math.log(1e3))


def test_unconverged_directions_are_reported_conservatively():
    model, data, _n = _ball_problem(0.0)
    radius = math.sqrt(2e-2)
    est = local_volume(model, data, cost="gaussian", measure="lebesgue", num_directions=4, max_evaluations=2)
    assert est.num_unconverged == 4 and not est.converged.any()
    assert torch.all(est.evaluations == 2)
    # The reported radius is a point known to be inside (or -inf): never above the true one.
    assert torch.all(est.log_radii <= math.log(radius) + 1e-12)


def test_known_radii_of_a_non_quadratic_cost_end_to_end():
    # A model that returns its own (anchor-centred) weights: with cost 1/2 d^2 + d^4 (d = ||W' - W||)
    # every direction's radius solves 1/2 r^2 + r^4 = c.
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return self.w.unsqueeze(0).expand(x.shape[0], -1)

    def cost(outputs, anchor, batch):
        d2 = ((outputs - anchor) ** 2).sum(-1)
        return 0.5 * d2 + d2**2

    cutoff = 0.3
    true_r = math.sqrt((-0.5 + math.sqrt(0.25 + 4 * cutoff)) / 2)
    est = local_volume(
        Weights(), [(torch.zeros(3, 1),)], cost=cost, cutoff=cutoff, measure="lebesgue", num_directions=20
    )
    rel_err = (est.log_radii.exp() - true_r).abs() / true_r
    assert rel_err.max() <= 1e-4
    assert est.forward_passes_per_direction <= 8


# --------------------------------------------------------------------------------------------
# The digits MLP (the paper's small network)
# --------------------------------------------------------------------------------------------


def test_digits_adam_preconditioner_beats_naive(digits, digits_estimates):
    naive, adam = digits_estimates
    assert naive.num_params == adam.num_params == 4810
    assert naive.measure == adam.measure == "gaussian"
    assert adam.preconditioner == "adam" and naive.preconditioner == "none"
    for est in (naive, adam):
        assert math.isfinite(est.log_volume) and est.log_volume < 0
        assert est.num_capped == 0 and est.num_unconverged == 0
        assert est.log_contributions.shape == (100,)
        assert est.log_volume == pytest.approx(float(torch.logsumexp(est.log_contributions, 0)) - math.log(100))
        assert est.log_volume >= float(est.log_contributions.max()) - math.log(100)
    # The paper's central empirical result: a larger (hence better) estimate, smaller spread.
    assert adam.log_volume > naive.log_volume + 100
    assert adam.log_contribution_std < naive.log_contribution_std
    # Under the (much narrower) initialisation prior, s ~ 0.07, radii (~2.7) are comparable to
    # the prior's own scale (t* ~ s sqrt(n) ~ 5): stretching flat coordinates far beyond it loses
    # (rho <= 1.5 loses to naive there); the default rho = 3 still wins.
    model, optimizer, data, prior = digits
    naive_init = local_volume(model, data, prior_std=prior, num_directions=100, seed=0)
    adam_init = local_volume(
        model, data, prior_std=prior, num_directions=100, seed=0, preconditioner="adam", optimizer=optimizer
    )
    assert adam_init.log_volume > naive_init.log_volume
    assert adam_init.preconditioner_eps_relative == 3.0
    scale = _adam_scale(optimizer, model)
    assert adam_init.preconditioner_eps == pytest.approx(
        3.0 * float(scale[scale > 0].median())
    )  # median of sqrt(v_hat) > 0


def _adam_scale(optimizer, model):
    """sqrt of the bias-corrected second moments, by hand."""
    blocks = []
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = optimizer.state[p]
            blocks.append((state["exp_avg_sq"].double() / (1 - beta2 ** int(state["step"]))).sqrt().reshape(-1))
    return torch.cat(blocks)


def _scaled_adam(model, optimizer, scale):
    """An Adam whose state is the one reached with the loss multiplied by ``scale`` (same updates)."""
    other = torch.optim.Adam(model.parameters(), lr=3e-3)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for state in other.state.values():
        state["exp_avg_sq"].mul_(scale * scale)
        state["exp_avg"].mul_(scale)
    return other


@pytest.mark.parametrize("prior_kind", ["standard", "init"])
def test_digits_adam_preconditioner_is_loss_scale_free(digits, prior_kind):
    model, optimizer, data, prior = digits
    prior_std = 1.0 if prior_kind == "standard" else prior
    naive = local_volume(model, data, prior_std=prior_std, num_directions=100, seed=0)
    base = local_volume(
        model, data, prior_std=prior_std, num_directions=100, seed=0, preconditioner="adam", optimizer=optimizer
    )
    for scale in (0.01, 10.0, 1000.0):
        est = local_volume(
            model,
            data,
            prior_std=prior_std,
            num_directions=100,
            seed=0,
            preconditioner="adam",
            optimizer=_scaled_adam(model, optimizer, scale),
        )
        assert abs(est.log_volume - base.log_volume) < 10.0, scale
        assert est.log_volume >= naive.log_volume, scale
    # The raw buffer with an absolute eps (the old default) moved by > 1,000 nats between loss x1
    # and x10 on this model; the bias correction is applied with each parameter's step count.
    assert base.log_volume >= naive.log_volume


@pytest.mark.parametrize("prior_kind", ["standard", "init"])
def test_digits_exact_hessian_diagonal_beats_naive(digits, prior_kind):
    model, _, data, prior = digits
    prior_std = 1.0 if prior_kind == "standard" else prior
    naive = local_volume(model, data, prior_std=prior_std, num_directions=100, seed=0)
    hdiag = local_volume(model, data, prior_std=prior_std, num_directions=100, seed=0, preconditioner="hessian_diag")
    assert hdiag.log_volume >= naive.log_volume
    assert hdiag.preconditioner_passes == 179 * 10  # one Jacobian row per (example, class)
    assert hdiag.preconditioner_hvps == 0


def test_digits_auto_eps_is_the_best_of_the_grid_with_its_price(digits):
    model, optimizer, data, prior = digits
    kwargs = dict(prior_std=prior, num_directions=30, seed=0, preconditioner="adam", optimizer=optimizer)
    auto = local_volume(model, data, preconditioner_eps="auto", **kwargs)
    singles = {rho: local_volume(model, data, preconditioner_eps=rho, **kwargs) for rho in EPS_GRID}
    best_rho = max(singles, key=lambda rho: singles[rho].log_volume)
    assert auto.preconditioner_eps_relative == best_rho
    assert auto.log_volume == singles[best_rho].log_volume  # shared directions: the same numbers
    assert auto.selection_log_penalty == pytest.approx(math.log(len(EPS_GRID)))
    assert auto.log_volume_lower_bound(0.9) == pytest.approx(auto.log_volume + math.log(0.1) - math.log(len(EPS_GRID)))
    assert auto.num_forward_passes == sum(int(e.evaluations.sum()) for e in singles.values()) + 1


def test_confidence_is_reported(digits_estimates):
    for est in digits_estimates:
        assert 1.0 <= est.effective_sample_size <= est.num_directions
        assert 0.0 < est.top_weight_share <= 1.0
        # Kish's ESS from the log weights, by hand.
        w = torch.exp(est.log_contributions - est.log_contributions.max())
        assert est.effective_sample_size == pytest.approx(float(w.sum() ** 2 / (w * w).sum()))
        assert est.top_weight_share == pytest.approx(float(w.max() / w.sum()))
        assert est.log_volume_lower_bound(0.95) == pytest.approx(est.log_volume + math.log(0.05))
        assert est.log_volume_lower_bound(0.5) < est.log_volume
        metrics = est.metrics()
        assert metrics["effective_sample_size"] == est.effective_sample_size
        assert metrics["log_volume_lower_bound"] == est.log_volume_lower_bound(0.95)
    with pytest.raises(ValueError, match="confidence"):
        digits_estimates[0].log_volume_lower_bound(1.0)


def test_digits_forward_passes_versus_bisection(digits, digits_estimates):
    model, _, data, prior = digits
    naive, adam = digits_estimates
    assert naive.forward_passes_per_direction <= 8
    assert adam.forward_passes_per_direction <= 8
    assert naive.num_forward_passes == int(naive.evaluations.sum()) + 1
    bis = local_volume(model, data, prior_std=prior, num_directions=20, seed=0, root_finder="bisection")
    sec = local_volume(model, data, prior_std=prior, num_directions=20, seed=0)
    assert bis.forward_passes_per_direction >= 2.5 * sec.forward_passes_per_direction
    # Same tolerance, same directions: the radii agree to the tolerance.
    assert torch.all((bis.log_radii - sec.log_radii).abs() <= 2e-4)


def test_directions_do_not_depend_on_grouping(digits):
    model, _, data, prior = digits
    a = local_volume(model, data, prior_std=prior, num_directions=12, seed=5)
    b = local_volume(model, data, prior_std=prior, num_directions=12, seed=5, directions_per_batch=5)
    assert torch.allclose(a.log_direction_norms, b.log_direction_norms)
    assert torch.all((a.log_radii - b.log_radii).abs() <= 2e-4)
    c = local_volume(model, data, prior_std=prior, num_directions=12, seed=6)
    assert not torch.allclose(a.log_radii, c.log_radii)


# --------------------------------------------------------------------------------------------
# Side effects, distributed reduction, costs
# --------------------------------------------------------------------------------------------


def _snapshot(model, optimizer):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "opt": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state().clone(),
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert torch.equal(before["rng"], after["rng"])
    s0, s1 = before["opt"], after["opt"]
    assert s0["param_groups"] == s1["param_groups"]
    for pid, st in s0["state"].items():
        for key, value in st.items():
            other = s1["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_no_side_effects_on_model_optimizer_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter is not perturbed
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.train()
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    before = _snapshot(model, optimizer)
    for kwargs in (
        dict(preconditioner="adam", optimizer=optimizer),
        dict(preconditioner="adam_exp_avg", optimizer=optimizer),
        dict(preconditioner="hessian_diag", preconditioner_probes=4),
        dict(measure="lebesgue"),
        dict(cost="loss", loss_fn=F.cross_entropy, measure="lebesgue"),
    ):
        est = local_volume(model, data, num_directions=4, prior_std=init_prior_std(model), **kwargs)
        assert est.num_params == sum(p.numel() for p in model.parameters()) - 12
        _assert_same(before, _snapshot(model, optimizer))
    assert model.training and model[3].training


class _ThreadGroup:
    """Fake process group: ranks are threads; all_reduce sums the ranks' tensors in rank order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def all_reduce(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()
            return total

        return reduce


def _run_ranks(model, optimizer, shards, **kwargs):
    """Run local_volume on one model replica per shard, in threads joined by a fake all_reduce."""
    group = _ThreadGroup(len(shards))
    results: list = [None] * len(shards)
    errors: list = []

    def rank_main(rank: int) -> None:
        try:
            replica = copy.deepcopy(model)
            opt = torch.optim.Adam(replica.parameters())
            opt.load_state_dict(optimizer.state_dict())
            results[rank] = local_volume(
                replica, shards[rank], all_reduce=group.all_reduce(rank), optimizer=opt, **kwargs
            )
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_two_shard_all_reduce_equals_single_process(digits):
    model, optimizer, data, prior = digits
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    batches = [(x[i : i + 45], y[i : i + 45]) for i in range(0, len(x), 45)]
    kwargs = dict(prior_std=prior, num_directions=16, preconditioner="adam")
    single = local_volume(model, batches, seed=3, optimizer=optimizer, **kwargs)
    identity = local_volume(model, batches, seed=3, optimizer=optimizer, all_reduce=lambda t: t, **kwargs)
    assert identity.log_volume == pytest.approx(single.log_volume, abs=1e-8)

    results = _run_ranks(model, optimizer, [batches[:2], batches[2:]], seed=3, **kwargs)
    for res in results:
        assert res.log_volume == pytest.approx(single.log_volume, abs=1e-8)
        assert torch.allclose(res.log_radii, single.log_radii, atol=1e-10, rtol=0)
        assert torch.equal(res.evaluations, single.evaluations)
    # The exact Gauss-Newton diagonal and the flat-coordinate check reduce across shards too.
    for extra in (dict(preconditioner="hessian_diag"), dict(preconditioner=None, measure="lebesgue", prior_std=1.0)):
        options = {**kwargs, "num_directions": 6, **extra}
        single = local_volume(model, batches, seed=3, optimizer=optimizer, **options)
        for res in _run_ranks(model, optimizer, [batches[:2], batches[2:]], seed=3, **options):
            assert res.log_volume == pytest.approx(single.log_volume, abs=1e-8) or res.log_volume == single.log_volume
            assert torch.allclose(res.log_radii, single.log_radii, atol=1e-10, rtol=0)
            assert res.flat_parameters == single.flat_parameters
    # seed=None: each rank draws its own seed, the reduced (summed) seed is shared.
    kwargs["num_directions"] = 4
    unseeded = _run_ranks(model, optimizer, [batches[:2], batches[2:]], seed=None, **kwargs)
    assert torch.equal(unseeded[0].log_radii, unseeded[1].log_radii)


def test_sequence_outputs_with_mask_equal_truncated_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))  # per-position classifier
    x = torch.randn(2, 6, 7, 5)  # 2 batches of [B=6, T=7, features]
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, :4] = True
    full = [(x[i],) for i in range(2)]
    truncated = [(x[i, :, :4],) for i in range(2)]
    a = local_volume(model, full, mask_fn=lambda b: mask, num_directions=6, measure="lebesgue")
    b = local_volume(model, truncated, num_directions=6, measure="lebesgue")
    assert a.log_volume == pytest.approx(b.log_volume, abs=1e-6)
    c = local_volume(model, full, num_directions=6, measure="lebesgue")
    assert abs(c.log_volume - b.log_volume) > 1e-3


def test_vmap_fallback_gives_the_same_answer():
    class NotVmappable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            if self.lin.weight.sum().item() > 1e9:  # .item() is not vmap-compatible
                raise AssertionError
            return self.lin(x)

    torch.manual_seed(0)
    model = NotVmappable()
    data = [(torch.randn(16, 4),)]
    with pytest.warns(RuntimeWarning, match="vmap"):
        slow = local_volume(model, data, num_directions=5)
    plain = nn.Linear(4, 3)
    plain.load_state_dict(model.lin.state_dict())
    fast = local_volume(plain, data, num_directions=5)
    assert slow.log_volume == pytest.approx(fast.log_volume, abs=1e-6)


def test_gaussian_measure_finite_when_lebesgue_is_capped():
    # bias[1] has no effect on the outputs; P concentrated on it makes every direction (nearly)
    # flat, so every radius hits max_radius: the Lebesgue volume is infinite, the Gaussian finite.
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(8, 3, dtype=torch.float64),)]

    def output_fn(m, batch):
        out = m(batch[0])
        return torch.cat([out[:, :1], out[:, 1:] - m.bias[1]], dim=1)

    p = torch.ones(8, dtype=torch.float64)
    p[-1] = 1e12  # flat order: weight (6 entries), then bias (2 entries)
    kwargs = dict(output_fn=output_fn, preconditioner=p, num_directions=3, max_radius=50.0)
    leb = local_volume(model, data, measure="lebesgue", **kwargs)
    assert leb.num_capped == 3 and leb.capped.all()
    assert leb.log_volume == math.inf and leb.description_length_bits == -math.inf
    assert torch.isfinite(leb.lebesgue_log_contributions).all()
    assert torch.allclose(leb.log_radii, torch.full((3,), math.log(50.0), dtype=torch.float64))
    gauss = local_volume(model, data, **kwargs)
    assert gauss.num_capped == 3 and math.isfinite(gauss.log_volume) and gauss.log_volume < 0


# --------------------------------------------------------------------------------------------
# Prior helper and input validation
# --------------------------------------------------------------------------------------------


def test_init_prior_std_fallbacks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 20), nn.LayerNorm(20), nn.Linear(20, 2))
    nn.init.zeros_(model[0].bias)
    stds = init_prior_std(model, fallback=0.5)
    assert set(stds) == {name for name, _ in model.named_parameters()}
    assert stds["0.weight"] == pytest.approx(float(model[0].weight.detach().double().std(unbiased=False)))
    assert stds["0.bias"] == stds["0.weight"]  # zero-initialised bias -> its weight's std
    assert stds["1.weight"] == stds["1.bias"] == 0.5  # constant LayerNorm affine -> fallback
    assert stds["2.bias"] == pytest.approx(float(model[2].bias.detach().double().std(unbiased=False)))
    # Per-tensor mappings (floats or tensors) are accepted by local_volume.
    data = [(torch.randn(8, 50),)]
    est = local_volume(model, data, num_directions=2, prior_std=stds)
    tensors = {k: torch.full(p.shape, stds[k], dtype=torch.float64) for k, p in model.named_parameters()}
    est2 = local_volume(model, data, num_directions=2, prior_std=tensors)
    assert est.log_volume == pytest.approx(est2.log_volume, abs=1e-9)
    with pytest.raises(ValueError, match="no entry"):
        local_volume(model, data, num_directions=2, prior_std={"0.weight": 1.0})


def test_bad_inputs_raise_clearly():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="cutoff"):
        local_volume(model, data, cutoff=0.0)
    with pytest.raises(ValueError, match="cutoff"):
        local_volume(model, data, cutoff=-1e-2)
    with pytest.raises(ValueError, match="num_directions"):
        local_volume(model, data, num_directions=0)
    with pytest.raises(TypeError, match="num_directions"):
        local_volume(model, data, num_directions=2.5)
    with pytest.raises(ValueError, match="preconditioner"):
        local_volume(model, data, preconditioner="kfac")
    with pytest.raises(ValueError, match="optimizer"):
        local_volume(model, data, preconditioner="adam")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(data[0][0]).sum().backward()
    sgd.step()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        local_volume(model, data, preconditioner="adam", optimizer=sgd)
    fresh_adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="at least one step"):
        local_volume(model, data, preconditioner="adam", optimizer=fresh_adam)
    with pytest.raises(ValueError, match="measure"):
        local_volume(model, data, measure="uniform")
    with pytest.raises(ValueError, match="cost"):
        local_volume(model, data, cost="mse")
    with pytest.raises(ValueError, match="init_prior_std"):
        local_volume(model, data, prior_std="init")
    with pytest.raises(ValueError, match="prior_std"):
        local_volume(model, data, prior_std=0.0)
    with pytest.raises(ValueError, match="root_finder"):
        local_volume(model, data, root_finder="newton")
    with pytest.raises(ValueError, match="positive"):
        local_volume(model, data, preconditioner=-torch.ones(15))
    with pytest.raises(ValueError, match="num_params"):
        local_volume(model, data, preconditioner=torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        local_volume(model, data, output_fn=lambda m, b: m(b[0]).argmax(-1))
    with pytest.raises(ValueError, match="class dimension"):
        local_volume(model, data, output_fn=lambda m, b: m(b[0])[:, 0])
    with pytest.raises(TypeError, match="loss_fn"):
        local_volume(model, data, cost="loss")


def test_nan_cost_raises_a_hessian_computation_error():
    class Fragile(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.anchor = self.lin.weight.detach().clone()

        def forward(self, x):
            moved = (self.lin.weight - self.anchor).abs().max()
            out = self.lin(x)
            # NaN as soon as the weights move noticeably (long before the KL reaches the cutoff).
            return out + torch.where(moved > 1e-3, torch.nan, 0.0)

    torch.manual_seed(0)
    model = Fragile()
    data = [(torch.randn(8, 4),)]
    with pytest.raises(VolumeComputationError, match="NaN") as info:
        local_volume(model, data, num_directions=3, cutoff=10.0)
    assert isinstance(info.value, HessianComputationError)
    bad = nn.Linear(4, 3)
    with torch.no_grad():
        bad.bias.fill_(float("nan"))
    with pytest.raises(HessianComputationError, match="anchor"):
        local_volume(bad, data, num_directions=3)


def test_no_warnings_on_the_common_path(digits):
    model, optimizer, data, prior = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        local_volume(model, data, prior_std=prior, num_directions=3, preconditioner="adam", optimizer=optimizer)


# --------------------------------------------------------------------------------------------
# The exact Gauss-Newton diagonal
# --------------------------------------------------------------------------------------------


def _exact_cost_hessian_diagonal(model, data, cost, mask_fn=None):
    """diag of the float64 Hessian of the KL/Gaussian cost at the anchor, by double backward."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        anchors = [model(batch[0]) for batch in data]

    def total_cost(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        num, den = 0.0, 0.0
        for batch, anchor in zip(data, anchors, strict=False):
            out = torch.func.functional_call(model, params, (batch[0],))
            if cost == "kl":
                log_p = torch.log_softmax(anchor, -1)
                per = (log_p.exp() * (log_p - torch.log_softmax(out, -1))).sum(-1)
            else:
                per = 0.5 * (out - anchor).pow(2).sum(-1)
            mask = mask_fn(batch).double() if mask_fn is not None else torch.ones_like(per)
            num = num + (per * mask).sum()
            den = den + mask.sum()
        return num / den

    hessian = torch.autograd.functional.hessian(total_cost, theta)
    assert torch.allclose(hessian, hessian.T, atol=1e-12)
    return torch.diagonal(hessian)


class _TinySequenceModel(nn.Module):
    """Embedding-free sequence classifier: [B, T, 3] -> LayerNorm -> tanh MLP -> [B, T, 4]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.hidden = nn.Linear(3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.norm(x))))


@pytest.mark.parametrize("cost", ["kl", "gaussian"])
def test_ggn_diagonal_matches_the_exact_hessian_diagonal(cost):
    from lightning_hessian.volume.cost import CostEvaluator, default_output_fn

    torch.manual_seed(3)
    model = _TinySequenceModel().double()
    with torch.no_grad():
        model.norm.weight.add_(0.3 * torch.randn(3, dtype=torch.float64))  # no symmetric LayerNorm
    gen = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(6, 5, 3, generator=gen, dtype=torch.float64), torch.rand(6, 5, generator=gen) > 0.3)
        for _ in range(2)
    ]

    def mask_fn(batch):
        return batch[1]

    params = list(model.parameters())
    evaluator = CostEvaluator(
        model,
        data,
        cost=cost,
        output_fn=default_output_fn,
        batch_loss=None,
        mask_fn=mask_fn,
        batch_size_fn=lambda b: float(len(b[0])),
        names=[n for n, _ in model.named_parameters()],
        params=params,
        all_reduce=None,
    )
    diag, rows = ggn_diagonal(evaluator)
    exact = _exact_cost_hessian_diagonal(model, data, cost, mask_fn)
    assert rows == 2 * 6 * 5 * 4
    assert torch.allclose(diag, exact, rtol=1e-6, atol=1e-12 * float(exact.abs().max()))
    # The per-example loop fallback gives the same numbers.
    evaluator._ggn_vmap_ok = False
    looped, _ = ggn_diagonal(evaluator)
    assert torch.allclose(looped, diag, rtol=1e-10, atol=1e-15)


def test_ggn_diagonal_needs_a_kl_or_gaussian_cost():
    model = nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="hessian_diag_hutchinson"):
        local_volume(model, data, cost="loss", loss_fn=F.cross_entropy, preconditioner="hessian_diag", num_directions=2)


# --------------------------------------------------------------------------------------------
# Clear failures
# --------------------------------------------------------------------------------------------


def test_cost_above_the_cutoff_at_the_anchor_raises_naming_the_cutoff():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = [(torch.randn(8, 4),)]

    def offset_cost(outputs, anchor_outputs, batch):
        return 0.5 * (outputs - anchor_outputs).pow(2).sum(-1) + 0.02  # C(theta) = 0.02

    with pytest.raises(ValueError, match=r"cutoff = 0\.01"):
        local_volume(model, data, cost=offset_cost, cutoff=1e-2, num_directions=2)
    est = local_volume(model, data, cost=offset_cost, cutoff=0.05, num_directions=2, measure="lebesgue")
    assert math.isfinite(est.log_volume)


def test_zero_radius_contributes_minus_infinity_never_nan():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, -1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 1.5], dtype=torch.float64)
    values = log_radial_gaussian_integral(a, b, 10, r)
    assert values[0] == -math.inf
    assert torch.isfinite(values[1])
    from lightning_hessian.volume.measure import (
        gaussian_log_contributions,
        lebesgue_log_contributions,
    )

    log_r = torch.tensor([-math.inf, 0.0], dtype=torch.float64)
    log_vn = torch.zeros(2, dtype=torch.float64)
    leb = lebesgue_log_contributions(log_r, log_vn, 10)
    gauss = gaussian_log_contributions(log_r, log_vn, a, b, n=10, sum_log_prior_std=0.0, anchor_quadratic=1.0)
    for values in (leb, gauss):
        assert values[0] == -math.inf and torch.isfinite(values[1])
        assert math.isfinite(float(torch.logsumexp(values, 0)))


def _blank_pixel_problem():
    """Digits-like: input 0 is always zero, so the weights reading it are exactly flat."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(40, 5, generator=gen)
    x[:, 0] = 0.0
    return model, [(x, torch.zeros(40))]


def test_exactly_flat_coordinates_give_infinite_lebesgue_volume_with_a_warning():
    model, data = _blank_pixel_problem()
    with pytest.warns(UserWarning, match=r"exactly flat.*0\.weight \(6\)"):
        est = local_volume(model, data, measure="lebesgue", num_directions=8)
    assert est.log_volume == math.inf and est.lebesgue_log_volume == math.inf
    assert est.flat_parameters == {"0.weight": 6}
    assert est.metrics()["num_flat"] == 6.0
    assert est.num_capped == 0  # the sampled directions all cross: only the check sees it
    # The Gaussian measure is finite there, and without flat coordinates nothing is flagged.
    gauss = local_volume(model, data, measure="gaussian", num_directions=8)
    assert math.isfinite(gauss.log_volume) and gauss.flat_parameters == {}
    data[0][0][:, 0] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finite = local_volume(model, data, measure="lebesgue", num_directions=8)
    assert math.isfinite(finite.log_volume) and finite.flat_parameters == {}


def test_zero_jacobian_column_that_is_not_flat_far_away_is_not_flagged():
    # A ReLU unit dead on every analysis input: its incoming weights have zero Jacobian columns,
    # but moving one of them far enough revives the unit, so they are not flat.
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=torch.float64))
        model[0].bias.copy_(torch.tensor([0.0, -10.0], dtype=torch.float64))  # unit 1 is dead
    x = torch.rand(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    with pytest.warns(UserWarning, match="exactly flat") as record:
        est = local_volume(model, [(x,)], measure="lebesgue", num_directions=4)
    # Only the dead unit's outgoing weights are flat (column 1 of the head's weight).
    assert est.flat_parameters == {"2.weight": 2}, [str(w.message) for w in record]


# --------------------------------------------------------------------------------------------
# Optimizer state across optimizers
# --------------------------------------------------------------------------------------------


def _split_adam(model, optimizer, groups):
    """Adam optimizers over ``groups`` of parameter indices carrying ``optimizer``'s exact state."""
    params = list(model.parameters())
    out = []
    for indices in groups:
        opt = torch.optim.Adam([params[i] for i in indices], lr=3e-3)
        for i in indices:
            opt.state[params[i]] = {k: v.clone() for k, v in optimizer.state[params[i]].items()}
        out.append(opt)
    return out


def test_adam_state_gathered_from_several_optimizers_equals_one_optimizer(digits):
    model, optimizer, data, prior = digits
    kwargs = dict(prior_std=prior, num_directions=10, seed=0, preconditioner="adam")
    single = local_volume(model, data, optimizer=optimizer, **kwargs)
    body, head = _split_adam(model, optimizer, [[0, 1], [2, 3]])
    both = local_volume(model, data, optimizer=[body, head], **kwargs)
    assert both.log_volume == single.log_volume
    assert torch.equal(both.log_radii, single.log_radii)
    with pytest.raises(MissingOptimizerStateError, match=r"\['2.weight', '2.bias'\].*none of the optimizers"):
        local_volume(model, data, optimizer=body, **kwargs)


def test_step_counts_are_per_optimizer(digits):
    model, optimizer, data, prior = digits
    body, head = _split_adam(model, optimizer, [[0, 1], [2, 3]])
    for state in head.state.values():
        state["step"] = torch.tensor(3.0)  # the head optimizer took 3 steps: v_hat = v / (1 - b2^3)
        state["exp_avg_sq"].mul_(1 - 0.999**3)
    for state in body.state.values():
        state["exp_avg_sq"].mul_(1 - 0.999**300)
    kwargs = dict(prior_std=prior, num_directions=10, seed=0, preconditioner="adam")
    corrected = local_volume(model, data, optimizer=[body, head], **kwargs)
    # Same bias-corrected moments (up to float32 rounding), hence the same estimate.
    reference = local_volume(model, data, optimizer=optimizer, **kwargs)
    assert corrected.log_volume == pytest.approx(reference.log_volume, abs=1e-3)
    # Reading the head's buffer with the body's step count would be wrong by far more.
    for state in head.state.values():
        state["step"] = torch.tensor(300.0)
    wrong = local_volume(model, data, optimizer=[body, head], **kwargs)
    assert abs(wrong.log_volume - reference.log_volume) > 1.0


def test_mixed_adam_and_sgd_uses_the_median_scale_with_a_warning(digits):
    model, optimizer, data, prior = digits
    (body,) = _split_adam(model, optimizer, [[0, 1]])
    params = list(model.parameters())
    sgd = torch.optim.SGD(params[2:], lr=0.1)
    with pytest.warns(UserWarning, match=r"\['2.weight', '2.bias'\].*non-Adam.*median"):
        est = local_volume(
            model, data, optimizer=[body, sgd], prior_std=prior, num_directions=10, seed=0, preconditioner="adam"
        )
    assert math.isfinite(est.log_volume)
    # The rule, checked on the preconditioner itself: the head gets the median of the body's scale.
    by_hand = _adam_scale(optimizer, model)[: params[0].numel() + params[1].numel()]
    median = float(by_hand[by_hand > 0].median())
    eps = 3.0 * median
    log_p = -torch.log(
        torch.cat([by_hand, torch.full((params[2].numel() + params[3].numel(),), median, dtype=torch.float64)]) + eps
    )
    reference = local_volume(model, data, preconditioner=torch.exp(log_p), prior_std=prior, num_directions=10, seed=0)
    assert est.log_volume == pytest.approx(reference.log_volume, abs=1e-3)


def test_parameter_without_adam_state_is_named(digits):
    model, optimizer, data, prior = digits
    body, head = _split_adam(model, optimizer, [[0, 1], [2, 3]])
    head.state.pop(list(model.parameters())[3])  # the head bias never got a gradient
    with pytest.raises(MissingOptimizerStateError, match=r"\['2.bias'\].*requires_grad=False"):
        local_volume(model, data, optimizer=[body, head], prior_std=prior, num_directions=3, preconditioner="adam")


def test_radial_integral_documented_worst_case_error():
    """The docstring's figures: at most 0.08 nats at n = 50 and 0.03 at n = 400, worst near r = t*."""
    np = pytest.importorskip("numpy")
    f64 = torch.float64
    for n, bound in ((50, 0.08), (400, 0.03)):
        worst = 0.0
        for a in (0.3, 3.0):
            for b in (-20.0, 0.0, 20.0, 40.0):
                t_star = (-b + math.sqrt(b * b + 4 * a * (n - 1))) / (2 * a)
                for fraction in (0.7, 0.95, 1.0, 1.05, 1.5):
                    r = fraction * t_star
                    ts = np.linspace(1e-12, r, 200001)
                    g = -0.5 * a * ts * ts - b * ts + (n - 1) * np.log(ts)
                    exact = g.max() + math.log(np.trapezoid(np.exp(g - g.max()), ts))
                    got = log_radial_gaussian_integral(
                        torch.tensor([a], dtype=f64), torch.tensor([b], dtype=f64), n, torch.tensor([r], dtype=f64)
                    )
                    worst = max(worst, abs(float(got) - exact))
        assert worst < bound, (n, worst)
        assert worst > bound / 10  # the figure is a measured worst case, not a loose bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_every_preconditioner_and_the_flat_check():
    model, data = _blank_pixel_problem()
    model = model.double()
    data = [(data[0][0].double(), data[0][1])]
    optimizer = torch.optim.Adam(model.parameters())
    model(data[0][0]).sum().backward()
    optimizer.step()
    gpu_model = copy.deepcopy(model).cuda()
    gpu_optimizer = torch.optim.Adam(gpu_model.parameters())
    gpu_optimizer.load_state_dict(optimizer.state_dict())
    for options in (
        dict(preconditioner="adam"),
        dict(preconditioner="hessian_diag"),
        dict(preconditioner=None, measure="lebesgue"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpu = local_volume(model, data, num_directions=6, optimizer=optimizer, **options)
            gpu = local_volume(gpu_model, data, num_directions=6, optimizer=gpu_optimizer, **options)
        assert gpu.flat_parameters == cpu.flat_parameters
        assert gpu.log_volume == pytest.approx(cpu.log_volume, rel=1e-9) or gpu.log_volume == cpu.log_volume
