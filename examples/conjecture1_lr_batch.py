"""Conjecture 1 (Alabdulkareem 2022, §4.1): hyperparameters explore differently from the start.

The paper trains its CIFAR-10 CNN with learning rates 0.01 vs 0.05 and batch sizes 32 vs 64
(several seeds each) and finds that the top Hessian eigenvalue of the two groups differs from
the first epoch on, while their training-loss and validation-accuracy curves stay close.

Here: the 64-64-10 MLP of ``digits_monitor.py`` on scikit-learn's bundled digits (offline), SGD
with momentum 0.9, a 2x2 grid lr in {0.01, 0.05} x batch size in {32, 64}, several seeds each,
``HessianMonitor(num_runs=3, num_steps=30, analysis_fraction=0.1)`` every epoch. For each of the
four one-factor comparisons (lr at fixed batch size, batch size at fixed lr) it prints the
per-epoch lambda_max, training loss and validation accuracy of both groups (mean and range over
seeds) and a verdict:

* *separated early*: at each of the first ``--early`` epochs (default 3) the seed ranges of
  lambda_max of the two groups do not overlap, with the same group on top at each of them;
* *curves close*: the final validation accuracies of the group means differ by at most
  ``--acc-tol`` (default 0.02) and the final training losses by at most a factor 2;
* *reproduced* iff both hold.

    OMP_NUM_THREADS=1 python examples/conjecture1_lr_batch.py           # ~2 min on one core (20 epochs, 4 seeds)
    OMP_NUM_THREADS=1 python examples/conjecture1_lr_batch.py --quick   # smoke run, ~20 s

A PNG of lambda_max / training loss / validation accuracy versus epoch goes to
``examples/outputs/conjecture1_lr_batch.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_monitor import DigitsMLP, digits_datasets

from lightning_hessian.callbacks import HessianMonitor

OUTPUTS = Path(__file__).resolve().parent / "outputs"


class Recorder(Callback):
    """Full-training-set loss and validation accuracy at every epoch end (eval mode, no RNG used)."""

    def __init__(self, train_set, val_set) -> None:
        self.train_x, self.train_y = train_set.tensors
        self.val_x, self.val_y = val_set.tensors
        self.rows: list[dict[str, float]] = []

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        train_loss = float(F.cross_entropy(pl_module(self.train_x), self.train_y))
        val_acc = float((pl_module(self.val_x).argmax(-1) == self.val_y).float().mean())
        pl_module.train(was_training)
        self.rows.append({"epoch": trainer.current_epoch, "train_loss": train_loss, "val_acc": val_acc})


def run(lr: float, batch_size: int, seed: int, epochs: int, num_steps: int) -> dict[str, list[float]]:
    pl.seed_everything(seed, verbose=False)
    train_set, val_set = digits_datasets(0)  # same split for every run; the seed varies init and shuffling
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    monitor = HessianMonitor(
        num_runs=3, num_steps=num_steps, analysis_fraction=0.1, log_density=False, detect_sharp_drop=False
    )
    recorder = Recorder(train_set, val_set)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor, recorder],
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    trainer.fit(DigitsMLP(lr=lr), loader)
    return {
        "lmax": [row["top_eigenvalue"] for row in monitor.history],
        "trace": [row["trace"] for row in monitor.history],
        "train_loss": [row["train_loss"] for row in recorder.rows],
        "val_acc": [row["val_acc"] for row in recorder.rows],
    }


def stats(runs: list[dict[str, list[float]]], key: str, epoch: int) -> tuple[float, float, float]:
    values = torch.tensor([r[key][epoch] for r in runs])
    return float(values.mean()), float(values.min()), float(values.max())


def compare(name: str, a_label: str, a_runs, b_label: str, b_runs, early: int, acc_tol: float) -> dict:
    epochs = len(a_runs[0]["lmax"])
    print(f"\n=== {name}: {a_label} vs {b_label} ({len(a_runs)} seeds each) ===")
    print(
        f"{'epoch':>5} | {'λmax ' + a_label:>22} {'λmax ' + b_label:>22} {'sep':>4} | "
        f"{'loss A':>7} {'loss B':>7} | {'acc A':>6} {'acc B':>6}"
    )
    separated, a_above = [], []
    for e in range(epochs):
        am, alo, ahi = stats(a_runs, "lmax", e)
        bm, blo, bhi = stats(b_runs, "lmax", e)
        sep = ahi < blo or bhi < alo
        separated.append(sep)
        a_above.append(am > bm)
        la, lb = stats(a_runs, "train_loss", e)[0], stats(b_runs, "train_loss", e)[0]
        ca, cb = stats(a_runs, "val_acc", e)[0], stats(b_runs, "val_acc", e)[0]
        print(
            f"{e:>5} | {am:>7.2f} [{alo:>6.2f},{ahi:>6.2f}] {bm:>7.2f} [{blo:>6.2f},{bhi:>6.2f}] "
            f"{'yes' if sep else 'no':>4} | "
            f"{la:>7.4f} {lb:>7.4f} | {ca:>6.3f} {cb:>6.3f}"
        )
    n_early = min(early, epochs)
    # disjoint seed ranges at every early epoch, with the same group on top each time
    early_sep = all(separated[:n_early]) and len(set(a_above[:n_early])) == 1
    la, lb = stats(a_runs, "train_loss", epochs - 1)[0], stats(b_runs, "train_loss", epochs - 1)[0]
    ca, cb = stats(a_runs, "val_acc", epochs - 1)[0], stats(b_runs, "val_acc", epochs - 1)[0]
    acc_gap = abs(ca - cb)
    loss_ratio = max(la, lb) / max(min(la, lb), 1e-12)
    close = acc_gap <= acc_tol and loss_ratio <= 2.0
    ratio_early = [stats(a_runs, "lmax", e)[0] / stats(b_runs, "lmax", e)[0] for e in range(min(early, epochs))]
    verdict = "reproduced" if early_sep and close else "not reproduced"
    print(
        f"λmax ratio {a_label}/{b_label} over the first {min(early, epochs)} epochs: "
        + ", ".join(f"{r:.2f}" for r in ratio_early)
        + f"; epochs with non-overlapping λmax ranges: {sum(separated)}/{epochs}"
    )
    print(
        f"final: train loss {la:.4f} vs {lb:.4f} (ratio {loss_ratio:.2f}), val acc {ca:.3f} vs {cb:.3f} (gap "
        f"{acc_gap:.3f})"
    )
    print(
        f"VERDICT {name}: {verdict} (criterion: λmax seed ranges disjoint, same order, at epochs 0..{n_early - 1} "
        f"[{'yes' if early_sep else 'no'}] and final |Δ val acc| <= {acc_tol} with train-loss ratio <= 2 "
        f"[{'yes' if close else 'no'}])"
    )
    return {"name": name, "early_separated": early_sep, "close": close, "verdict": verdict}


def plot(results: dict, comparisons: list[tuple[str, tuple, tuple]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(comparisons), figsize=(4.2 * len(comparisons), 9), squeeze=False)
    for col, (name, a, b) in enumerate(comparisons):
        for cfg, color in ((a, "tab:blue"), (b, "tab:red")):
            for i, r in enumerate(results[cfg]):
                label = f"lr={cfg[0]}, bs={cfg[1]}" if i == 0 else None
                axes[0, col].plot(r["lmax"], color=color, alpha=0.8, label=label)
                axes[1, col].semilogy(r["train_loss"], color=color, alpha=0.8)
                axes[2, col].plot(r["val_acc"], color=color, alpha=0.8)
        axes[0, col].set_title(name)
        axes[0, col].legend(fontsize=8)
        axes[0, col].set_ylabel("top eigenvalue λmax")
        axes[1, col].set_ylabel("training loss")
        axes[2, col].set_ylabel("validation accuracy")
        axes[2, col].set_xlabel("epoch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=30, help="Lanczos steps per HessianMonitor run")
    parser.add_argument("--early", type=int, default=3, help="number of first epochs that must separate")
    parser.add_argument("--acc-tol", type=float, default=0.02)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 3 epochs, 15 Lanczos steps")
    parser.add_argument("--out", type=Path, default=OUTPUTS / "conjecture1_lr_batch.png")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.num_steps = 3, 2, 15
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`training_step` returned.*")
    torch.set_num_threads(1)

    start = time.perf_counter()
    configs = [(0.01, 32), (0.05, 32), (0.01, 64), (0.05, 64)]
    results = {}
    for lr, bs in configs:
        results[(lr, bs)] = [run(lr, bs, seed, args.epochs, args.num_steps) for seed in range(args.seeds)]
        print(f"trained lr={lr} bs={bs}: {args.seeds} seeds ({time.perf_counter() - start:.0f} s so far)", flush=True)

    comparisons = [
        ("learning rate (bs=32)", (0.01, 32), (0.05, 32)),
        ("learning rate (bs=64)", (0.01, 64), (0.05, 64)),
        ("batch size (lr=0.01)", (0.01, 32), (0.01, 64)),
        ("batch size (lr=0.05)", (0.05, 32), (0.05, 64)),
    ]
    verdicts = []
    for name, a, b in comparisons:
        verdicts.append(
            compare(name, f"lr{a[0]}/bs{a[1]}", results[a], f"lr{b[0]}/bs{b[1]}", results[b], args.early, args.acc_tol)
        )
    plot(results, comparisons, args.out)
    print("\nSummary:")
    for v in verdicts:
        print(
            f"  {v['name']:<24} early-separated={v['early_separated']!s:<5} curves-close={v['close']!s:<5} -> "
            f"{v['verdict']}"
        )
    print(f"total {time.perf_counter() - start:.0f} s; plot: {args.out}")


if __name__ == "__main__":
    main()
