"""Finite-difference HVPs (``backend="finite_difference"``) against exact float64 Hessians."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_hessian import HessianOperator, top_eigenvalues
from lightning_hessian.operators import derivative_friendly_attention
from lightning_hessian.operators.finite_difference import (
    central_difference_products,
    check_fd_step,
    fd_relative_error,
    fd_step,
)
from tests.curvature_truth import exact_loss_hessian


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _batches(dtype: torch.dtype = torch.float32, dim: int = 10, classes: int = 4, sizes=(24, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, dim, generator=g).to(dtype), torch.randint(0, classes, (b,), generator=g)) for b in sizes]


@functools.cache
def _mlp_hessian() -> torch.Tensor:
    """Exact Hessian of ``_mlp()`` on ``_batches()`` (float32-representable values: any dtype)."""
    return exact_loss_hessian(_mlp(), F.cross_entropy, _batches())


def _probes(n: int, k: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_products(op: HessianOperator, hess: torch.Tensor, matvec_tol: float, eig_tol: float) -> None:
    V = _probes(op.num_params)
    got = op.matmat(V.to(op.dtype)).double()
    want = hess @ V
    for j in range(V.shape[1]):
        assert _rel(got[:, j], want[:, j]) <= matvec_tol, (j, _rel(got[:, j], want[:, j]))
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    top = float(top_eigenvalues(op, k=1).values[0])
    assert abs(top - lam) / abs(lam) <= eig_tol, (top, lam)
    # the measured estimate is conservative and of the right order
    est = op.fd_error_estimate
    assert math.isfinite(est) and 0 < est < 50 * matvec_tol


# --------------------------------------------------------------------------- the machinery


def test_step_rule_and_validation():
    eps32 = torch.finfo(torch.float32).eps
    assert fd_step(0.0, 10, torch.float32) == pytest.approx(eps32 ** (1 / 3))
    assert fd_step(4.0 * 100, 100, torch.float64) == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3) * 2)
    assert check_fd_step(None) is None and check_fd_step(1e-3) == 1e-3
    for bad in (0.0, -1e-3, math.nan, math.inf, True, "1e-3"):
        with pytest.raises(ValueError, match="fd_step"):
            check_fd_step(bad)  # type: ignore[arg-type]
    model = _mlp()
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="fd_step"):
            HessianOperator(model, F.cross_entropy, _batches(), backend="finite_difference", fd_step=bad)
    with pytest.raises(ValueError, match=r"'finite_difference'.*did you mean 'finite_difference'"):
        HessianOperator(model, F.cross_entropy, _batches(), backend="finite_diference")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need backend='finite_difference'"):
        HessianOperator(model, F.cross_entropy, _batches(), backend="autograd", fd_step=1e-3)
    assert fd_relative_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_central_difference_on_a_quadratic_is_exact_and_restores():
    """``grad L = A θ``: central differences are exact up to rounding, for any step."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a + a.T
    theta = torch.randn(6, dtype=torch.float64)
    before = theta.clone()

    def grad_fn():
        return [a @ theta + 0.5 * theta**3], (theta**4).sum() / 8  # gradient of θᵀAθ/2 + Σθ⁴/8

    u = torch.randn(2, 6, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    exact = [(a + torch.diag(1.5 * before**2)) @ u[j] for j in range(2)]
    central = central_difference_products([theta], [u], grad_fn, 1e-4)
    rich = central_difference_products([theta], [u], grad_fn, 1e-2, richardson=True)
    assert torch.equal(theta, before)
    assert central.num_gradients == 4 and rich.num_gradients == 8
    for j in range(2):
        # truncation (ε²/6)·3·Σu³: central at 1e-4 ~1e-8, Richardson removes it entirely (cubic gradient)
        assert _rel(central.products[0][j], exact[j]) < 1e-7
        assert _rel(rich.products[0][j], exact[j]) < 1e-11


# --------------------------------------------------------------------------- accuracy vs exact


@pytest.mark.parametrize(("dtype", "matvec_tol", "eig_tol"), [(torch.float64, 1e-7, 1e-7), (torch.float32, 1e-4, 1e-4)])
def test_mlp_matches_exact(dtype, matvec_tol, eig_tol):
    model, data = _mlp(dtype), _batches(dtype)
    hess = _mlp_hessian()
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    _check_products(op, hess, matvec_tol, eig_tol)
    assert op.backend == "finite_difference" and op.fd_step == fd_step(
        sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()), op.num_params, dtype
    )


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


@functools.cache
def _cnn_problem(train_mode_batchnorm: bool) -> tuple[nn.Module, list, torch.Tensor]:
    """A float32 CNN with non-trivial running statistics, its data and the exact Hessian."""
    torch.manual_seed(0)
    model = _ConvBN()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in (12, 8)]
    with torch.no_grad():
        model.train()
        model(data[0][0] * 1.5 + 0.3)
        model.eval()
    truth = copy.deepcopy(model)
    if train_mode_batchnorm:  # truth: batch statistics, per micro-batch
        truth.bn.track_running_stats = False
        truth.bn.running_mean = truth.bn.running_var = None
    return model, data, exact_loss_hessian(truth, F.cross_entropy, data)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train_mode_batchnorm", [False, True])
def test_cnn_with_batchnorm_matches_exact(dtype, train_mode_batchnorm):
    model, data, hess = _cnn_problem(train_mode_batchnorm)
    model = copy.deepcopy(model).to(dtype)  # float64: the same (float32-representable) values
    data = [(x.to(dtype), y) for x, y in data]
    buffers = [b.clone() for b in model.buffers()]
    op = HessianOperator(
        model, F.cross_entropy, data, backend="finite_difference", train_mode_batchnorm=train_mode_batchnorm
    )
    tol = 1e-7 if dtype == torch.float64 else 1e-4
    _check_products(op, hess, tol, tol)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


class _Attention(nn.Module):
    """One pre-norm self-attention block + mean-pooled linear head, on F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return self.head(x.mean(dim=1))


@functools.cache
def _attention_problem() -> tuple[nn.Module, list, torch.Tensor]:
    torch.manual_seed(0)
    model = _Attention()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(b, 5, 4, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in (10, 6)]
    with derivative_friendly_attention():  # the truth needs double backward: math kernel
        hess = exact_loss_hessian(model, F.cross_entropy, data)
    return model, data, hess


def _double_backward_through_sdpa(dtype: torch.dtype) -> None:
    q = torch.randn(1, 1, 3, 4, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
    torch.autograd.grad(g.sum(), q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_through_the_cpu_flash_kernel(dtype):
    """Only the flash kernel is allowed: the products run through it (profiled) and match the truth."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, data, hess = _attention_problem()
    model, data = copy.deepcopy(model).to(dtype), [(x.to(dtype), y) for x, y in data]
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    V = _probes(op.num_params)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.profiler.profile() as prof:
        got = op.matmat(V.to(dtype)).double()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert not any("math" in n for n in names)
    tol = 1e-7 if dtype == torch.float64 else 1e-4
    assert max(_rel(got[:, j], (hess @ V)[:, j]) for j in range(3)) <= tol
    # the AD paths cannot use this kernel: under the same restriction they need the math kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError):
        _double_backward_through_sdpa(dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        lam = float(top_eigenvalues(op, k=1).values[0])
    assert abs(lam - float(torch.linalg.eigvalsh(hess)[-1])) <= tol * abs(lam)


def test_transformer_encoder_layer_matches_exact():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * 4, 3)).double()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(7, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))]
    model.train()  # dropout must be off during the products (eval mode), as for the other backends
    with derivative_friendly_attention():
        hess = exact_loss_hessian(model, F.cross_entropy, data)
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    _check_products(op, hess, 1e-7, 1e-7)
    assert model.training


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(10, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant).double()
    data = _batches(torch.float64)
    truth = copy.deepcopy(model)
    truth.use_reentrant = False
    hess = exact_loss_hessian(truth, F.cross_entropy, data)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 7.0)
        grads[name] = p.grad
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    _check_products(op, hess, 1e-7, 1e-7)
    for name, p in model.named_parameters():  # .grad objects and values as found (reentrant: swapped out and back)
        assert p.grad is grads[name] and torch.all(p.grad == 7.0)
    if not use_reentrant:  # the AD path works too here; with reentrant checkpointing it cannot
        return
    with pytest.raises(RuntimeError, match="checkpoint"):
        HessianOperator(model, F.cross_entropy, data, backend="autograd").matvec(torch.ones(op.num_params))


def test_block_and_compute_dtype():
    model, data = _mlp(torch.float32), _batches(torch.float32)
    hess = _mlp_hessian()
    op64 = HessianOperator(model, F.cross_entropy, data, backend="finite_difference", compute_dtype=torch.float64)
    V = _probes(op64.num_params)
    assert _rel(op64.matmat(V), hess @ V) <= 1e-7  # float64 cast copies: the float64 accuracy
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    names = ["2.weight", "2.bias"]
    block = op.block(names)
    sl = slice(op.num_params - block.num_params, op.num_params)
    W = _probes(block.num_params, 2)
    assert _rel(block.matmat(W.float()), hess[sl, sl] @ W) <= 1e-4
    block64 = op64.block(names)
    assert _rel(block64.matmat(W), hess[sl, sl] @ W) <= 1e-7


# --------------------------------------------------------------------------- state, counting, fallback


def test_parameters_restored_bitwise_and_state_as_found():
    model, data = _mlp(torch.float32), _batches(torch.float32)
    model.train()
    params = [p.detach().clone() for p in model.parameters()]
    raw = [bytes(p.detach().numpy().tobytes()) for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    x, y = data[0]
    pending = F.cross_entropy(model(x), y)  # a graph over the parameters, held across the products
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    n = op.num_params
    huge = torch.randn(n, dtype=torch.float64) * 1e30
    huge[::7] = 0
    vectors = [huge, torch.ones(n), torch.zeros(n), torch.randn(n) * 1e-30, torch.randn(n)]
    rng = torch.get_rng_state()
    for _ in range(4):
        for v in vectors:
            out = op.matvec(v.float())
            assert torch.isfinite(out).all()
    assert op.num_hvps == 4 * len(vectors)
    # gradients: 2 per vector and batch, zero vectors too (their product is exactly 0), + 2 per batch for the estimate
    assert op.num_gradients == (2 * op.num_hvps + 2) * len(data)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    assert raw == [bytes(p.detach().numpy().tobytes()) for p in model.parameters()]
    assert versions == [p._version for p in model.parameters()]
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    (g_pending,) = torch.autograd.grad(pending, [next(model.parameters())])  # still usable, same values
    (g_fresh,) = torch.autograd.grad(F.cross_entropy(model(x), y), [next(model.parameters())])
    assert torch.equal(g_pending, g_fresh)
    assert torch.equal(op.matvec(torch.zeros(n)), torch.zeros(n))


def test_parameters_restored_when_the_loss_raises():
    model, data = _mlp(torch.float64), _batches(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def batch_loss(m, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first perturbation, before the second
            raise RuntimeError("boom")
        return F.cross_entropy(m(batch[0]), batch[1])

    op = HessianOperator(model, batch_loss=batch_loss, data=data, backend="finite_difference")
    with pytest.raises(RuntimeError, match="boom"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_auto_falls_back_to_finite_differences_where_both_ad_paths_fail():
    """Reentrant activation checkpointing: no double backward, no functorch transform; FD works."""
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant=True).double()
    data = _batches(torch.float64, sizes=(12,))
    truth = copy.deepcopy(model)
    truth.use_reentrant = False
    hess = exact_loss_hessian(truth, F.cross_entropy, data)
    for backend in ("func", "autograd"):
        with pytest.raises(RuntimeError):
            HessianOperator(model, F.cross_entropy, data, backend=backend).matvec(torch.ones(hess.shape[0]).double())
    op = HessianOperator(model, F.cross_entropy, data)  # backend="auto"
    V = _probes(op.num_params, 2)
    with pytest.warns(RuntimeWarning, match="falling back to finite differences"):
        got = op.matmat(V)
    assert op.backend == "finite_difference"
    assert _rel(got, hess @ V) <= 1e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rel(op.matmat(V), hess @ V) <= 1e-7
    assert math.isfinite(op.fd_error_estimate)  # estimated on the first product after the switch


def test_distributed_style_all_reduce_carries_the_estimate():
    model, data = _mlp(torch.float64), _batches(torch.float64)
    hess = _mlp_hessian()
    seen = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t

    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference", all_reduce=all_reduce)
    V = _probes(op.num_params, 2)
    assert _rel(op.matmat(V), hess @ V) <= 1e-7
    assert seen == [op.num_params * 3 + 3]  # 2 columns + the estimate's column, in the one collective
    assert 0 < op.fd_error_estimate < 1e-6


def test_richardson_option():
    model, data = _mlp(torch.float32), _batches(torch.float32)
    hess = _mlp_hessian()
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference", fd_richardson=True)
    V = _probes(op.num_params, 2)
    assert _rel(op.matmat(V.float()), hess @ V) <= 1e-4
    assert op.num_gradients == (4 * 2 + 4) * len(data)


@pytest.mark.slow
def test_compiled_module():
    """A ``torch.compile``d MLP (torch.compile has no double backward): finite differences work."""
    model = _mlp(torch.float32)
    data = _batches(torch.float32)
    hess = _mlp_hessian()
    compiled = torch.compile(model)
    op = HessianOperator(compiled, F.cross_entropy, data, backend="finite_difference")
    V = _probes(op.num_params, 2)
    assert _rel(op.matmat(V.float()), hess @ V) <= 1e-4
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), _mlp(torch.float32).parameters(), strict=True))


# --------------------------------------------------------------------------- HessianMonitor


def test_monitor_logs_the_estimate_and_leaves_training_untouched():
    import lightning.pytorch as pl

    from lightning_hessian.callbacks import HessianMonitor
    from tests.helpers import exact_hessian
    from tests.lightning_helpers import DigitsModule, digits_dataset, digits_loader, trainer_kwargs

    def fit(module, monitor):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(callbacks=[monitor] if monitor else [], **trainer_kwargs(max_epochs=2))
        loader = digits_loader(limit=200)
        loader.generator = torch.Generator().manual_seed(0)
        trainer.fit(module, loader)
        return trainer

    base = DigitsModule(hidden=4, dropout=0.2)
    with_cb, without_cb = copy.deepcopy(base), copy.deepcopy(base)
    monitor = HessianMonitor(
        hvp_backend="finite_difference", hvp_precision="float64", num_runs=2, num_steps=20, analysis_fraction=0.25
    )
    trainer = fit(with_cb, monitor)
    fit(without_cb, None)
    for a, b in zip(with_cb.parameters(), without_cb.parameters(), strict=True):
        assert torch.equal(a, b)
    last = monitor.history[-1]
    assert 0 < last["fd_rel_error"] < 1e-6 and last["fd_step"] > 0
    assert "hessian/fd_rel_error" in trainer.callback_metrics
    subset = torch.utils.data.Subset(digits_dataset(200), monitor.analysis.indices)
    hess = exact_hessian(with_cb, list(torch.utils.data.DataLoader(subset, batch_size=10**9)))
    top = float(torch.linalg.eigvalsh(hess)[-1])
    assert abs(last["top_eigenvalue"] - top) <= 1e-6 * abs(top)


def test_monitor_validation():
    from lightning_hessian.callbacks import HessianMonitor

    with pytest.raises(ValueError, match=r"hvp_backend.*'finite_difference'"):
        HessianMonitor(hvp_backend="finite-difference")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fd_step"):
        HessianMonitor(hvp_backend="finite_difference", fd_step=0.0)
    with pytest.raises(ValueError, match="fd_step` needs hvp_backend"):
        HessianMonitor(fd_step=1e-3)
    with pytest.raises(ValueError, match="curvature='hessian'"):
        HessianMonitor(hvp_backend="finite_difference", curvature="ggn")
    from lightning_hessian import GGNOperator

    with pytest.raises(ValueError, match="no finite-difference backend"):
        GGNOperator(_mlp(), F.cross_entropy, _batches(), backend="finite_difference")
