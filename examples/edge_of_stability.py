"""Edge of stability on digits: sharpness vs 2/η under GD, preconditioned sharpness vs 38/η under Adam.

Cohen et al. (2021) observe that full-batch gradient descent with step η first *sharpens*
(λ_max(H) rises) until λ_max reaches the stability threshold 2/η, then hovers there while the
loss keeps falling, non-monotonically. Cohen et al. (2022, "Adaptive Gradient Methods at the Edge
of Stability") find the same for full-batch Adam in the preconditioned sharpness
λ_max(P⁻¹H), P = diag(√v̂ + ε), which equilibrates at (2 + 2β₁)/((1 − β₁)η) = 38/η for β₁ = 0.9,
while the raw sharpness λ_max(H) stays far below 2/η.

Here: a 64-32-32-10 tanh MLP on 1,000 scikit-learn digits (offline), mean squared error on one-hot
targets (as in most of Cohen et al.'s experiments), full batch (one step per epoch), trained by
Lightning with ``HessianMonitor`` logging, every ``--every`` steps:

* gradient descent at η = 0.1 and η = 0.2: ``hessian/top_eigenvalue`` (sharpness),
  ``hessian/sharpness_threshold`` = 2/η and ``hessian/sharpness_ratio``
  (``HessianMonitor(sharpness_threshold=True)``);
* Adam at η = 0.003 (β₁ = 0.9): ``hessian/preconditioned_sharpness``,
  ``hessian/preconditioned_sharpness_threshold`` = 38/η and their ratio
  (``HessianMonitor(preconditioned=True)``), plus the raw sharpness against 2/η.

Verdicts (criteria in the printed lines): *progressive sharpening* (the logged sharpness rises
by at least 50 % above its first value), *edge of stability* (mean ratio to the threshold over
the last third of the run within [0.9, 1.1], no value above 1.25), and for Adam *raw sharpness
far below 2/η* (ratio ≤ 0.1 throughout).

    OMP_NUM_THREADS=1 python examples/edge_of_stability.py           # ~2-3 min on one core
    OMP_NUM_THREADS=1 python examples/edge_of_stability.py --quick   # smoke run, ~20 s

A PNG of both panels goes to ``examples/outputs/edge_of_stability.png``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks import HessianMonitor

OUTPUTS = Path(__file__).resolve().parent / "outputs"
NUM_SAMPLES = 1000


def one_hot_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½·mean over samples of ‖f(x) − onehot(y)‖² (Cohen et al.'s square loss)."""
    return 0.5 * (outputs - F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)).pow(2).sum(-1).mean()


def digits_full_batch() -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x[:NUM_SAMPLES] / 16.0, dtype=torch.float32), torch.tensor(y[:NUM_SAMPLES]))


class FullBatchMLP(pl.LightningModule):
    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = one_hot_mse(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999))
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(optimizer: str, lr: float, steps: int, every: int) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    data = digits_full_batch()
    module = FullBatchMLP(optimizer, lr)
    adam = optimizer == "adam"
    monitor = HessianMonitor(
        every_n_epochs=every,
        analysis_fraction=1.0,
        analysis_batch_size=NUM_SAMPLES,
        loss_fn=one_hot_mse,
        num_runs=1,
        num_steps=20,
        log_density=False,
        detect_sharp_drop=False,
        preconditioned=adam,
        sharpness_threshold=not adam,
    )
    trainer = pl.Trainer(
        max_epochs=steps,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        deterministic=True,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=NUM_SAMPLES, shuffle=False))
    return {
        "optimizer": optimizer,
        "lr": lr,
        "history": monitor.history,
        "losses": module.losses,
        "seconds": time.perf_counter() - start,
    }


def verdicts(result: dict[str, Any]) -> list[str]:
    rows = result["history"]
    adam = result["optimizer"] == "adam"
    key = "preconditioned_sharpness" if adam else "top_eigenvalue"
    threshold = rows[-1]["preconditioned_sharpness_threshold" if adam else "sharpness_threshold"]
    sharp = [r[key] for r in rows]
    ratios = [r["sharpness_ratio"] for r in rows]
    tail = ratios[len(ratios) - max(1, len(ratios) // 3) :]
    mean_tail = sum(tail) / len(tail)
    label = f"{result['optimizer']} lr={result['lr']}"
    what = "preconditioned sharpness" if adam else "sharpness"
    out = []
    rise = max(sharp) / sharp[0]
    out.append(
        f"VERDICT {label}: progressive sharpening ({what} rises by >= 50 % from its first logged value): "
        f"{'reproduced' if rise >= 1.5 else 'not reproduced'} "
        f"(max/first = {rise:.2f}, first {sharp[0]:.4g}, max {max(sharp):.4g})"
    )
    ok = 0.9 <= mean_tail <= 1.1 and max(tail) <= 1.25
    out.append(
        f"VERDICT {label}: edge of stability ({what} / threshold {threshold:.4g}: mean over the last third in "
        f"[0.9, 1.1], max <= 1.25): {'reproduced' if ok else 'not reproduced'} (mean {mean_tail:.3f}, "
        f"range {min(tail):.3f}-{max(tail):.3f})"
    )
    if adam:
        raw = [r["top_eigenvalue"] * result["lr"] / 2 for r in rows]
        out.append(
            f"VERDICT {label}: raw sharpness far below 2/lr (ratio <= 0.1 throughout): "
            f"{'reproduced' if max(raw) <= 0.1 else 'not reproduced'} (max ratio {max(raw):.3f})"
        )
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(11, 4))
    ax_gd, ax_adam = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for result in results:
        steps = [r["epoch"] + 1 for r in result["history"]]
        if result["optimizer"] == "adam":
            line = ax_adam.plot(
                steps,
                [r["preconditioned_sharpness"] for r in result["history"]],
                label=f"λmax(P⁻¹H), Adam η={result['lr']}",
            )
            ax_adam.axhline(38 / result["lr"], ls="--", color=line[0].get_color(), label="38/η")
            ax_adam.plot(steps, [r["top_eigenvalue"] for r in result["history"]], color="grey", label="λmax(H)")
            ax_adam.axhline(2 / result["lr"], ls=":", color="grey", label="2/η")
            ax_adam.set_yscale("log")
        else:
            line = ax_gd.plot(
                steps, [r["top_eigenvalue"] for r in result["history"]], label=f"λmax(H), GD η={result['lr']}"
            )
            ax_gd.axhline(2 / result["lr"], ls="--", color=line[0].get_color(), label=f"2/η = {2 / result['lr']:.0f}")
    for ax, title in (
        (ax_gd, "gradient descent: sharpness vs 2/η"),
        (ax_adam, "Adam: preconditioned sharpness vs 38/η"),
    ):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [("sgd", 0.1, 3000, 100), ("sgd", 0.2, 1500, 50), ("adam", 0.003, 1500, 50)]
    if args.quick:
        configs = [(o, lr, steps // 10, every // 5) for o, lr, steps, every in configs]
    results = []
    for optimizer, lr, steps, every in configs:
        result = run(optimizer, lr, steps, every)
        results.append(result)
        print(f"\n{optimizer} lr={lr}: {steps} full-batch steps, {result['seconds']:.0f} s")
        adam = optimizer == "adam"
        print(
            f"{'step':>6} {'loss':>8} {'λmax(H)':>9} {'2/η':>7}"
            + (f" {'λmax(P⁻¹H)':>11} {'38/η':>8}" if adam else "")
            + f" {'ratio':>6}"
        )
        for row in result["history"]:
            step = int(row["epoch"]) + 1
            line = f"{step:>6} {result['losses'][step - 1]:>8.4f} {row['top_eigenvalue']:>9.3f} {2 / lr:>7.1f}"
            if adam:
                line += f" {row['preconditioned_sharpness']:>11.1f} {row['preconditioned_sharpness_threshold']:>8.1f}"
            print(line + f" {row['sharpness_ratio']:>6.3f}")
    print()
    for result in results:
        for line in verdicts(result):
            print(line)
    path = OUTPUTS / "edge_of_stability.png"
    plot(results, path)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
