"""HessianOperator against exact float64 Hessians (docs/methods/index.md): products, backends, batching,
weighting, state preservation (bit for bit) and error reporting."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.errors import HessianComputationError, NonFiniteHVPError, NonFiniteLossError
from lightning_hessian.estimators.density import spectral_density
from lightning_hessian.estimators.eigen import top_eigenvalues
from lightning_hessian.estimators.lanczos import lanczos
from lightning_hessian.estimators.trace import TraceEstimate, hessian_trace
from lightning_hessian.operators import HessianOperator, MatrixOperator
from tests.helpers import analysis_batches, digits_mlp, digits_tensors, exact_hessian

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),  # torch.optim
]

F32_REL = 1e-5  # float32 model, float64 truth: measured ~1.2e-6 on the digits MLP


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b).norm() / b.norm())


def _randn(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Products equal exact Hessian products
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_mlp_products_match_exact_hessian(mlp_truth, backend):
    H = mlp_truth.hessian
    op = HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches, backend=backend)
    assert op.num_params == H.shape[0] == 4810
    V = _randn(op.num_params, 4, seed=1)
    HV = op.matmat(V)
    assert HV.shape == V.shape and HV.dtype == torch.float64
    exact = H @ V
    for j in range(V.shape[1]):  # every column, not only on average
        assert _rel(HV[:, j], exact[:, j]) < F32_REL
    assert _rel(op.matvec(V[:, 0]), exact[:, 0]) < F32_REL
    HV32 = op.matmat(V.float())
    assert HV32.dtype == torch.float32
    assert _rel(HV32, exact) < F32_REL
    assert op.backend == backend
    assert op.num_hvps == 4 + 1 + 4


def test_backends_agree_and_auto_picks_a_measured_path(mlp_truth):
    V = _randn(mlp_truth.num_params, 3, seed=2)
    ops = {
        b: HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches, backend=b)
        for b in ("func", "autograd", "auto")
    }
    assert ops["auto"].backend == "auto"  # undecided before the first product
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a plain MLP
        out = {b: op.matmat(V) for b, op in ops.items()}
    assert ops["auto"].backend == ops["auto"].backend_for(3) in ("func", "autograd")
    assert set(ops["auto"].backend_timings[3]) == {"func", "autograd"}
    assert _rel(out["func"], out["autograd"]) < F32_REL
    assert _rel(out["auto"], out[ops["auto"].backend]) < F32_REL  # same path (not bitwise: float32 kernels)
    exact = mlp_truth.hessian @ V
    assert max(_rel(o, exact) for o in out.values()) < F32_REL


def test_exact_hessian_helper_is_right_through_training_batchnorm(cnn_truth):
    """The truth itself: ``exact_hessian(..., train_mode_batchnorm=True)`` against plain
    reverse-over-reverse autograd in float64 (``torch.func.hessian`` is wrong there)."""
    m64 = copy.deepcopy(cnn_truth.model).double()
    m64.eval()
    for mod in m64.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
            mod.track_running_stats = False
    params = list(m64.parameters())
    total = sum(int(x.shape[0]) for x, _ in cnn_truth.batches)
    loss = sum(F.cross_entropy(m64(x.double()), y) * (x.shape[0] / total) for x, y in cnn_truth.batches)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    V = _randn(grads.numel(), 2, seed=3)
    for j in range(2):
        hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads @ V[:, j], params, retain_graph=True)])
        assert _rel(cnn_truth.hessian_train_bn @ V[:, j], hv) < 1e-10


@pytest.mark.parametrize("train_mode_batchnorm", [False, True], ids=["eval", "batch-stats"])
@pytest.mark.parametrize("backend", ["func", "autograd", "auto"])
def test_cnn_with_batchnorm_matches_exact_hessian(cnn_truth, train_mode_batchnorm, backend):
    H = cnn_truth.hessian_train_bn if train_mode_batchnorm else cnn_truth.hessian_eval
    other = cnn_truth.hessian_eval if train_mode_batchnorm else cnn_truth.hessian_train_bn
    assert _rel(other, H) > 0.1  # the two modes are really different functions
    op = HessianOperator(
        cnn_truth.model, F.cross_entropy, cnn_truth.batches, backend=backend, train_mode_batchnorm=train_mode_batchnorm
    )
    assert op.num_params == H.shape[0] == 374
    V = _randn(op.num_params, 5, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HV = op.matmat(V)
    assert _rel(HV, H @ V) < F32_REL
    if backend == "auto":  # measured: either path, exposed per width
        assert op.backend == op.backend_for(5) == op.backend_choices[5] in ("func", "autograd")
    else:
        assert op.backend == backend


class _NoJvpSoftplus(torch.autograd.Function):
    """softplus with a (twice differentiable) backward but no forward-mode rule (no ``jvp``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _Act(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.custom = custom

    def forward(self, x):
        return _NoJvpSoftplus.apply(x) if self.custom else F.softplus(x)


def _softplus_mlp(custom: bool) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(64, 12), _Act(custom), nn.Linear(12, 10))


def test_fallback_to_double_backward_without_forward_ad():
    model, twin = _softplus_mlp(custom=True), _softplus_mlp(custom=False)
    batches = analysis_batches(fraction=0.05, batch_size=40)
    H = exact_hessian(twin, batches)  # same function, built from forward-mode-capable ops
    V = _randn(H.shape[0], 3, seed=6)

    strict = HessianOperator(model, F.cross_entropy, batches, backend="func")
    with pytest.raises((RuntimeError, NotImplementedError), match="jvp"):
        strict.matmat(V)

    op = HessianOperator(model, F.cross_entropy, batches)
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        HV = op.matmat(V)
    assert op.backend == "autograd"
    assert _rel(HV, H @ V) < F32_REL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert _rel(op.matvec(V[:, 1]), H @ V[:, 1]) < F32_REL


# --------------------------------------------------------------------------------------------
# Batches: structure, weighting, chunking, counting
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_problem():
    """A 64-8-10 MLP (610 parameters) and the first 107 digits; exact Hessian of their mean loss."""
    model = digits_mlp(seed=1, hidden=8)
    x, y = digits_tensors()
    x, y = x[:107], y[:107]
    return model, x, y, exact_hessian(model, [(x, y)])


def _dict_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def test_uneven_dict_batches_are_size_weighted(small_problem):
    model, x, y, H = small_problem
    splits = [(0, 50), (50, 100), (100, 107)]
    batches = [{"x": x[a:b], "y": y[a:b]} for a, b in splits]
    op = HessianOperator(model, batch_loss=_dict_loss, data=batches)
    V = _randn(op.num_params, 3, seed=7)
    HV = op.matmat(V)
    assert _rel(HV, H @ V) < F32_REL  # 50 + 50 + 7 == one batch of 107
    one = HessianOperator(model, batch_loss=_dict_loss, data=[{"x": x, "y": y}])
    assert _rel(HV, one.matmat(V).double()) < F32_REL
    # An unweighted mean of the three batch Hessians is a different matrix (the test can fail).
    unweighted = sum(exact_hessian(model, [(x[a:b], y[a:b])]) for a, b in splits) / 3
    assert _rel(unweighted @ V, H @ V) > 0.05
    with torch.no_grad():
        assert abs(op.loss() - float(F.cross_entropy(model(x), y))) < 1e-5


def test_batch_size_fn(small_problem):
    model, x, y, H = small_problem
    # The first tensor in these batches is a scalar id: its size cannot be inferred.
    splits = [(0, 50), (50, 100), (100, 107)]
    batches = [{"id": torch.tensor(i), "x": x[a:b], "y": y[a:b]} for i, (a, b) in enumerate(splits)]
    V = _randn(H.shape[0], 2, seed=8)
    with pytest.raises(ValueError, match="batch_size_fn"):
        HessianOperator(model, batch_loss=_dict_loss, data=batches).matmat(V)
    seen = []

    def size(batch):
        seen.append(int(batch["id"]))
        return batch["y"].numel()

    op = HessianOperator(model, batch_loss=_dict_loss, data=batches, batch_size_fn=size)
    assert _rel(op.matmat(V), H @ V) < F32_REL
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_max_batched_vectors_chunks_give_same_products(mlp_truth, backend):
    V = _randn(mlp_truth.num_params, 7, seed=9)
    whole = HessianOperator(mlp_truth.model, F.cross_entropy, mlp_truth.batches, backend=backend)
    chunked = HessianOperator(
        mlp_truth.model, F.cross_entropy, mlp_truth.batches, backend=backend, max_batched_vectors=3
    )
    a, b = whole.matmat(V), chunked.matmat(V)
    assert _rel(b, a) < 1e-6
    assert _rel(b, mlp_truth.hessian @ V) < F32_REL
    assert chunked.num_hvps == whole.num_hvps == 7


def test_num_hvps_counting(small_problem):
    model, x, y, _ = small_problem
    op = HessianOperator(model, F.cross_entropy, [(x[:60], y[:60]), (x[60:], y[60:])])
    n = op.num_params
    assert op.num_hvps == 0
    op.matmat(_randn(n, 5, seed=10))
    assert op.num_hvps == 5  # columns, not columns x batches
    op.matvec(_randn(n, 1, seed=11)[:, 0])
    assert op.num_hvps == 6
    assert op.matmat(torch.zeros(n, 0)).shape == (n, 0)
    assert op.num_hvps == 6
    op.reset_num_hvps()
    assert op.num_hvps == 0

    def spent(fn):
        before = op.num_hvps
        result = fn()
        return result.num_hvps, op.num_hvps - before

    for reported, actual in [
        spent(lambda: hessian_trace(op, num_probes=7, batch_size=3)),
        spent(lambda: hessian_trace(op, method="hutch++", num_probes=10)),
        spent(lambda: hessian_trace(op, rel_tol=0.5, min_probes=30, batch_size=10, max_probes=40)),
        spent(lambda: top_eigenvalues(op, k=2, max_iter=9)),
        spent(lambda: top_eigenvalues(op, k=1, method="power", max_iter=6)),
        spent(lambda: spectral_density(op, num_runs=2, num_steps=5)),
    ]:
        assert reported == actual > 0
    assert spent(lambda: spectral_density(op, num_runs=2, num_steps=5))[1] == 10
    assert spent(lambda: hessian_trace(op, method="hutch++", num_probes=10))[1] == 10
    matrix_op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    matrix_op.matmat(torch.ones(4, 3))
    matrix_op.matvec(torch.ones(4))
    assert matrix_op.num_hvps == 4


class _FakeGroup:
    """An in-process stand-in for a process group: ``all_reduce`` sums across threads.

    Ranks are threads, so each gets its own copy of the model (``functional_call`` swaps a
    module's parameters) and the double-backward backend (torch.func's forward-AD levels are
    process-global); real ranks are processes and need neither."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def all_reduce(self, rank: int):
        def reduce(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total

        return reduce


def _run_ranks(fns):
    results, errors = [None] * len(fns), [None] * len(fns)

    def target(i):
        try:
            results[i] = fns[i]()
        except BaseException as err:  # noqa: BLE001 - inspected by the test
            errors[i] = err

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_all_reduce_gives_the_global_hessian(small_problem):
    """Shards of 100 and 7 samples (and an empty one): every rank gets the product of the
    Hessian of the global size-weighted mean loss."""
    model, x, y, H = small_problem
    shards = [[(x[:50], y[:50]), (x[50:100], y[50:100])], [(x[100:], y[100:])], []]
    group = _FakeGroup(3)
    ops = [
        HessianOperator(
            copy.deepcopy(model), F.cross_entropy, shard, backend="autograd", all_reduce=group.all_reduce(r)
        )
        for r, shard in enumerate(shards)
    ]
    V = _randn(H.shape[0], 3, seed=20)
    results, errors = _run_ranks([lambda op=op: op.matmat(V) for op in ops])
    assert errors == [None, None, None]
    for result in results:
        assert _rel(result, H @ V) < F32_REL
    losses, errors = _run_ranks([op.loss for op in ops])
    with torch.no_grad():
        assert all(abs(value - float(F.cross_entropy(model(x), y))) < 1e-5 for value in losses)


def test_all_reduce_failure_on_one_rank_reaches_every_rank(small_problem):
    model, x, y, _ = small_problem
    bad = [(torch.full_like(x[100:], float("nan")), y[100:])]
    group = _FakeGroup(2)
    shards = [[(x[:100], y[:100])], bad]
    ops = [
        HessianOperator(
            copy.deepcopy(model), F.cross_entropy, shard, backend="autograd", all_reduce=group.all_reduce(r)
        )
        for r, shard in enumerate(shards)
    ]
    V = _randn(ops[0].num_params, 2, seed=21)
    _, errors = _run_ranks([lambda op=op: op.matmat(V) for op in ops])
    assert isinstance(errors[1], NonFiniteLossError)  # the failing rank: its own error
    assert isinstance(errors[0], NonFiniteHVPError) and "Another process" in str(errors[0])  # no hang


# --------------------------------------------------------------------------------------------
# Nothing about the model changes, bit for bit
# --------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _state_model():
    """BatchNorm + dropout, all modules in train mode except one, a frozen parameter, non-trivial
    running statistics, pre-populated gradients on some parameters and ``None`` on others."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 10))
    model[0].bias.requires_grad_(False)
    batches = analysis_batches(fraction=0.03, batch_size=32)  # 54 samples: 32 + 22
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for xb, yb in batches * 2:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model[4].bias.grad = None
    model[2].eval()  # mixed flags must come back mixed
    return model, batches


def _snapshot(model: nn.Module):
    return {
        "params": [
            (name, p, _bits(p), p.requires_grad, p.grad, None if p.grad is None else _bits(p.grad))
            for name, p in model.named_parameters()
        ],
        "buffers": [(name, b, _bits(b)) for name, b in model.named_buffers()],
        "training": [(name, m.training) for name, m in model.named_modules()],
        "rng": torch.get_rng_state().clone(),
    }


def _assert_unchanged(model: nn.Module, snap) -> None:
    params = list(model.named_parameters())
    assert [n for n, _ in params] == [s[0] for s in snap["params"]]
    for (name, p), (_, p0, bits, flag, grad, grad_bits) in zip(params, snap["params"], strict=True):
        assert p is p0, name
        assert torch.equal(_bits(p), bits), f"parameter {name} changed"
        assert p.requires_grad == flag, f"requires_grad of {name} changed"
        if grad is None:
            assert p.grad is None, f".grad of {name} appeared"
        else:
            assert p.grad is grad and torch.equal(_bits(p.grad), grad_bits), f".grad of {name} changed"
    buffers = list(model.named_buffers())
    assert [n for n, _ in buffers] == [s[0] for s in snap["buffers"]]
    for (name, b), (_, b0, bits) in zip(buffers, snap["buffers"], strict=True):
        assert b is b0 and torch.equal(_bits(b), bits), f"buffer {name} changed"
    assert [(n, m.training) for n, m in model.named_modules()] == snap["training"]
    assert torch.equal(torch.get_rng_state(), snap["rng"]), "global RNG state changed"


ESTIMATORS = {
    "matmat": lambda op: op.matmat(_randn(op.num_params, 3, seed=13)),
    "matmat-autograd": None,  # same, with backend="autograd"
    "loss": lambda op: op.loss(),
    "hutchinson": lambda op: hessian_trace(op, num_probes=4, batch_size=2),
    "hutch++": lambda op: hessian_trace(op, method="hutch++", num_probes=6),
    "lanczos": lambda op: top_eigenvalues(op, k=2, max_iter=8),
    "power": lambda op: top_eigenvalues(op, k=1, method="power", max_iter=5),
    "density": lambda op: spectral_density(op, num_runs=2, num_steps=6),
}


@pytest.mark.parametrize("train_mode_batchnorm", [False, True], ids=["eval", "batch-stats"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_model_state_is_untouched_bit_for_bit(estimator, train_mode_batchnorm):
    model, batches = _state_model()
    assert model.training and model[1].num_batches_tracked.item() == 4
    snap = _snapshot(model)
    backend = "autograd" if estimator == "matmat-autograd" else "auto"
    op = HessianOperator(model, F.cross_entropy, batches, backend=backend, train_mode_batchnorm=train_mode_batchnorm)
    total = sum(p.numel() for p in model.parameters())
    assert op.num_params == total - 16  # the frozen bias is not a coordinate
    assert "0.bias" not in op.parameter_names()
    run = ESTIMATORS[estimator] or ESTIMATORS["matmat"]
    result = run(op)
    assert result is not None
    _assert_unchanged(model, snap)
    run(op)  # and again (cached batches, decided backend)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("train_mode_batchnorm", [False, True], ids=["eval", "batch-stats"])
def test_state_model_products_are_the_eval_or_batch_stats_hessian(train_mode_batchnorm):
    """Dropout off; BatchNorm on running or batch statistics as asked (exact Hessian, which
    evaluates a float64 copy with dropout off and the same BatchNorm mode)."""
    model, batches = _state_model()
    snap = _snapshot(model)
    H = exact_hessian(model, batches, train_mode_batchnorm=train_mode_batchnorm)
    op = HessianOperator(model, F.cross_entropy, batches, train_mode_batchnorm=train_mode_batchnorm)
    V = _randn(op.num_params, 3, seed=14)
    assert _rel(op.matmat(V), H @ V) < F32_REL
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# Bad input raises clearly
# --------------------------------------------------------------------------------------------


def _tiny():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    return model, data


def test_empty_data_raises():
    model, _ = _tiny()
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, F.cross_entropy, [])

    class NoLen:  # re-iterable, no __len__, yields nothing
        def __iter__(self):
            return iter(())

    op = HessianOperator(model, F.cross_entropy, NoLen())
    with pytest.raises(ValueError, match="no batches"):
        op.matvec(torch.ones(op.num_params))
    with pytest.raises(ValueError, match="`data` is required"):
        HessianOperator(model, F.cross_entropy)


def test_generator_data_raises_type_error():
    model, data = _tiny()
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(model, F.cross_entropy, (b for b in data))
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(model, F.cross_entropy, iter(data))


def test_no_trainable_parameters_raises():
    model, data = _tiny()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, F.cross_entropy, data)


def test_non_finite_loss_raises():
    model, data = _tiny()
    x, y = data[0]
    bad = [(x, y), (torch.full_like(x, float("nan")), y)]
    op = HessianOperator(model, F.cross_entropy, bad)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        op.matvec(torch.ones(op.num_params))
    with pytest.raises(NonFiniteLossError):
        hessian_trace(op, num_probes=2)
    with pytest.raises(NonFiniteLossError):
        top_eigenvalues(op, k=1, max_iter=3)


@pytest.mark.parametrize("backend", ["auto", "func", "autograd"])
def test_non_finite_hvp_raises_dedicated_error(backend):
    """Finite loss, overflowing curvature: L(w) = (1e20 w)^2 = 1 at w = 1e-20, H = 2e40 > float32 max."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1e-20)
    op = HessianOperator(
        model, batch_loss=lambda m, b: (m(b) * 1e20).square().mean(), data=[torch.ones(4, 1)], backend=backend
    )
    assert op.loss() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(NonFiniteHVPError, match="NaN or Inf") as info:
        op.matmat(torch.ones(1, 2))
    assert type(info.value) is NonFiniteHVPError  # not the loss error
    assert isinstance(info.value, HessianComputationError)
    with pytest.raises(NonFiniteHVPError):
        hessian_trace(op, num_probes=2)


def test_wrong_shapes_to_matmat_and_matvec(small_problem):
    model, x, y, _ = small_problem
    op = HessianOperator(model, F.cross_entropy, [(x, y)])
    n = op.num_params
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.ones(n))  # 1-D
    with pytest.raises(ValueError, match=f"num_params={n}"):
        op.matmat(torch.ones(n + 1, 2))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.ones(n, 2, 1))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        op.matmat([[1.0]] * n)
    with pytest.raises(ValueError, match="1-D"):
        op.matvec(torch.ones(n, 1))
    with pytest.raises(ValueError, match="num_params"):
        op.matvec(torch.ones(n - 1))
    with pytest.raises(ValueError, match="shape"):
        MatrixOperator(torch.eye(3)).matmat(torch.ones(4, 1))
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.ones(3, 4))
    assert op.num_hvps == 0


_OP = MatrixOperator(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)))
_ESTIMATE = TraceEstimate(1.0, 0.1, 3, 3, "hutchinson", torch.ones(3))


def _tiny_op(**kwargs):
    model, data = _tiny()
    return HessianOperator(model, F.cross_entropy, data, **kwargs)


BAD_CALLS = [
    # (id, call, exception, name that must appear in the message)
    ("k=0", lambda: top_eigenvalues(_OP, k=0), ValueError, "`k`"),
    ("k=n", lambda: top_eigenvalues(_OP, k=20), ValueError, "`k`"),
    ("k>n", lambda: top_eigenvalues(_OP, k=25), ValueError, "`k`"),
    ("k=bool", lambda: top_eigenvalues(_OP, k=True), ValueError, "`k`"),
    ("which", lambda: top_eigenvalues(_OP, which="middle"), ValueError, "`which`"),
    ("eig-method", lambda: top_eigenvalues(_OP, method="arnoldi"), ValueError, "`method`"),
    ("eig-tol", lambda: top_eigenvalues(_OP, tol=0.0), ValueError, "`tol`"),
    ("max_iter", lambda: top_eigenvalues(_OP, max_iter=0), ValueError, "`max_iter`"),
    ("eig-seed", lambda: top_eigenvalues(_OP, seed="0"), TypeError, "`seed`"),
    ("trace-method", lambda: hessian_trace(_OP, method="hutch--"), ValueError, "`method`"),
    ("probe", lambda: hessian_trace(_OP, probe="uniform"), ValueError, "`probe`"),
    ("num_probes", lambda: hessian_trace(_OP, num_probes=0), ValueError, "`num_probes`"),
    ("hutch++-budget", lambda: hessian_trace(_OP, method="hutch++", num_probes=2), ValueError, "`num_probes`"),
    ("confidence", lambda: hessian_trace(_OP, rel_tol=0.1, confidence=1.0), ValueError, "`confidence`"),
    ("batch_size", lambda: hessian_trace(_OP, batch_size=0), ValueError, "`batch_size`"),
    ("rel_tol<0", lambda: hessian_trace(_OP, rel_tol=-0.1), ValueError, "`rel_tol`"),
    ("abs_tol<0", lambda: hessian_trace(_OP, abs_tol=-1.0), ValueError, "`abs_tol`"),
    ("tols=0", lambda: hessian_trace(_OP, rel_tol=0.0, abs_tol=0.0), ValueError, "`rel_tol`"),
    ("fixed+adaptive", lambda: hessian_trace(_OP, num_probes=5, rel_tol=0.1), ValueError, "`num_probes`"),
    ("min_probes", lambda: hessian_trace(_OP, rel_tol=0.1, min_probes=1), ValueError, "`min_probes`"),
    ("max_probes", lambda: hessian_trace(_OP, rel_tol=0.1, min_probes=30, max_probes=5), ValueError, "`max_probes`"),
    ("hutch++-adaptive", lambda: hessian_trace(_OP, method="hutch++", rel_tol=0.1), ValueError, "`rel_tol`"),
    ("trace-seed", lambda: hessian_trace(_OP, seed=1.5), TypeError, "`seed`"),
    ("level", lambda: _ESTIMATE.confidence_interval(1.5), ValueError, "`level`"),
    ("num_runs", lambda: spectral_density(_OP, num_runs=0), ValueError, "`num_runs`"),
    ("num_steps", lambda: spectral_density(_OP, num_steps=0), ValueError, "`num_steps`"),
    ("grid_size", lambda: spectral_density(_OP, grid_size=1), ValueError, "`grid_size`"),
    ("sigma", lambda: spectral_density(_OP, sigma=0.0), ValueError, "`sigma`"),
    ("sigma_fraction", lambda: spectral_density(_OP, sigma_fraction=-1.0), ValueError, "`sigma_fraction`"),
    ("density-probe", lambda: spectral_density(_OP, probe="sobol"), ValueError, "`probe`"),
    ("starts", lambda: lanczos(_OP, torch.ones(19, 1), 5), ValueError, "`starts`"),
    ("zero-start", lambda: lanczos(_OP, torch.zeros(20, 1), 5), ValueError, "start"),
    ("backend", lambda: _tiny_op(backend="jax"), ValueError, "`backend`"),
    ("max_batched_vectors", lambda: _tiny_op(max_batched_vectors=0), ValueError, "`max_batched_vectors`"),
    ("model", lambda: HessianOperator(lambda x: x, F.cross_entropy, _tiny()[1]), TypeError, "`model`"),
    ("neither-loss", lambda: HessianOperator(_tiny()[0], data=_tiny()[1]), TypeError, "`loss_fn`"),
    ("both-losses", lambda: _tiny_op(batch_loss=_dict_loss), TypeError, "`batch_loss`"),
    ("matrix", lambda: MatrixOperator(torch.eye(3, dtype=torch.long)), TypeError, "`matrix`"),
]


@pytest.mark.parametrize(("call", "exc", "name"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_invalid_arguments_are_named(call, exc, name):
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value), str(info.value)
    assert _OP.num_hvps == 0  # validation happens before any product


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_compute_dtype_float64_removes_the_float32_floor(mlp_truth, backend):
    """A float32 model analysed in float64: products match the exact Hessian to ~1e-12 and the
    top eigenvalue to 1e-6 relative in <= 40 HVPs; the model keeps its dtype and values."""
    model = mlp_truth.model
    assert next(model.parameters()).dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, F.cross_entropy, mlp_truth.batches, backend=backend, compute_dtype=torch.float64)
    assert op.dtype == torch.float64
    v = torch.randn(op.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = mlp_truth.hessian @ v
    rel = (op.matmat(v) - exact).norm() / exact.norm()
    assert rel < 1e-6  # float32 products sit at ~1e-7..1e-6; float64 ones at the inputs' rounding
    from lightning_hessian import top_eigenvalues

    result = top_eigenvalues(op, k=1)
    top = mlp_truth.eigvals[-1]
    assert result.num_hvps <= 40
    assert abs(float(result.values[0]) - float(top)) / float(top) <= 1e-6
    for a, b in zip(before, model.parameters(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_compute_dtype_rejects_non_float():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="compute_dtype"):
        HessianOperator(model, F.mse_loss, [(torch.ones(1, 2), torch.ones(1, 2))], compute_dtype=torch.int64)
