"""The Hessian trace's sudden sharp drop (paper §7.7) in a real run, and stopping on it.

A small CNN on scikit-learn's bundled digits (offline), SGD with momentum, no learning-rate
schedule. The initialisation is scaled down (x0.5), so the loss sits on its initial plateau for
a few epochs; the trace then shoots up while the network learns fast and falls by about three
quarters within two or three epochs, as validation accuracy ends its steep rise.
``HessianMonitor`` flags the drop with the detector's defaults; ``--stop`` ends training
``--patience`` epochs after the drop's middle. ``tests/test_sharp_drop_training.py`` runs this
setting (seed 3) end to end.

    python examples/sharp_drop_digits.py              # ~10 s on one CPU core
    python examples/sharp_drop_digits.py --stop --patience 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_hessian.callbacks import HessianMonitor


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch`` (Lightning calls ``set_epoch``): resumable shuffling."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())


def digits_loaders(seed: int, batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's bundled digits: 1,797 8x8 images (no download), 90/10 train/validation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    cut = int(0.9 * x.shape[0])
    train = TensorDataset(x[perm[:cut]], y[perm[:cut]])
    val = TensorDataset(x[perm[cut:]], y[perm[cut:]])
    sampler = EpochShuffleSampler(len(train), seed)
    return DataLoader(train, batch_size=batch_size, sampler=sampler), DataLoader(val, batch_size=512)


class DigitsCNN(pl.LightningModule):
    """Conv(1->8) - ReLU - Conv(8->16, stride 2) - ReLU - Linear(256->10), 3,882 parameters."""

    def __init__(self, lr: float = 0.05, init_scale: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class ValAccuracy(Callback):
    def __init__(self) -> None:
        self.acc: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.acc[trainer.current_epoch] = float(trainer.callback_metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--init-scale", type=float, default=0.5)
    parser.add_argument("--stop", action="store_true", help="stop_on_sharp_drop=True")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "outputs" / "sharp_drop_digits.png")
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    module = DigitsCNN(lr=args.lr, init_scale=args.init_scale)
    train, val = digits_loaders(args.seed)
    # The trace is Hutchinson on the Lanczos start vectors: 8 probes, one step each (8 HVPs).
    monitor = HessianMonitor(
        num_runs=8, num_steps=1, log_density=False, stop_on_sharp_drop=args.stop, sharp_drop_patience=args.patience
    )
    accuracy = ValAccuracy()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor, accuracy],
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    total = time.perf_counter() - start

    det = monitor.detector
    print(f"\n{'epoch':>5} {'trace':>8} {'±stderr':>8} {'val acc':>8} {'sharp drop':>10}")
    for row in monitor.history:
        epoch = int(row["epoch"])
        marks = []
        if epoch == det.drop_start_epoch:
            marks.append("drop starts")
        if epoch == det.drop_middle_epoch:
            marks.append("middle")
        if epoch == det.flagged_at_epoch:
            marks.append("confirmed")
        if epoch == monitor.stopped_epoch:
            marks.append("stop")
        print(
            f"{epoch:>5} {row['trace']:>8.1f} {row['trace_stderr']:>8.1f} {accuracy.acc[epoch]:>8.3f} "
            f"{int(row['trace_sharp_drop']):>10}  {', '.join(marks)}"
        )
    print()
    print(det)
    if det.flagged:
        best = max(accuracy.acc.values())
        knee = min(e for e, a in accuracy.acc.items() if a >= 0.9 * best)
        print(
            f"drop of {det.drop_size:.0%}: starts after epoch {det.drop_start_epoch}, middle at epoch "
            f"{det.drop_middle_epoch} ({det.drop_middle_epoch_interpolated:.2f}), confirmed at epoch "
            f"{det.flagged_at_epoch}; validation accuracy first reaches 90% of its best ({best:.3f}) at epoch {knee}"
        )
    if monitor.stopped_epoch is not None:
        print(
            f"stopped at epoch {monitor.stopped_epoch} (patience {args.patience}), val acc "
            f"{accuracy.acc[monitor.stopped_epoch]:.3f}"
        )
    else:
        print(f"ran all {trainer.current_epoch} epochs")
    print(f"total {total:.1f} s, of which HessianMonitor {sum(r['seconds'] for r in monitor.history):.1f} s")
    _plot(monitor, accuracy.acc, args.out)


def _plot(monitor: HessianMonitor, acc: dict[int, float], out: Path) -> None:
    """Trace and validation accuracy on one plot, the drop's middle as a vertical line (paper Fig. 6)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    epochs = [int(r["epoch"]) for r in monitor.history]
    trace = [r["trace"] for r in monitor.history]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(epochs, trace, "o-", color="tab:red", label="Hessian trace")
    ax.set_xlabel("epoch")
    ax.set_ylabel("trace", color="tab:red")
    twin = ax.twinx()
    twin.plot(sorted(acc), [acc[e] for e in sorted(acc)], "s-", color="tab:blue", label="val acc")
    twin.set_ylabel("validation accuracy", color="tab:blue")
    if monitor.detector.flagged:
        ax.axvline(monitor.detector.drop_middle_epoch_interpolated, color="black", ls="--", lw=1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
