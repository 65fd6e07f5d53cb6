"""Signals during an evaluation, run in a subprocess (``python -m tests.signal_helpers <scenario> <out_dir>``).

The analysis loss sleeps ``PRODUCT_SLEEP_S`` per micro-batch, so that one product (one HVP of the
``num_runs`` probes) lasts a known time and an uninterrupted evaluation lasts ~``num_steps`` times
that: long enough for a signal sent from a timer thread to land in its middle. Every process
writes what it saw to ``<out_dir>/rank<r>.pt``:

* ``signal_time`` (the timer thread's ``time.time()`` when it sent the signal, on the signalled
  rank), ``exception_time`` / ``exception`` (``on_exception``: Lightning's SIGTERM path raises
  ``SIGTERMException``, SIGINT a ``KeyboardInterrupt``);
* ``weights_before`` (state dict at epoch end, before the monitor) and ``weights_at_exception``,
  ``training`` flags, ``grads`` (all ``None`` before and after);
* the monitor's ``history`` and ``missed`` records, its warnings.

``resume`` scenarios continue from the checkpoint that ``OnExceptionCheckpoint`` wrote.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs

PRODUCT_SLEEP_S = 0.05
MICRO_BATCHES = 2
NUM_STEPS = 40  # ~40 x 0.1 s = 4 s uninterrupted
VOLUME_SLEEP_S = 0.05  # per cost call (a call evaluates a group of directions)
SIGNAL_DELAY_S = 1.0  # after the evaluation starts


def slow_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    time.sleep(PRODUCT_SLEEP_S)
    x, y = batch
    return F.cross_entropy(model(x), y)


def slightly_slow_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The volume's cost: many forward passes per group of directions, each a little slow."""
    time.sleep(VOLUME_SLEEP_S)
    x, y = batch
    return F.cross_entropy(model(x), y)


class SignalAtEvaluation(Callback):
    """At the end of epoch ``at_epoch`` (before the monitor), start a timer that sends ``signum``."""

    def __init__(self, out_dir: Path, signum: int, at_epoch: int, rank: int) -> None:
        self.out_dir, self.signum, self.at_epoch, self.rank = out_dir, signum, at_epoch, rank
        self.record: dict[str, Any] = {"signal_time": None, "exception": None}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.at_epoch:
            return
        self.record["weights_before"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["training_before"] = [m.training for m in pl_module.modules()]
        self.record["grads_before"] = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
        if trainer.global_rank == self.rank:

            def send() -> None:
                self.record["signal_time"] = time.time()
                os.kill(os.getpid(), self.signum)

            threading.Timer(SIGNAL_DELAY_S, send).start()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.record["exception_time"] = time.time()
        self.record["exception"] = type(exception).__name__
        self.record["weights_at_exception"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["training_at_exception"] = [m.training for m in pl_module.modules()]
        self.record["grads"] = [p.grad for p in pl_module.parameters()]
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        monitors = [c for c in trainer.callbacks if isinstance(c, (HessianMonitor, LocalVolumeMonitor))]
        self.record["histories"] = [[dict(r) for r in m.history] for m in monitors]
        self.record["missed"] = [m.missed.state_dict() for m in monitors]
        self.record["current_epoch"] = trainer.current_epoch
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def monitor(kind: str, **kwargs: Any) -> Callback:
    if kind == "volume":
        return LocalVolumeMonitor(
            num_directions=64,
            cost="loss",
            every_n_epochs=2,
            analysis_fraction=0.5,
            analysis_batch_size=50,
            batch_loss=slightly_slow_loss,
            **kwargs,
        )
    options: dict[str, Any] = dict(
        num_runs=2,
        num_steps=NUM_STEPS,
        every_n_epochs=2,  # one evaluation, at the end of epoch 1
        analysis_fraction=0.5,
        analysis_batch_size=50,
        batch_loss=slow_loss,
        log_density=False,
        hvp_backend="autograd",
    )
    return HessianMonitor(**{**options, **kwargs})


def run(scenario: str, out_dir: Path) -> None:
    """Scenarios: ``<sigterm|sigint>[-ddp<rank>][-volume]`` (signal at epoch 1), ``resume-<rerun|warn>``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "volume" if scenario.endswith("-volume") else "hessian"
    ddp_rank = int(scenario.split("-ddp")[1][0]) if "-ddp" in scenario else None
    pl.seed_everything(0, verbose=False)
    module = DigitsModule(hidden=16, lr=0.05, optimizer="adam" if kind == "volume" else "sgd")
    loader = DataLoader(digits_dataset(200), batch_size=50, shuffle=True)
    strategy: Any = "auto"
    devices = 1
    if ddp_rank is not None:
        strategy = DDPStrategy(
            process_group_backend="gloo", start_method="popen", timeout=datetime.timedelta(seconds=60)
        )
        devices = 2
    ckpt_dir = out_dir / "ckpt"
    if scenario.startswith("resume-"):
        mode = scenario.split("-")[1]
        mon = monitor(kind, resume_missed=mode)
        marker = SignalAtEvaluation(out_dir, signal.SIGTERM, at_epoch=-1, rank=-1)
        trainer = pl.Trainer(callbacks=[marker, mon], **trainer_kwargs(max_epochs=3, enable_checkpointing=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, loader, ckpt_path=str(ckpt_dir / "interrupted.ckpt"))
        marker.record["warnings"] = [str(w.message) for w in caught]
        marker.save(trainer)
        return
    signum = signal.SIGINT if scenario.startswith("sigint") else signal.SIGTERM
    marker = SignalAtEvaluation(out_dir, signum, at_epoch=1, rank=ddp_rank or 0)
    exception_ckpt = OnExceptionCheckpoint(dirpath=str(ckpt_dir), filename="interrupted")
    trainer = pl.Trainer(
        callbacks=[marker, monitor(kind), exception_ckpt],
        strategy=strategy,
        **trainer_kwargs(max_epochs=3, devices=devices, enable_checkpointing=True),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, loader)
        finally:
            marker.record["warnings"] = [str(w.message) for w in caught]
            marker.save(trainer)


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
