"""Building blocks of ``tests/test_distributed.py``: 2-process CPU DDP runs whose results land in files.

Under ``ddp_spawn`` the callback objects of the launching process are copies that the worker
processes never update, so every rank writes what it saw (every monitor's ``history``, the
curvature metrics that reached ``trainer.callback_metrics`` after each epoch, the weights after
each epoch, when it stopped) with ``torch.save`` to ``<out_dir>/rank<r>.pt``.

``python -m tests.ddp_helpers <out_dir>`` runs every scenario of :func:`run_scenarios` in turn
under ``strategy="ddp"`` (Lightning re-launches the same command for rank 1), so that a test can
run them in a subprocess with a wall-clock timeout: a deadlock cannot pass silently.
"""

from __future__ import annotations

import copy
import datetime
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.callbacks._base import CurvatureCallback
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 200
TRAIN_BATCH_SIZE = 25
# A collective that waits longer than this raises in every process (instead of hanging forever).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
METRIC_PREFIXES = ("hessian/", "volume/")


def ddp_strategy(start_method: str = "spawn") -> DDPStrategy:
    return DDPStrategy(process_group_backend="gloo", start_method=start_method, timeout=COLLECTIVE_TIMEOUT)


class RecordingCallback(Callback):
    """Writes what this rank saw to ``<out_dir>/rank<global_rank>.pt`` at the end of training."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = str(out_dir)
        self.weights: list[dict[str, torch.Tensor]] = []
        self.optimizer_states: list[dict[str, Any]] = []
        self.logged: list[dict[str, float]] = []

    def _curvature_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(METRIC_PREFIXES)}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:  # callback_metrics are updated after the epoch-end hooks
            self.logged.append(self._curvature_metrics(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.optimizer_states.append(copy.deepcopy(trainer.optimizers[0].state_dict()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged.append(self._curvature_metrics(trainer))
        monitors = [c for c in trainer.callbacks if isinstance(c, CurvatureCallback)]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "current_epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "should_stop": trainer.should_stop,
            "weights": self.weights,
            "optimizer_states": self.optimizer_states,
            "logged": self.logged,
            "histories": {type(m).__name__: [dict(row) for row in m.history] for m in monitors},
            "indices": {type(m).__name__: list(m.analysis.indices or []) for m in monitors},
            "stopped_epochs": {type(m).__name__: getattr(m, "stopped_epoch", None) for m in monitors},
            "init_priors": {type(m).__name__: getattr(m, "init_prior", None) for m in monitors},
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def digits_train_loader() -> DataLoader:
    return DataLoader(digits_dataset(NUM_SAMPLES), batch_size=TRAIN_BATCH_SIZE, shuffle=True)


def fit(
    out_dir: str | Path,
    monitors: list[Callback],
    make_module: Callable[[], pl.LightningModule],
    *,
    devices: int = 2,
    start_method: str = "spawn",
    max_epochs: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Seed, build the module, train (``devices`` CPU processes, gloo); return each rank's record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    strategy: Any = ddp_strategy(start_method) if devices > 1 else "auto"
    trainer = pl.Trainer(
        callbacks=[*monitors, RecordingCallback(out_dir)],
        strategy=strategy,
        **trainer_kwargs(devices=devices, max_epochs=max_epochs),
    )
    trainer.fit(module, digits_train_loader())
    trainer.strategy.barrier()  # strategy="ddp": every rank has written its record (no-op after spawn)
    if trainer.global_rank != 0:  # a re-launched worker of strategy="ddp"
        return []
    return load_records(out_dir, devices)


def load_records(out_dir: str | Path, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# --------------------------------------------------------------------------------------------
# Scenario modules
# --------------------------------------------------------------------------------------------


class RankPoisonedModule(DigitsModule):
    """On one rank only, eval-mode outputs (only the analysis runs in eval mode) are NaN at one
    epoch, and the eval-mode forward raises an arbitrary (non-numerical) exception at another."""

    def __init__(
        self, poison_rank: int = 1, poison_epoch: int = 1, raise_epoch: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.poison_rank = poison_rank
        self.poison_at = poison_epoch
        self.raise_at = raise_epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not self.training and self.global_rank == self.poison_rank:
            if self.current_epoch == self.poison_at:
                out = out * math.nan
            if self.current_epoch == self.raise_at:
                raise KeyError("injected failure on one rank")
        return out


DROP_EPOCH = 3
DROP_FACTOR = 100.0


def epoch_scaled_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Analysis loss ``DROP_FACTOR`` times the cross-entropy before ``DROP_EPOCH``, plain after.

    The Hessian (and its trace) scales with the loss, so the trace falls by 99 % at
    ``DROP_EPOCH``: a sharp drop at a known epoch, whatever the weights.
    """
    x, y = batch
    scale = DROP_FACTOR if model.current_epoch < DROP_EPOCH else 1.0
    return scale * F.cross_entropy(model(x), y)


def sharp_drop_monitor() -> HessianMonitor:
    """Stops after the forced drop: confirmed by the evaluation after it (epoch ``DROP_EPOCH + 1``)."""
    return HessianMonitor(
        num_runs=2,
        num_steps=10,
        analysis_fraction=0.5,
        batch_loss=epoch_scaled_loss,
        log_density=False,
        stop_on_sharp_drop=True,
        sharp_drop_kwargs={
            "window": 1,
            "confirm": 1,
            "lookback": 2,
            "min_history": 3,
            "baseline": 3,
            # 2-probe standard errors are as large as the trace here: a lenient alarm (50 % false
            # alarms per 10 evaluations) so that the forced drop flags at once; the test is about
            # every rank taking the same decision, not about the alarm's calibration
            "false_alarm_rate": 0.5,
            "horizon": 10,
            "noise_multiplier": 0.0,
            "stderr_multiplier": 0.0,
        },
    )


# 101 analysis samples in micro-batches of 32: uneven shards (51 / 50) of uneven batches, so that
# only a correctly size-weighted reduction reproduces the single-process values.
ANALYSIS_FRACTION = 101 / NUM_SAMPLES
ANALYSIS_BATCH_SIZE = 32


def hessian_monitor(**kwargs: Any) -> HessianMonitor:
    options: dict[str, Any] = dict(
        num_runs=2,
        num_steps=10,
        top_k=2,
        analysis_fraction=ANALYSIS_FRACTION,
        analysis_batch_size=ANALYSIS_BATCH_SIZE,
        log_density=False,
        hvp_backend="autograd",  # a fixed path: separate runs (ddp vs ddp_spawn) compare bit for bit
    )
    return HessianMonitor(**{**options, **kwargs})


def volume_monitor(**kwargs: Any) -> Callback:
    from lightning_hessian.callbacks import LocalVolumeMonitor

    options: dict[str, Any] = dict(
        num_directions=8, analysis_fraction=ANALYSIS_FRACTION, analysis_batch_size=ANALYSIS_BATCH_SIZE
    )
    return LocalVolumeMonitor(**{**options, **kwargs})


def digits_module(**kwargs: Any) -> DigitsModule:
    """Dropout (an RNG consumer) and Adam (the volume monitor's default preconditioner reads it)."""
    return DigitsModule(hidden=16, dropout=0.2, optimizer="adam", lr=0.03, **kwargs)


def poisoned_module() -> RankPoisonedModule:
    return RankPoisonedModule(
        poison_rank=1, poison_epoch=1, raise_epoch=2, hidden=16, dropout=0.2, optimizer="adam", lr=0.03
    )


SCENARIO_EPOCHS = {
    "with_callbacks": 2,
    "without_callbacks": 2,
    "nan_on_rank_1": 3,
    "sharp_drop": 8,
    "one_sample": 1,
}


def run_scenarios(out_dir: str | Path, start_method: str = "popen") -> None:
    """Every scenario in turn in the same two processes (``strategy="ddp"`` launches rank 1 once)."""
    out_dir = Path(out_dir)
    scenarios: dict[str, tuple[list[Callback], Callable[[], pl.LightningModule]]] = {
        "with_callbacks": ([hessian_monitor(), volume_monitor()], digits_module),
        "without_callbacks": ([], digits_module),
        "nan_on_rank_1": ([hessian_monitor(), volume_monitor()], poisoned_module),
        "sharp_drop": ([sharp_drop_monitor()], digits_module),
        # one analysis sample: rank 1's shard is empty
        "one_sample": ([hessian_monitor(max_samples=1), volume_monitor(max_samples=1)], digits_module),
    }
    for name, (monitors, make_module) in scenarios.items():
        fit(out_dir / name, monitors, make_module, start_method=start_method, max_epochs=SCENARIO_EPOCHS[name])


if __name__ == "__main__":
    run_scenarios(sys.argv[1])
