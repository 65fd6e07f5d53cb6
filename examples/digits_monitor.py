"""Main example: train the 64-64-10 MLP on scikit-learn's bundled digits with HessianMonitor.

Fully offline. Writes TensorBoard logs to ``examples/outputs/`` (``tensorboard --logdir
examples/outputs``) and prints the per-epoch curvature table.

    bash scripts/run_example.sh            # ~30 epochs, well under two minutes on 2 CPU cores
    python examples/digits_monitor.py --epochs 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks import HessianMonitor


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits: 1,797 8x8 images (no download), 90/10 train/validation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    cut = int(0.9 * x.shape[0])
    train, val = perm[:cut], perm[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class DigitsMLP(pl.LightningModule):
    """The 64-64-10 MLP (4,810 parameters)."""

    def __init__(self, lr: float = 1e-2, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--logdir", type=Path, default=Path(__file__).parent / "outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set = digits_datasets(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    monitor = HessianMonitor(top_k=3)
    logger = TensorBoardLogger(args.logdir, name="digits_monitor")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[monitor],
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(DigitsMLP(lr=args.lr), train_loader, val_loader)
    total = time.perf_counter() - start

    print(
        f"{'epoch':>5} {'trace':>10} {'±stderr':>9} {'λ_max':>9} {'λ_min':>10} {'neg.mass':>9} {'HVPs':>5} {'sec':>6}"
    )
    for row in monitor.history:
        print(
            f"{int(row['epoch']):>5} {row['trace']:>10.4f} {row['trace_stderr']:>9.4f} {row['top_eigenvalue']:>9.4f} "
            f"{row['min_eigenvalue']:>10.5f} {row['negative_mass']:>9.4f} {int(row['num_hvps']):>5} "
            f"{row['seconds']:>6.2f}"
        )
    monitor_seconds = sum(row["seconds"] for row in monitor.history)
    print(f"\ntotal {total:.1f} s, of which HessianMonitor {monitor_seconds:.1f} s")
    print(f"final val/acc {float(trainer.callback_metrics['val/acc']):.3f}")
    print(f"TensorBoard logs: {logger.log_dir}\n  tensorboard --logdir {args.logdir} --samples_per_plugin images=0")


if __name__ == "__main__":
    main()
