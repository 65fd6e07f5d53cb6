"""The cost budget ``max_overhead``: deterministic skip logic under an injected clock (no timing)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._schedule import EvaluationSchedule
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _simulate(max_overhead, train_intervals, costs, check=True):
    """Drive a schedule: ``train_intervals[i]`` s of training, then due point i; returns who ran."""
    clock = FakeClock()
    schedule = EvaluationSchedule(max_overhead=max_overhead, clock=clock)
    schedule.start()
    ran, overheads = [], []
    cost_iter = iter(costs)
    for i, interval in enumerate(train_intervals):
        clock.advance(interval)
        if not schedule.within_budget():
            schedule.skip()
            continue
        # the rule, restated: first always; else cumulative + last cost within the budget
        schedule.begin()
        clock.advance(next(cost_iter))
        overheads.append(schedule.overhead())
        schedule.finish()
        ran.append(i)
        if check and len(ran) > 1:  # holds while no evaluation costs more than the one before
            assert schedule.evaluation_seconds <= max_overhead * schedule.training_seconds + 1e-12
    return ran, overheads, schedule


def test_budget_skips_exactly_what_it_needs():
    # 1 s of training between due points, each evaluation costs 1 s, budget 0.5:
    # run at 0 (C=1, T=1); then C + 1 <= 0.5 T first holds at T=4 (due point 3), C=2; T=6 -> C=3; ...
    ran, overheads, schedule = _simulate(0.5, [1.0] * 12, [1.0] * 12)
    assert ran == [0, 3, 5, 7, 9, 11]
    assert schedule.num_skipped == 6 and schedule.num_evaluations == 6
    # each logged ratio: the evaluation's time over the training time since the previous one ran
    assert overheads == [1.0, 1 / 3, 0.5, 0.5, 0.5, 0.5]
    assert schedule.cumulative_overhead == pytest.approx(6 / 12)


def test_budget_runs_everything_when_cheap_and_adapts_to_cost_changes():
    ran, _, _ = _simulate(0.5, [1.0] * 6, [0.1] * 6)
    assert ran == list(range(6))
    # the forecast is the last evaluation's cost: after a cheap one, an expensive one may run,
    # after which the budget holds back until training has caught up
    ran, _, schedule = _simulate(0.5, [1.0] * 10, [0.1, 0.1, 2.0, 0.1, 0.1], check=False)
    # due point 2 overshoots (C=2.2 at T=3: its cost was forecast as 0.1); the next runs once
    # C + 2.0 <= T/2, at T=9 (due point 8)
    assert ran == [0, 1, 2, 8, 9]
    assert schedule.evaluation_seconds == pytest.approx(2.4)
    assert schedule.evaluation_seconds <= 0.5 * schedule.training_seconds


def test_no_budget_never_skips():
    clock = FakeClock()
    schedule = EvaluationSchedule(clock=clock)
    schedule.start()
    for _ in range(5):
        clock.advance(1.0)
        assert schedule.within_budget()
        schedule.begin()
        clock.advance(10.0)
        schedule.finish()
    assert schedule.num_skipped == 0 and schedule.cumulative_overhead == pytest.approx(10.0)


def test_budget_state_round_trip():
    _, _, schedule = _simulate(0.5, [1.0] * 5, [1.0] * 5)
    restored = EvaluationSchedule(max_overhead=0.5, clock=schedule.clock)
    restored.load_state_dict(schedule.state_dict())
    for name in ("training_seconds", "evaluation_seconds", "last_cost", "num_evaluations", "num_skipped"):
        assert getattr(restored, name) == getattr(schedule, name)


# ---------------------------------------------------------------------------------- in training


class Tick(Callback):
    """Each training batch takes ``seconds`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.clock.advance(self.seconds)


def _with_fake_cost(monitor, clock: FakeClock, cost: float, monkeypatch) -> None:
    compute = monitor._compute

    def costly(trainer, pl_module):
        clock.advance(cost)
        return compute(trainer, pl_module)

    monkeypatch.setattr(monitor, "_compute", costly)
    monitor.schedule.clock = clock


@pytest.mark.parametrize("monitor_cls", [HessianMonitor, LocalVolumeMonitor])
def test_monitor_skips_evaluations_over_budget_and_logs_nothing_for_them(tmp_path, monkeypatch, monitor_cls):
    clock = FakeClock()
    if monitor_cls is HessianMonitor:
        monitor = HessianMonitor(num_runs=2, num_steps=4, log_density=False, max_overhead=0.5, analysis_fraction=0.1)
        key = "trace"
    else:
        monitor = LocalVolumeMonitor(
            num_directions=4, preconditioner=None, prior_std=1.0, max_overhead=0.5, analysis_fraction=0.1
        )
        key = "log_volume"
    # an epoch = 4 batches of 0.25 s = 1 s of training; an evaluation = 1 s: as in the unit test
    _with_fake_cost(monitor, clock, 1.0, monkeypatch)
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(callbacks=[Tick(clock, 0.25), monitor], **trainer_kwargs(max_epochs=8, logger=logger))
    trainer.fit(DigitsModule(hidden=8), DataLoader(digits_dataset(128), batch_size=32))
    assert [row["epoch"] for row in monitor.history] == [0.0, 3.0, 5.0, 7.0]
    assert [row["overhead"] for row in monitor.history] == pytest.approx([1.0, 1 / 3, 0.5, 0.5])
    assert monitor.schedule.num_skipped == 4
    # skipped epochs log nothing (no row for them, not NaN)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"{monitor.prefix}{key}")]
    assert [int(r["epoch"]) for r in rows] == [0, 3, 5, 7]
    assert all(math.isfinite(float(r[f"{monitor.prefix}{key}"])) for r in rows)
    assert trainer.callback_metrics[f"{monitor.prefix}overhead"] == pytest.approx(0.5)


def test_step_schedule_with_budget(monkeypatch):
    clock = FakeClock()
    monitor = HessianMonitor(num_runs=2, num_steps=4, log_density=False, every_n_train_steps=2, max_overhead=0.25)
    _with_fake_cost(monitor, clock, 1.0, monkeypatch)  # every 2 steps: 2 s of training, 1 s of evaluation
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[Tick(clock, 1.0), monitor], **trainer_kwargs(max_epochs=-1, max_steps=16))
    trainer.fit(DigitsModule(hidden=8), DataLoader(digits_dataset(128), batch_size=32))
    # run at step 2 (C=1, T=2); then C + 1 <= T / 4 first at T=8 (step 8), C=2; then T=12 (step 12), C=3; T=16
    assert [row["step"] for row in monitor.history] == [2.0, 8.0, 12.0, 16.0]
    assert monitor.schedule.evaluation_seconds <= 0.25 * monitor.schedule.training_seconds


def test_max_overhead_validation():
    for bad in (0, -1.0, math.inf, "0.5", True):
        with pytest.raises(ValueError, match="`max_overhead`"):
            HessianMonitor(max_overhead=bad)
    assert LocalVolumeMonitor(max_overhead=0.5).max_overhead == 0.5


# ---------------------------------------------------------------------------------- DDP


class RankDependentCost(Callback):
    """In each worker: a fake clock; evaluations look cheap on rank 0 and expensive on rank 1."""

    def __init__(self, costs: dict[int, float]) -> None:
        self.costs = costs

    def setup(self, trainer, pl_module, stage) -> None:
        clock = FakeClock()
        self.clock = clock
        for monitor in trainer.callbacks:
            if isinstance(monitor, HessianMonitor):
                compute, cost = monitor._compute, self.costs[trainer.global_rank]

                def costly(trainer, pl_module, compute=compute, cost=cost):
                    clock.advance(cost)
                    return compute(trainer, pl_module)

                monitor._compute = costly
                monitor.schedule.clock = clock

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.clock.advance(0.25)


def test_ddp_skip_decision_is_identical_on_all_ranks(tmp_path):
    """Rank 1's clock alone would skip every evaluation after the first; rank 0's decides for all."""
    from tests.ddp_helpers import fit

    monitor = HessianMonitor(num_runs=2, num_steps=4, log_density=False, max_overhead=0.5, analysis_fraction=0.1)
    records = fit(
        tmp_path, [monitor, RankDependentCost({0: 0.1, 1: 10.0})], lambda: DigitsModule(hidden=8), max_epochs=3
    )
    histories = [r["histories"]["HessianMonitor"] for r in records]
    assert [row["epoch"] for row in histories[0]] == [0.0, 1.0, 2.0]
    assert [row["epoch"] for row in histories[1]] == [0.0, 1.0, 2.0]
    assert [row["trace"] for row in histories[0]] == [row["trace"] for row in histories[1]]
