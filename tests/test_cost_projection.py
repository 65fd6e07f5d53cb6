"""Say the price before charging it: the dry run's projected cost of one evaluation (INFO), in
training epochs after the first epoch, and one warning above ~5 epochs naming the knobs."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._cost import (
    EXPENSIVE_EPOCHS,
    CostProjection,
    analysis_scale,
    check_against_epoch,
    report_projection,
    volume_cost_projection,
)
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _projection(seconds_per_unit: float = 0.5) -> CostProjection:
    return CostProjection("HessianMonitor", units=120, unit="HVPs", seconds_per_unit=seconds_per_unit, knobs="K")


def test_projection_is_units_times_seconds_and_logged_at_info(caplog):
    projection = _projection(0.25)
    assert projection.seconds == 30.0
    with caplog.at_level(logging.INFO, logger="lightning_hessian"):
        report_projection(projection, is_global_zero=True)
        report_projection(projection, is_global_zero=False)  # rank zero only
    records = [r for r in caplog.records if r.name == "lightning_hessian"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "120 HVPs x 0.25 s = 30 s" in records[0].getMessage()


def test_epoch_multiple_logged_once_and_warning_above_five_epochs(caplog):
    projection = _projection(0.5)  # 60 s
    with caplog.at_level(logging.INFO, logger="lightning_hessian"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_against_epoch(projection, 10.0, is_global_zero=True)  # 6 epochs > 5
        check_against_epoch(projection, 10.0, is_global_zero=True)  # once only
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_hessian"]
    assert messages == ["HessianMonitor: one evaluation will cost about 60 s = 6x the first training epoch (10 s)"]
    costly = [w for w in caught if "projected to cost" in str(w.message)]
    assert len(costly) == 1 and "6.0 training epochs" in str(costly[0].message) and "K" in str(costly[0].message)


def test_no_warning_at_or_below_the_threshold(caplog):
    projection = _projection(EXPENSIVE_EPOCHS * 10.0 / 120)  # exactly 5 epochs of 10 s
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="lightning_hessian"):
        warnings.simplefilter("always")
        check_against_epoch(projection, 10.0, is_global_zero=True)
    assert not [w for w in caught if "projected to cost" in str(w.message)]
    assert any("5x the first training epoch" in r.getMessage() for r in caplog.records)


def test_unknown_epoch_time_waits_for_a_known_one():
    projection = _projection()
    check_against_epoch(projection, None, is_global_zero=True)
    check_against_epoch(projection, 0.0, is_global_zero=True)
    assert not projection.epoch_checked


def test_analysis_scale_weighs_the_set_against_the_first_batch():
    import torch

    data = [(torch.zeros(4, 1),), (torch.zeros(4, 1),), (torch.zeros(2, 1),)]
    assert analysis_scale(None, data[0], data) == 2.5
    assert analysis_scale(lambda b: 1.0, data[0], data) == 3.0
    assert analysis_scale(lambda b: 1 / 0, data[0], data) == 3.0  # a failing weight: the batch count


def test_volume_projection_counts_anchor_plus_directions():
    projection = volume_cost_projection(
        "LocalVolumeMonitor", dry_run_passes=5, dry_run_seconds=1.0, num_directions=10, scale=2.0
    )
    assert projection is not None
    assert projection.units == 1 + 10 * 4 and projection.seconds_per_unit == pytest.approx(0.4)
    assert volume_cost_projection("LocalVolumeMonitor", 0, 1.0, 10, 1.0) is None


class _Dear(HessianMonitor):
    """The real dry-run measurement, then made 1e6 times dearer (a model whose products are slow)."""

    def _dry_run(self, trainer, pl_module):
        super()._dry_run(trainer, pl_module)
        assert self._projection is not None
        self._projection.seconds_per_unit *= 1e6


def _fit(callback, epochs: int = 2) -> None:
    loader = DataLoader(digits_dataset(256), batch_size=64)
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=epochs, callbacks=[callback]))
    trainer.fit(DigitsModule(), loader)


def test_hessian_monitor_logs_the_projection_and_warns_once_when_dear(caplog):
    monitor = _Dear(every_n_epochs=10, num_steps=4, num_runs=2)  # never evaluates within the fit
    with caplog.at_level(logging.INFO, logger="lightning_hessian"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(monitor)
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_hessian"]
    assert any("_Dear: one evaluation will cost about 8 HVPs x" in m for m in messages)
    assert sum("x the first training epoch" in m for m in messages) == 1  # after epoch 0 only
    costly = [str(w.message) for w in caught if "projected to cost" in str(w.message)]
    assert len(costly) == 1
    for knob in ("every_n_epochs", "every_n_train_steps", "max_samples", "num_steps", "max_overhead"):
        assert knob in costly[0]
    assert monitor._projection is not None and monitor._projection.units == 8


def test_hessian_monitor_projection_is_the_measured_product_time():
    monitor = HessianMonitor(every_n_epochs=10, num_steps=4, num_runs=2)
    ticks = iter(range(10_000))
    monitor._timer = lambda: float(next(ticks))  # type: ignore[method-assign]  # 1 s between any two readings
    _fit(monitor, epochs=1)
    projection = monitor._projection
    assert projection is not None
    # the timed product of 2 vectors took 1 fake second on the analysis set's one micro-batch
    assert monitor.analysis.num_samples == 26
    assert projection.seconds_per_unit == pytest.approx(0.5) and projection.seconds == pytest.approx(4.0)


def test_local_volume_monitor_logs_forward_passes(caplog):
    monitor = LocalVolumeMonitor(every_n_epochs=10, num_directions=3, preconditioner=None)
    with caplog.at_level(logging.INFO, logger="lightning_hessian"):
        _fit(monitor, epochs=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_hessian"]
    assert any("LocalVolumeMonitor: one evaluation will cost about" in m and "forward passes" in m for m in messages)
    assert any(
        "LocalVolumeMonitor: one evaluation will cost about" in m and "first training epoch" in m for m in messages
    )
