"""``backend="auto"``: the HVP path chosen by measurement per product width (injected clock)."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_hessian import HessianOperator
from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.operators._backend import BackendSelector
from tests.helpers import analysis_batches, exact_hessian
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs

F32_REL = 2e-5


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _with_costs(op: HessianOperator, func_cost, autograd_cost) -> dict[str, int]:
    """Make each path take ``cost(width)`` fake seconds per micro-batch; count the calls."""
    clock = FakeClock()
    op._selector.clock = clock
    calls = {"func": 0, "autograd": 0}
    func_hvp, autograd_hvp = op._func_hvp, op._autograd_hvp

    def timed_func(batch, tangents):
        calls["func"] += 1
        clock.now += func_cost(tangents[0].shape[0])
        return func_hvp(batch, tangents)

    def timed_autograd(batch, tangents):
        calls["autograd"] += 1
        clock.now += autograd_cost(tangents[0].shape[0])
        return autograd_hvp(batch, tangents)

    op._func_hvp, op._autograd_hvp = timed_func, timed_autograd  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def small_truth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    batches = analysis_batches(fraction=0.05, batch_size=30)  # 3 micro-batches (30, 30, 30)
    H = exact_hessian(model, batches)
    assert torch.allclose(H, H.T, atol=1e-12)
    return model, batches, H


def test_auto_keeps_the_faster_path_per_width_and_products_stay_exact(small_truth, caplog):
    model, batches, H = small_truth
    op = HessianOperator(model, F.cross_entropy, batches)
    # double backward wins for 1 vector, forward-over-reverse for 3 (like a GPU; issue 11's table)
    calls = _with_costs(op, func_cost=lambda k: 3.0 + 0.5 * k, autograd_cost=lambda k: 2.0 * k)
    assert op.backend == "auto" and op.backend_for(1) is None
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="lightning_hessian"):
        hv1 = op.matvec(V[:, 0])
        hv3 = op.matmat(V)
        op.matvec(V[:, 1])
        op.matmat(V)
    # timed products are the real products of their batch: every result is exact
    assert _rel(hv1, H @ V[:, 0]) < F32_REL
    assert _rel(hv3, H @ V) < F32_REL
    assert op.backend_choices == {1: "autograd", 3: "func"}
    assert op.backend_for(1) == "autograd" and op.backend_for(3) == "func" and op.backend == "func"
    assert op.backend_timings[1] == {"func": 3.5, "autograd": 2.0}
    assert op.backend_timings[3] == {"func": 4.5, "autograd": 6.0}
    # HVPs are counted as columns, timing or not
    assert op.num_hvps == 1 + 3 + 1 + 3
    # measured on the first micro-batch only: two rounds of both paths (no third: they differ by
    # more than 1.3x for both widths), i.e. 3 extra batch products per width
    records = [r for r in caplog.records if r.name == "lightning_hessian"]
    assert len(records) == 2  # logged once per width
    assert "1 vector use double backward" in records[0].getMessage()
    assert "3 vectors use forward-over-reverse" in records[1].getMessage()
    assert calls["func"] + calls["autograd"] == 4 * 3 + 2 * 3  # 4 products x 3 batches + timing extras


def test_timings_are_minima_over_rounds_and_close_ones_get_a_third(small_truth):
    model, batches, _ = small_truth
    op = HessianOperator(model, F.cross_entropy, batches)
    # func: a slow first call, then faster; after two rounds 0.9 vs 1.0 (within 1.3x): a third round
    costs = {"func": iter([1.2, 0.95, 0.9]), "autograd": iter([1.0, 1.1, 1.05])}
    clock = FakeClock()
    op._selector.clock = clock
    func_hvp, autograd_hvp = op._func_hvp, op._autograd_hvp

    def timed(name, fn):
        def wrapped(batch, tangents):
            clock.now += next(costs[name], 0.0)
            return fn(batch, tangents)

        return wrapped

    op._func_hvp, op._autograd_hvp = timed("func", func_hvp), timed("autograd", autograd_hvp)  # type: ignore[method-assign]
    op.matmat(torch.randn(op.num_params, 2))
    assert next(costs["func"], None) is None and next(costs["autograd"], None) is None  # 3 rounds used
    assert op.backend_timings[2] == pytest.approx({"func": 0.9, "autograd": 1.0})
    assert op.backend_for(2) == "func"


def test_forced_paths_and_fixed_rule_do_not_measure(small_truth, caplog):
    model, batches, H = small_truth
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    for backend in ("func", "autograd"):
        op = HessianOperator(model, F.cross_entropy, batches, backend=backend)
        calls = _with_costs(op, lambda k: 1.0, lambda k: 1.0)
        with caplog.at_level(logging.INFO, logger="lightning_hessian"):
            assert _rel(op.matmat(V), H @ V) < F32_REL
        assert calls[backend] == 3 and sum(calls.values()) == 3
        assert op.backend_for(7) == op.backend == backend and op.backend_choices == {}
    rule = HessianOperator(model, F.cross_entropy, batches, func_min_vectors=2)
    calls = _with_costs(rule, lambda k: 1.0, lambda k: 1.0)
    rule.matvec(V[:, 0])
    rule.matmat(V)
    assert calls == {"func": 3, "autograd": 3}
    assert rule.backend_for(1) == "autograd" and rule.backend_for(2) == "func"
    assert not [r for r in caplog.records if r.name == "lightning_hessian"]


def test_reused_choices_skip_the_measurement(small_truth):
    model, batches, H = small_truth
    first = HessianOperator(model, F.cross_entropy, batches)
    _with_costs(first, lambda k: 1.0, lambda k: 2.0)
    first.matmat(torch.randn(H.shape[0], 4))
    assert first.backend_choices == {4: "func"}
    again = HessianOperator(model, F.cross_entropy, batches, backend_choices=first.backend_choices)
    calls = _with_costs(again, lambda k: 1.0, lambda k: 2.0)
    again.matmat(torch.randn(H.shape[0], 4))
    assert calls == {"func": 3, "autograd": 0}
    with pytest.raises(ValueError, match="backend_choices"):
        HessianOperator(model, F.cross_entropy, batches, backend_choices={4: "jax"})
    with pytest.raises(ValueError, match="func_min_vectors"):
        HessianOperator(model, F.cross_entropy, batches, func_min_vectors=0)


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _NoJvpTanh(nn.Module):
    def forward(self, x):
        return _NoJvp.apply(x)


def test_measurement_falls_back_when_forward_mode_fails(small_truth):
    model, batches, _ = small_truth
    torch.manual_seed(0)
    custom = nn.Sequential(nn.Linear(64, 12), _NoJvpTanh(), nn.Linear(12, 10))
    custom.load_state_dict(model.state_dict())
    H = exact_hessian(model, batches)  # same function
    op = HessianOperator(custom, F.cross_entropy, batches)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        HV = op.matmat(V)
    assert _rel(HV, H @ V) < 1e-4  # the custom backward is differentiated in float32 here
    assert op.backend == "autograd" and op.backend_for(1) == "autograd" and op.backend_for(3) == "autograd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        op.matvec(V[:, 0])


def test_selector_validation():
    with pytest.raises(ValueError, match="`backend`"):
        BackendSelector("jax")  # type: ignore[arg-type]
    assert BackendSelector("auto", func_min_vectors=4).path_for(3) == "autograd"


def test_monitor_measures_once_per_run(caplog):
    monitor = HessianMonitor(num_runs=2, num_steps=4, log_density=False, analysis_fraction=0.1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=3))
    with caplog.at_level(logging.INFO, logger="lightning_hessian"):
        trainer.fit(DigitsModule(hidden=8), DataLoader(digits_dataset(128), batch_size=32))
    records = [r for r in caplog.records if r.name == "lightning_hessian" and "vectors use" in r.getMessage()]
    assert len(records) == 1 and "products of 2 vectors" in records[0].getMessage()
    assert set(monitor.backend_choices) == {2}
    assert monitor.state_dict()["backend_choices"] == monitor.backend_choices
    with pytest.raises(ValueError, match="hvp_backend"):
        HessianMonitor(hvp_backend="jax")  # type: ignore[arg-type]
