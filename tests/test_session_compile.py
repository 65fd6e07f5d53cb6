"""Sessions (one preparation per evaluation), batched double backward and compile=True: same
products as the exact float64 Hessian, the model as found, a clean eager fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.estimators.eigen import top_eigenvalues
from lightning_hessian.operators import HessianOperator
from lightning_hessian.operators._products import DoubleBackward
from tests.helpers import exact_hessian

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),  # torch.optim
]

F32_REL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b).norm() / b.norm())


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(32, 6))
    return model.eval()


def _data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (10, 7)]


def _matrix(n: int, k: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("compute_dtype", [None, torch.float64])
def test_session_products_equal_exact_hessian_and_products_outside(backend, compute_dtype):
    model, data = _bn_model(), _data()
    H = exact_hessian(model, data)
    op = HessianOperator(model, F.cross_entropy, data, backend=backend, compute_dtype=compute_dtype)
    V = _matrix(op.num_params, 4)
    outside = op.matmat(V)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with op.session() as same:
        assert same is op
        inside = [op.matmat(V), op.matmat(V[:, :1]), op.matvec(V[:, 2])]
        with op.session():  # re-entrant: part of the outer session
            nested = op.matmat(V)
        assert not model.training  # analysis mode held for the whole session
    assert model.training is False and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    tol = 1e-12 if compute_dtype is torch.float64 else F32_REL
    for got, want in ((outside, H @ V), (inside[0], H @ V), (inside[1], H @ V[:, :1]), (nested, H @ V)):
        assert _rel(got, want) < tol
    assert _rel(inside[2], H @ V[:, 2]) < tol
    assert op.num_hvps == 4 + 4 + 1 + 1 + 4


def test_session_restores_training_flags_and_follows_parameters_changed_in_place():
    model, data = _bn_model(), _data()
    model.train()
    op = HessianOperator(model, F.cross_entropy, data, compute_dtype=torch.float64)  # cached cast copies
    V = _matrix(op.num_params, 2)
    exact_before = exact_hessian(model, data) @ V
    with op.session():
        before = op.matmat(V)
        with torch.no_grad():
            model[0].weight.mul_(1.5)  # in place: the prepared casts are stale and must be rebuilt
        after = op.matmat(V)
    assert model.training  # restored when the session ends
    assert _rel(before, exact_before) < 1e-12
    assert _rel(after, exact_hessian(model, data) @ V) < 1e-12


def test_buffers_written_by_a_product_are_restored_after_each_product_of_a_session():
    model, data = _bn_model(), _data()
    counter = model[1].num_batches_tracked
    start = counter.clone()

    def batch_loss(m: nn.Module, batch):  # a loss that writes a buffer (as a train-mode BatchNorm would)
        m[1].num_batches_tracked.add_(1)
        m[1].running_mean.add_(0.0)
        return F.cross_entropy(m(batch[0]), batch[1])

    op = HessianOperator(model, data=data, batch_loss=batch_loss, backend="autograd")
    op._double_backward.batched[2] = False  # one form: identical arithmetic in both products
    V = _matrix(op.num_params, 2)
    with op.session():
        first = op.matmat(V)
        assert torch.equal(counter, start)  # restored right after the product
        second = op.matmat(V)
    assert torch.equal(first, second) and torch.equal(counter, start)
    assert _rel(first, exact_hessian(model, data) @ V) < F32_REL


@pytest.mark.parametrize("batched", [True, False])
def test_double_backward_batched_and_looped_forms_match_exact(batched):
    model, data = _bn_model(), _data()
    H = exact_hessian(model, data)
    op = HessianOperator(model, F.cross_entropy, data, backend="autograd")
    op._double_backward.batched[5] = batched  # force the form (no timing)
    V = _matrix(op.num_params, 5)
    assert _rel(op.matmat(V), H @ V) < F32_REL
    assert op._double_backward.batched[5] is batched and not op._double_backward.batched_failed


def test_double_backward_measures_both_forms_once_per_width():
    model, data = _bn_model(), _data()
    op = HessianOperator(model, F.cross_entropy, data, backend="autograd")
    V = _matrix(op.num_params, 3)
    op.matmat(V)
    assert set(op._double_backward.batched) == {3}
    choice = op._double_backward.batched[3]
    op.matmat(V)
    assert op._double_backward.batched == {3: choice}


def test_double_backward_falls_back_to_the_loop_where_batching_fails():
    tangents = [torch.randn(2, 3)]
    x = torch.randn(3, requires_grad=True)
    (grad,) = torch.autograd.grad((x**3).sum(), [x], create_graph=True)
    form = DoubleBackward()

    def failing(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return original(*args, **kwargs)

    original = torch.autograd.grad
    torch.autograd.grad = failing  # type: ignore[assignment]
    try:
        out = form.products([grad], [x], tangents, 2, None)
    finally:
        torch.autograd.grad = original  # type: ignore[assignment]
    assert form.batched_failed
    assert out[0] is not None and torch.allclose(out[0], 6 * x.detach() * tangents[0])


def test_top_eigenvalue_inside_a_session_equals_outside():
    model, data = _bn_model(), _data()
    op = HessianOperator(model, F.cross_entropy, data, compute_dtype=torch.float64)
    outside = top_eigenvalues(op, k=1, seed=0).values[0]
    with op.session():
        inside = top_eigenvalues(op, k=1, seed=0).values[0]
    exact = torch.linalg.eigvalsh(exact_hessian(model, data))[-1]
    # within the estimator's stated tolerance of the exact value, and the same as without a session
    assert abs(float(inside) - float(exact)) < 1e-6 * abs(float(exact))
    assert abs(float(inside) - float(outside)) < 1e-12 * abs(float(exact))


# --------------------------------------------------------------------------------------------
# compile=True
# --------------------------------------------------------------------------------------------


def _tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, _data()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_compiled_products_match_eager_and_exact(backend):
    model, data = _tiny()
    H = exact_hessian(model, data)
    eager = HessianOperator(model, F.cross_entropy, data, backend=backend)
    compiled = HessianOperator(model, F.cross_entropy, data, backend=backend, compile=True)
    V = _matrix(eager.num_params, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: it compiled
        with compiled.session():
            got = compiled.matmat(V)
            got_again = compiled.matmat(V)
    assert compiled._compiler is not None and not compiled._compiler.failed
    assert _rel(got, eager.matmat(V)) < F32_REL and _rel(got, H @ V) < F32_REL
    assert torch.equal(got, got_again)


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_with_one_warning():
    model, data = _tiny()

    def breaking_loss(m: nn.Module, batch):
        torch._dynamo.graph_break()  # fullgraph=True: compilation fails here
        return F.cross_entropy(m(batch[0]), batch[1])

    op = HessianOperator(model, data=data, batch_loss=breaking_loss, backend="func", compile=True)
    V = _matrix(op.num_params, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = op.matmat(V)
        second = op.matmat(V)
    fallbacks = [str(w.message) for w in record if "torch.compile" in str(w.message)]
    assert len(fallbacks) == 1 and "torch.compile of the 'func' product failed" in fallbacks[0]
    assert op._compiler is not None and "func" in op._compiler.failed
    assert _rel(first, exact_hessian(model, data) @ V) < F32_REL and torch.equal(first, second)


def test_compile_does_not_hide_a_genuine_error_of_the_loss():
    model, data = _tiny()

    def bad_loss(m: nn.Module, batch):
        raise ValueError("broken user loss")

    op = HessianOperator(model, data=data, batch_loss=bad_loss, backend="func", compile=True)
    with pytest.raises(ValueError, match="broken user loss"):
        op.matmat(_matrix(op.num_params, 1))


@pytest.mark.slow
def test_compiled_finite_difference_gradients_match_eager_finite_differences():
    model, data = _tiny()
    H = exact_hessian(model, data)
    eager = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    compiled = HessianOperator(model, F.cross_entropy, data, backend="finite_difference", compile=True)
    V = _matrix(eager.num_params, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = compiled.matmat(V)
    assert compiled._compiler is not None and not compiled._compiler.failed
    assert "gradient" in compiled._compiler._compiled  # the compiled gradient was used
    assert _rel(got, eager.matmat(V)) < 1e-4 and _rel(got, H @ V) < 1e-3
