"""Local volume during training, and a "poisoned" network vs a clean one (local-volume paper §3.5).

Scherlis & Belrose, *Estimating the Probability of Sampling a Trained Neural Network at Random*
(arXiv:2501.18812), estimates the probability, under the
initialisation prior, of sampling a network that behaves like the trained one (the "local
volume" of its behavioural neighbourhood; smaller volume = longer description = more complex).
Two findings are checked here:

1. the local volume falls during training (the network becomes more specific);
2. a *poisoned* network, trained to also fail on a held-out poison set (Huang et al. 2020), has
   a smaller local volume than a clean one at similar clean training loss.

Setting: scikit-learn's bundled digits (offline), the MLP of ``digits_monitor.py`` widened to
64-128-10 (9,610 parameters; the 64-unit one barely starts memorising the poison set in 30
epochs), Adam (lr 3e-3, batch 32). The training split (1,617 images) is cut into a clean
training set (1,417) and a poison set (200) whose labels are all replaced by wrong ones. The
*clean* network trains on the clean set only; the *poisoned* network's loss at every step adds
the cross-entropy of a 32-image minibatch of the poison set with its wrong labels, so it has to
memorise 200 wrong labels of images that look like clean ones, and generalises worse. Both carry the same
``LocalVolumeMonitor(dataset=clean_train, num_directions=40)``: KL cost on the same clean
analysis set (10 % of the clean training set), cutoff 1e-2 nats, Gaussian measure under the
initialisation prior, Adam second-moment preconditioner; a second monitor gives the naive
(unpreconditioned) estimate. The comparison pairs the poisoned network's last epoch with the
clean epoch whose clean training loss is closest (log scale), for each seed; the same-epoch
comparison (both after the last epoch) is printed as a secondary check, since the volume also
falls with training time. Verdicts:

* *volume falls*: the clean network's log P at the last epoch is below the first epoch's, for
  every seed;
* *poisoned smaller*: at matched clean training loss, the poisoned log P (Adam-preconditioned)
  is below the clean one for every seed.

    OMP_NUM_THREADS=1 python examples/local_volume_poison.py           # ~2-3 min
    OMP_NUM_THREADS=1 python examples/local_volume_poison.py --quick   # smoke run

A PNG of log P, clean training loss and poison-set fit versus epoch goes to
``examples/outputs/local_volume_poison.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from digits_monitor import DigitsMLP, digits_datasets

from lightning_hessian.callbacks import LocalVolumeMonitor

OUTPUTS = Path(__file__).resolve().parent / "outputs"
POISON_SIZE = 200


class AdamMLP(DigitsMLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class PoisonedMLP(AdamMLP):
    """Adds ``weight * CE(poison minibatch, wrong labels)`` to every step's clean loss."""

    def __init__(self, poison: TensorDataset, seed: int, lr: float, hidden: int, weight: float = 1.0) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.poison_x, self.poison_y = poison.tensors
        self.poison_weight = weight
        self.poison_gen = torch.Generator().manual_seed(1000 + seed)

    def training_step(self, batch, batch_idx):
        clean_loss = super().training_step(batch, batch_idx)
        idx = torch.randint(0, len(self.poison_x), (batch[0].shape[0],), generator=self.poison_gen)
        return clean_loss + self.poison_weight * F.cross_entropy(self(self.poison_x[idx]), self.poison_y[idx])


def split_data() -> tuple[TensorDataset, TensorDataset, TensorDataset, TensorDataset]:
    """clean train, poison set (wrong labels), poison set (true labels), validation."""
    train, val = digits_datasets(0)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(123)
    perm = torch.randperm(len(train), generator=gen)
    poison_idx, clean_idx = perm[:POISON_SIZE], perm[POISON_SIZE:]
    wrong = (y[poison_idx] + torch.randint(1, 10, (POISON_SIZE,), generator=gen)) % 10  # never the true label
    return (
        TensorDataset(x[clean_idx], y[clean_idx]),
        TensorDataset(x[poison_idx], wrong),
        TensorDataset(x[poison_idx], y[poison_idx]),
        val,
    )


class Recorder(Callback):
    """Clean training loss, poison-set fit and validation accuracy at every epoch end."""

    def __init__(self, clean, poison_wrong, poison_true, val) -> None:
        self.sets = {
            "clean": clean.tensors,
            "poison_wrong": poison_wrong.tensors,
            "poison_true": poison_true.tensors,
            "val": val.tensors,
        }
        self.rows: list[dict[str, float]] = []

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        row = {"epoch": trainer.current_epoch}
        for name, (x, y) in self.sets.items():
            logits = pl_module(x)
            row[f"{name}_loss"] = float(F.cross_entropy(logits, y))
            row[f"{name}_acc"] = float((logits.argmax(-1) == y).float().mean())
        pl_module.train(was_training)
        self.rows.append(row)


def train(
    poisoned: bool, seed: int, epochs: int, num_directions: int, lr: float, hidden: int
) -> list[dict[str, float]]:
    clean, poison_wrong, poison_true, val = split_data()
    pl.seed_everything(seed, verbose=False)
    model = PoisonedMLP(poison_wrong, seed, lr, hidden) if poisoned else AdamMLP(lr=lr, hidden=hidden)
    loader = DataLoader(clean, batch_size=32, shuffle=True)
    adam = LocalVolumeMonitor(dataset=clean, num_directions=num_directions, analysis_fraction=0.1)
    naive = LocalVolumeMonitor(
        dataset=clean, num_directions=num_directions, analysis_fraction=0.1, preconditioner=None, prefix="volume_naive/"
    )
    recorder = Recorder(clean, poison_wrong, poison_true, val)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[adam, naive, recorder],
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    trainer.fit(model, loader)
    rows = []
    for a, n, r in zip(adam.history, naive.history, recorder.rows, strict=False):
        rows.append(
            {
                **r,
                "log_p": a["log_volume"],
                "log_p_std": a["log_contribution_std"],
                "log_p_naive": n["log_volume"],
                "log_radius": a["log_radius_mean"],
                "vol_sec": a["seconds"] + n["seconds"],
            }
        )
    return rows


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (kind, seed), rows in runs.items():
        color = "tab:red" if kind == "poisoned" else "tab:blue"
        ep = [r["epoch"] for r in rows]
        lab = f"{kind}" if seed == 0 else None
        axes[0].plot(ep, [r["log_p"] / math.log(10) for r in rows], color=color, label=lab)
        axes[0].plot(ep, [r["log_p_naive"] / math.log(10) for r in rows], color=color, ls=":", alpha=0.7)
        axes[1].semilogy(ep, [r["clean_loss"] for r in rows], color=color, label=lab)
        axes[2].plot(
            ep,
            [r["poison_wrong_acc"] for r in rows],
            color=color,
            label=f"{kind}: poison (wrong labels) acc" if seed == 0 else None,
        )
        axes[2].plot(
            ep, [r["val_acc"] for r in rows], color=color, ls="--", label=f"{kind}: val acc" if seed == 0 else None
        )
    axes[0].set_ylabel("log10 P (solid: Adam, dotted: naive)")
    axes[1].set_ylabel("clean training loss")
    axes[2].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num-directions", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 epochs, 10 directions")
    parser.add_argument("--out", type=Path, default=OUTPUTS / "local_volume_poison.png")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.num_directions = 4, 1, 10
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = {}
    for seed in range(args.seeds):
        for kind in ("clean", "poisoned"):
            runs[(kind, seed)] = train(kind == "poisoned", seed, args.epochs, args.num_directions, args.lr, args.hidden)
            print(f"trained {kind} seed {seed} ({time.perf_counter() - start:.0f} s so far)", flush=True)

    header = (
        f"{'run':<12} {'epoch':>5} {'clean loss':>10} {'val acc':>7} {'poison fit':>10} {'log10 P':>9} "
        f"{'±sd(dir)':>8} {'log10 P naive':>13} {'mean log r':>10}"
    )
    print(
        "\nlog10 P: Adam-preconditioned Gaussian-measure estimate (init prior), KL cutoff 1e-2 nats;"
        "\npoison fit: accuracy on the poison set's wrong labels (memorisation); ±sd(dir): spread of one-direction "
        "estimates"
    )
    print(header)
    show = sorted({0, 1, 2, 4, 9, 14, 19, 24, args.epochs - 1} & set(range(args.epochs)))
    for (kind, seed), rows in runs.items():
        for r in rows:
            if r["epoch"] in show:
                print(
                    f"{kind + ' s' + str(seed):<12} {r['epoch']:>5} {r['clean_loss']:>10.4f} {r['val_acc']:>7.3f} "
                    f"{r['poison_wrong_acc']:>10.3f} {r['log_p'] / math.log(10):>9.1f} "
                    f"{r['log_p_std'] / math.log(10):>8.1f} "
                    f"{r['log_p_naive'] / math.log(10):>13.1f} {r['log_radius']:>10.3f}"
                )

    print("\n1) Local volume during training (clean networks):")
    falls = []
    for seed in range(args.seeds):
        rows = runs[("clean", seed)]
        first, last = rows[0]["log_p"], rows[-1]["log_p"]
        drops = sum(b["log_p"] < a["log_p"] for a, b in itertools.pairwise(rows))
        falls.append(last < first)
        print(
            f"   seed {seed}: log10 P {first / math.log(10):.1f} (epoch 0) -> {last / math.log(10):.1f} (epoch "
            f"{rows[-1]['epoch']}); "
            f"fell in {drops}/{len(rows) - 1} epoch steps; naive {rows[0]['log_p_naive'] / math.log(10):.1f} -> "
            f"{rows[-1]['log_p_naive'] / math.log(10):.1f}"
        )
    print(
        f"VERDICT volume falls during training: {'reproduced' if all(falls) else 'not reproduced'} "
        f"(criterion: clean log P at the last epoch < at epoch 0 for every seed: {falls})"
    )

    print(
        "\n2) Poisoned vs clean at matched clean training loss (poisoned: last epoch; clean: epoch with the closest "
        "clean loss):"
    )
    print(
        f"   {'seed':>4} {'clean ep':>8} {'clean loss':>10} {'pois. loss':>10} {'val clean':>9} {'val pois':>8} "
        f"{'log10P clean':>12} {'log10P pois':>11} {'Δ':>7} {'Δ naive':>8}"
    )
    smaller, smaller_naive, smaller_same = [], [], []
    for seed in range(args.seeds):
        p = runs[("poisoned", seed)][-1]
        c = min(runs[("clean", seed)], key=lambda r: abs(math.log(r["clean_loss"]) - math.log(p["clean_loss"])))
        delta = (p["log_p"] - c["log_p"]) / math.log(10)
        delta_naive = (p["log_p_naive"] - c["log_p_naive"]) / math.log(10)
        smaller.append(delta < 0)
        smaller_naive.append(delta_naive < 0)
        print(
            f"   {seed:>4} {c['epoch']:>8} {c['clean_loss']:>10.4f} {p['clean_loss']:>10.4f} {c['val_acc']:>9.3f} "
            f"{p['val_acc']:>8.3f} "
            f"{c['log_p'] / math.log(10):>12.1f} {p['log_p'] / math.log(10):>11.1f} {delta:>7.1f} {delta_naive:>8.1f}"
        )
        cl = runs[("clean", seed)][-1]
        smaller_same.append(p["log_p"] < cl["log_p"])
        print(
            f"        (same last epoch instead: clean loss {cl['clean_loss']:.4f}, log10 P clean "
            f"{cl['log_p'] / math.log(10):.1f} "
            f"vs poisoned {p['log_p'] / math.log(10):.1f}: Δ {(p['log_p'] - cl['log_p']) / math.log(10):.1f})"
        )
    print(
        f"VERDICT poisoned smaller volume: {'reproduced' if all(smaller) else 'not reproduced'} "
        "(criterion: poisoned log P < clean log P at matched clean loss for every seed, Adam-preconditioned: "
        f"{smaller}; "
        f"naive estimator: {smaller_naive})"
    )
    print(
        "VERDICT (secondary, same epoch) poisoned smaller volume: "
        f"{'reproduced' if all(smaller_same) else 'not reproduced'} "
        f"(criterion: poisoned log P < clean log P at the last epoch for every seed: {smaller_same})"
    )
    plot(runs, args.out)
    print(f"total {time.perf_counter() - start:.0f} s; plot: {args.out}")


if __name__ == "__main__":
    main()
