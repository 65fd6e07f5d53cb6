"""Numbers that may mislead say so: each misleading configuration of the issue's table warns or flags."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.callbacks._honesty import MIN_ANALYSIS_SAMPLES, TOP_EIGENVALUE_RTOL
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs


def _fit(monitor: HessianMonitor, hidden: int = 16, epochs: int = 1) -> list[str]:
    pl.seed_everything(0, verbose=False)
    module = DigitsModule(hidden=hidden)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=epochs)).fit(module, digits_loader(limit=300))
    return [str(w.message) for w in caught]


def _options(**kwargs: Any) -> dict[str, Any]:
    return {"analysis_fraction": 1 / 3, "log_density": False, "detect_sharp_drop": False, **kwargs}


def test_too_few_steps_warn_at_construction_and_flag_unconverged() -> None:
    with pytest.warns(UserWarning, match=r"`num_steps`=1 is too few .* max\(20, 3 \* top_k\) = 20"):
        monitor = HessianMonitor(**_options(num_steps=1))
    messages = _fit(monitor, epochs=2)
    rows = monitor.history
    assert [row["top_eigenvalue_converged"] for row in rows] == [0.0, 0.0]
    assert all(row["top_eigenvalue_residual"] > TOP_EIGENVALUE_RTOL * abs(row["top_eigenvalue"]) for row in rows)
    unconverged = [m for m in messages if "has not converged" in m]
    assert len(unconverged) == 1 and "Raise `num_steps` (now 1)" in unconverged[0]  # once per fit


def test_default_steps_converge_and_stay_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = HessianMonitor(**_options())
    messages = _fit(monitor)
    assert [row["top_eigenvalue_converged"] for row in monitor.history] == [1.0]
    assert not any("has not converged" in m or "too few" in m for m in messages)


def test_top_k_raises_the_step_rule() -> None:
    with pytest.warns(UserWarning, match=r"`num_steps`=25 .* = 30"):
        HessianMonitor(num_steps=25, top_k=10)


def test_num_steps_beyond_num_params_is_capped_at_the_dry_run() -> None:
    monitor = HessianMonitor(**_options(num_steps=10**9, num_runs=2))
    messages = _fit(monitor, hidden=2)
    num_params = 64 * 2 + 2 + 2 * 10 + 10
    (capped,) = [m for m in messages if "exceeds the number of trainable parameters" in m]
    assert f"({num_params})" in capped and f"Capped at {num_params}" in capped
    assert monitor.history[0]["num_hvps"] <= 2 * num_params


def test_tiny_analysis_set_warns_naming_the_arguments() -> None:
    messages = _fit(HessianMonitor(**_options(analysis_fraction=1e-9)))
    (tiny,) = [m for m in messages if "the analysis set has only" in m]
    assert "only 1 sample(s)" in tiny and "`analysis_fraction` (now 1e-09)" in tiny and "`max_samples`" in tiny
    big = _fit(HessianMonitor(**_options(max_samples=MIN_ANALYSIS_SAMPLES)))
    assert not any("the analysis set has only" in m for m in big)


def test_one_run_warns_that_the_interval_is_undefined() -> None:
    with pytest.warns(UserWarning, match=r"`num_runs`=1 .* undefined and logged as NaN"):
        monitor = HessianMonitor(**_options(num_runs=1))
    _fit(monitor)
    row = monitor.history[0]
    assert torch.isnan(torch.tensor([row["trace_stderr"], row["trace_ci_low"], row["trace_ci_high"]])).all()
