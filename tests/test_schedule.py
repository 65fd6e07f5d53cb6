"""Step-based schedules (``every_n_train_steps``) of both monitors, and the schedule object itself."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._schedule import EvaluationSchedule
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs


class DigitsStream(IterableDataset):
    """A streaming dataset: an endless, seeded stream of digits samples (no length)."""

    def __init__(self, seed: int = 0) -> None:
        self.x, self.y = digits_dataset().tensors
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            for i in torch.randperm(len(self.y), generator=generator).tolist():
                yield self.x[i], self.y[i]


def _hessian_monitor(**kwargs) -> HessianMonitor:
    kwargs.setdefault("num_runs", 2)
    kwargs.setdefault("num_steps", 6)
    return HessianMonitor(log_density=False, **kwargs)


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- schedule object


def test_schedule_validation_and_due_points():
    with pytest.raises(ValueError, match=r"at most one of `every_n_epochs`.*`every_n_train_steps`"):
        EvaluationSchedule(every_n_epochs=1, every_n_train_steps=5)
    with pytest.raises(ValueError, match="every_n_train_steps"):
        EvaluationSchedule(every_n_train_steps=0)
    with pytest.raises(ValueError, match="max_overhead"):
        EvaluationSchedule(max_overhead=0.0)
    default = EvaluationSchedule()
    assert (default.every_n_epochs, default.every_n_train_steps, default.unit) == (1, None, "epoch")
    assert [e for e in range(6) if EvaluationSchedule(every_n_epochs=2).due_at_epoch_end(e)] == [1, 3, 5]
    steps = EvaluationSchedule(every_n_train_steps=3)
    assert steps.every_n_epochs is None and steps.unit == "step"
    assert not any(steps.due_at_epoch_end(e) for e in range(5))
    due = []
    for step in [0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7, 9]:  # repeated steps: gradient accumulation
        if steps.due_at_step(step):
            steps.mark_step(step)
            due.append(step)
    assert due == [3, 6, 9]
    restored = EvaluationSchedule(every_n_train_steps=3)
    restored.load_state_dict(steps.state_dict())
    assert not restored.due_at_step(9) and restored.due_at_step(12)


def test_monitors_reject_both_schedules():
    with pytest.raises(ValueError, match=r"every_n_epochs.*every_n_train_steps"):
        HessianMonitor(every_n_epochs=1, every_n_train_steps=10)
    with pytest.raises(ValueError, match=r"every_n_epochs.*every_n_train_steps"):
        LocalVolumeMonitor(every_n_epochs=2, every_n_train_steps=10)
    assert HessianMonitor().every_n_epochs == 1
    assert HessianMonitor(every_n_train_steps=4).every_n_epochs is None


# ---------------------------------------------------------------------------------- in training


@pytest.mark.parametrize("data", ["stream", "map"])
def test_step_schedule_evaluates_at_the_right_steps_and_lr0_gives_identical_values(tmp_path, data):
    if data == "stream":
        loader = DataLoader(DigitsStream(), batch_size=32)
        monitors = [
            _hessian_monitor(every_n_train_steps=3, max_samples=96, analysis_batch_size=48),
            LocalVolumeMonitor(
                every_n_train_steps=3, max_samples=96, num_directions=8, preconditioner=None, prior_std=1.0
            ),
        ]
    else:  # 400 samples / 64 = 7 batches per epoch: evaluations cross epoch boundaries
        loader = DataLoader(digits_dataset(400), batch_size=64, shuffle=True)
        monitors = [
            _hessian_monitor(every_n_train_steps=3, analysis_fraction=0.25),
            LocalVolumeMonitor(
                every_n_train_steps=3, analysis_fraction=0.25, num_directions=8, preconditioner=None, prior_std=1.0
            ),
        ]
    logger = CSVLogger(tmp_path, name="csv")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=monitors, **trainer_kwargs(max_epochs=-1, max_steps=10, logger=logger))
    trainer.fit(DigitsModule(hidden=16, lr=0.0), loader)
    assert trainer.global_step == 10
    hessian, volume = monitors
    for monitor, key in ((hessian, "trace"), (volume, "log_volume")):
        assert [row["step"] for row in monitor.history] == [3.0, 6.0, 9.0]
        if data == "map":
            assert [row["epoch"] for row in monitor.history] == [0.0, 0.0, 1.0]
        values = [row[key] for row in monitor.history]
        assert all(math.isfinite(v) for v in values)
        assert values[0] == values[1] == values[2]  # lr=0: same weights, same analysis set, same probes
        assert trainer.callback_metrics[f"{monitor.prefix}{key}"] == pytest.approx(values[-1])
    # the logger got every evaluation at its step, although log_every_n_steps=50
    rows = _csv_rows(logger)
    logged = {int(r["step"]): float(r["hessian/trace"]) for r in rows if r.get("hessian/trace")}
    assert logged == {3: hessian.history[0]["trace"], 6: hessian.history[1]["trace"], 9: hessian.history[2]["trace"]}
    assert {int(r["step"]) for r in rows if r.get("volume/log_volume")} == {3, 6, 9}


def test_step_schedule_with_gradient_accumulation_and_early_stopping():
    monitor = _hessian_monitor(every_n_train_steps=2, analysis_fraction=0.1)
    stopper = EarlyStopping(monitor="hessian/trace", mode="max", patience=100, check_on_train_epoch_end=True)
    pl.seed_everything(0, verbose=False)
    # 320 samples / 32 = 10 batches per epoch, 2 batches per optimizer step: 5 steps per epoch
    trainer = pl.Trainer(callbacks=[monitor, stopper], **trainer_kwargs(max_epochs=2, accumulate_grad_batches=2))
    trainer.fit(DigitsModule(hidden=16), DataLoader(digits_dataset(320), batch_size=32))
    assert trainer.global_step == 10
    assert [row["step"] for row in monitor.history] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert [row["epoch"] for row in monitor.history] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # EarlyStopping reads the latest step-logged value at each epoch end (steps 4 and 10; it
    # raises if the metric is missing)
    traces = [row["trace"] for row in monitor.history]
    assert stopper.best_score.item() == pytest.approx(max(traces[1], traces[4]), rel=1e-6)


def test_epoch_schedule_history_rows_carry_step():
    monitor = _hessian_monitor(every_n_epochs=2, analysis_fraction=0.1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=4))
    trainer.fit(DigitsModule(hidden=16), DataLoader(digits_dataset(256), batch_size=64))
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(1.0, 8.0), (3.0, 16.0)]


def test_resume_restores_the_step_schedule(tmp_path):
    def fit(max_steps, ckpt=None, monitor=None):
        monitor = monitor or _hessian_monitor(every_n_train_steps=3, analysis_fraction=0.1)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            callbacks=[monitor],
            **trainer_kwargs(max_epochs=-1, max_steps=max_steps, enable_checkpointing=True, default_root_dir=tmp_path),
        )
        # 4 batches per epoch, no shuffling: a resume at an epoch end continues the same data order
        trainer.fit(DigitsModule(hidden=16), DataLoader(digits_dataset(256), batch_size=64), ckpt_path=ckpt)
        return trainer, monitor

    _, whole = fit(16)
    first, part = fit(8)
    path = tmp_path / "at8.ckpt"
    first.save_checkpoint(path)
    _, resumed = fit(16, ckpt=str(path))
    assert [row["step"] for row in part.history] == [3.0, 6.0]
    assert [row["step"] for row in resumed.history] == [3.0, 6.0, 9.0, 12.0, 15.0]
    assert [row["step"] for row in whole.history] == [3.0, 6.0, 9.0, 12.0, 15.0]
    assert [r["trace"] for r in resumed.history[:2]] == [
        r["trace"] for r in part.history
    ]  # restored from the checkpoint, not re-evaluated
    # (training itself is not bit-identical across a Lightning resume from a max_steps checkpoint,
    # with or without the monitor, so later values are not compared)
    assert resumed.schedule.num_evaluations == 5


def test_sharp_drop_in_evaluation_units(monkeypatch):
    """Under a step schedule the detector counts evaluations; patience is in evaluations."""
    series = [100, 103, 98, 101, 99, 102, 100, 97, 60, 31, 29, 32, 30, 31, 30, 29, 31, 30]
    monitor = _hessian_monitor(every_n_train_steps=2, stop_on_sharp_drop=True, sharp_drop_patience=5)
    calls = iter(series)

    def fake_compute(trainer, pl_module):
        values = monitor._nan_values(0.0)
        values.update(trace=float(next(calls)), trace_stderr=2.0, num_hvps=0.0)
        return values, None

    monkeypatch.setattr(monitor, "_compute", fake_compute)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=-1, max_steps=2 * len(series)))
    trainer.fit(DigitsModule(hidden=8), DataLoader(digits_dataset(128), batch_size=32))
    # the series' drop: start at evaluation 7, middle at evaluation 8, confirmed at evaluation 10
    # (the detector's own docstring example); evaluation i runs at step 2 (i + 1)
    flags = [row["trace_sharp_drop"] for row in monitor.history]
    assert flags.index(1.0) == 10
    assert monitor.history[-1]["trace_sharp_drop_step"] == 18.0  # evaluation 8
    assert "trace_sharp_drop_epoch" not in monitor.history[-1]
    # stop `patience`=5 evaluations after the middle: evaluation 13, step 28
    assert monitor.stopped_step == 28 == trainer.global_step
    assert len(monitor.history) == 14
