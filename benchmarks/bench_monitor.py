"""HessianMonitor cost next to the training epoch it watches (the main digits example).

Trains the 64-64-10 digits MLP of ``examples/digits_monitor.py`` twice in the same process, once
without and once with ``HessianMonitor`` (default settings), and prints per-epoch seconds of the
training epoch and of the callback, their ratio, and the HVPs per evaluation.

    python benchmarks/bench_monitor.py [--epochs 10] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_monitor import DigitsMLP, digits_datasets

from lightning_hessian.callbacks import HessianMonitor


class EpochTimer(Callback):
    """Wall time of the training part of each epoch (start of epoch to the last batch's end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(self._last - self._start)


def run(epochs: int, batch_size: int, monitor: HessianMonitor | None) -> EpochTimer:
    pl.seed_everything(0, verbose=False)
    train_set, _ = digits_datasets(0)
    timer = EpochTimer()
    callbacks = [timer] + ([monitor] if monitor is not None else [])
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(DigitsMLP(lr=0.05), DataLoader(train_set, batch_size=batch_size, shuffle=True))
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    baseline = run(args.epochs, args.batch_size, None)
    monitor = HessianMonitor(top_k=3)
    watched = run(args.epochs, args.batch_size, monitor)

    print(
        f"{'epoch':>5} {'train s (no cb)':>16} {'train s (cb)':>13} {'monitor s':>10} {'monitor/train':>14} {'HVPs':>5}"
    )
    for i, row in enumerate(monitor.history):
        print(
            f"{i:>5} {baseline.seconds[i]:>16.3f} {watched.seconds[i]:>13.3f} {row['seconds']:>10.3f} "
            f"{row['seconds'] / baseline.seconds[i]:>14.2f} {int(row['num_hvps']):>5}"
        )
    train = statistics.median(baseline.seconds)
    mon = statistics.median(r["seconds"] for r in monitor.history)
    print(
        f"\nmedian training epoch {train:.3f} s; median HessianMonitor evaluation {mon:.3f} s; ratio {mon / train:.2f}x"
    )
    print(
        f"HVPs per evaluation: {int(monitor.history[0]['num_hvps'])} ({monitor.num_runs} runs x {monitor.num_steps} "
        "steps)"
    )


if __name__ == "__main__":
    main()
