"""Hessian spectral density at initialisation vs during training, with and without BatchNorm.

Two findings of Ghorbani, Krishnan & Xiao (ICML 2019, arXiv:1901.10159):

1. at initialisation the density has significant negative mass, which disappears fast once
   training starts (the paper's Figure of the density at init and after a few steps/epochs);
2. networks without BatchNorm have a few large *outlier* eigenvalues separated from the bulk;
   BatchNorm removes them.

Here: the 64-64-10 MLP of ``digits_monitor.py`` and the same MLP with ``BatchNorm1d`` after the
hidden ``Linear`` (64-BN-64-10), on scikit-learn's bundled digits (offline), SGD with momentum 0.9
(lr 0.05, batch 32). The density of the Hessian of the mean loss over a fixed 10 % analysis set
(one micro-batch, so BatchNorm uses the analysis set's batch statistics, as in the paper:
``train_mode_batchnorm=True``) is estimated by stochastic Lanczos quadrature
(``spectral_density(HessianOperator(...), num_runs=8, num_steps=80)``) at initialisation and
after epochs 1, 2, 5 and the last one. Printed per network and checkpoint: lambda_max,
lambda_min, negative mass (fraction of eigenvalues below -1e-3 * spectral radius; also with
-1e-2 * spectral radius), the share of sum |lambda| carried by negative eigenvalues (scale-free,
no threshold), the raw fraction of negative-weighted quadrature mass, the outlier ratio lambda_1 / lambda_11 (a C=10
class problem has ~C outliers, so lambda_11 is the edge of the bulk) and the share of the trace
carried by the top 10 eigenvalues. Verdicts:

* *negative mass disappears*: the init negative mass is at least 1 % and falls to at most half of
  it by the end of epoch 2 (mean over seeds), for each network;
* *BatchNorm removes outliers*: the trained no-BN outlier ratio is at least twice the BN one.

    OMP_NUM_THREADS=1 python examples/density_init_vs_trained.py           # ~1-2 min
    OMP_NUM_THREADS=1 python examples/density_init_vs_trained.py --quick   # smoke run

The densities (log scale) go to ``examples/outputs/density_init_vs_trained.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_monitor import digits_datasets

from lightning_hessian import HessianOperator, spectral_density

OUTPUTS = Path(__file__).resolve().parent / "outputs"


def make_mlp(batchnorm: bool, hidden: int = 64) -> nn.Module:
    """The digits MLP (64-64-10); with ``batchnorm`` a BatchNorm1d after the hidden Linear."""
    if batchnorm:
        return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def analyse(model: nn.Module, batch, num_steps: int, num_runs: int) -> dict:
    op = HessianOperator(model, F.cross_entropy, data=[batch], train_mode_batchnorm=True)
    sd = spectral_density(op, num_runs=num_runs, num_steps=num_steps, seed=0)
    top, _ = sd.top_ritz_values(11)
    trace = sd.deflated_trace
    nodes, weights = sd.measure()
    return {
        "lmax": float(top[0]),
        "lmin": sd.min_eigenvalue,
        "neg_mass": sd.negative_mass,
        "neg_raw": float(weights[nodes < 0].sum()),
        "neg_1e2": sd.negative_fraction(1e-2),
        # scale-free: share of the absolute curvature sum_i |λ_i| carried by negative eigenvalues
        "neg_curv": float((weights * nodes.abs())[nodes < 0].sum() / (weights * nodes.abs()).sum()),
        "outlier_ratio": float(top[0] / top[10]) if top.numel() >= 11 and top[10] > 0 else float("nan"),
        "top10_share": float(top[:10].sum() / trace),
        "trace": trace,
        "sd": sd,
    }


def train_and_analyse(
    batchnorm: bool, seed: int, epochs: int, checkpoints: set[int], num_steps: int, num_runs: int
) -> dict[int, dict]:
    torch.manual_seed(seed)
    train_set, _ = digits_datasets(0)
    x, y = train_set.tensors
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(42))[: len(train_set) // 10]
    analysis = (x[idx], y[idx])
    model = make_mlp(batchnorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    out = {0: analyse(model, analysis, num_steps, num_runs)}  # 0 = initialisation
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if epoch in checkpoints:
            out[epoch] = analyse(model, analysis, num_steps, num_runs)
            model.eval()
            with torch.no_grad():
                out[epoch]["train_loss"] = float(F.cross_entropy(model(x), y))
    return out


def plot(results: dict, checkpoints: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, (name, per_seed) in zip(axes, results.items(), strict=False):
        for i, epoch in enumerate(checkpoints):
            sd = per_seed[0][epoch]["sd"]
            label = "init" if epoch == 0 else f"epoch {epoch}"
            ax.semilogy(
                sd.grid.numpy(),
                sd.density.clamp_min(1e-10).numpy(),
                color=cmap(i / max(1, len(checkpoints) - 1)),
                label=label,
            )
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_ylim(bottom=1e-7)
        ax.set_title(f"{name} (seed 0)")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)

    fig2, axes2 = plt.subplots(1, 2, figsize=(12, 4.2))  # zoom on the negative side near zero
    for ax, (name, per_seed) in zip(axes2, results.items(), strict=False):
        for i, epoch in enumerate(checkpoints):
            sd = per_seed[0][epoch]["sd"]
            lo = float(per_seed[0][0]["lmin"]) * 1.2
            pts = torch.linspace(lo, -lo, 400, dtype=torch.float64)
            ax.semilogy(
                pts.numpy(),
                sd.density_at(pts).clamp_min(1e-10).numpy(),
                color=cmap(i / max(1, len(checkpoints) - 1)),
                label="init" if epoch == 0 else f"epoch {epoch}",
            )
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_title(f"{name}: zoom around 0")
        ax.legend(fontsize=8)
    fig2.tight_layout()
    fig2.savefig(path.with_name(path.stem + "_zoom.png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=80)
    parser.add_argument("--num-runs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 3 epochs, 3 x 25 Lanczos steps")
    parser.add_argument("--out", type=Path, default=OUTPUTS / "density_init_vs_trained.png")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.num_steps, args.num_runs = 3, 1, 25, 3
    torch.set_num_threads(1)
    start = time.perf_counter()
    checkpoints = sorted({0, 1, 2, min(5, args.epochs), args.epochs})
    results = {}
    for name, bn in (("MLP (no BatchNorm)", False), ("MLP + BatchNorm", True)):
        results[name] = [
            train_and_analyse(bn, seed, args.epochs, set(checkpoints), args.num_steps, args.num_runs)
            for seed in range(args.seeds)
        ]

    def mean(name: str, epoch: int, key: str) -> float:
        return float(torch.tensor([r[epoch][key] for r in results[name]]).mean())

    keys = ("lmax", "lmin", "neg_mass", "neg_1e2", "neg_raw", "neg_curv", "outlier_ratio", "top10_share", "trace")
    print(
        f"Mean over {args.seeds} seed(s); analysis set 161 samples; {args.num_runs} SLQ runs x {args.num_steps} "
        "Lanczos steps"
    )
    print(
        f"{'network':<20} {'epoch':>5} {'λmax':>8} {'λmin':>9} {'neg.mass':>9} {'neg>1e-2':>8} {'neg.raw':>8} "
        f"{'neg|λ|':>7} {'λ1/λ11':>7} {'top10/tr':>8} {'trace':>8} {'loss':>7}"
    )
    for name in results:
        for epoch in checkpoints:
            row = {k: mean(name, epoch, k) for k in keys}
            loss = mean(name, epoch, "train_loss") if epoch > 0 else float("nan")
            print(
                f"{name:<20} {('init' if epoch == 0 else epoch)!s:>5} {row['lmax']:>8.3f} {row['lmin']:>9.4f} "
                f"{row['neg_mass']:>9.4f} {row['neg_1e2']:>8.4f} "
                f"{row['neg_raw']:>8.4f} {row['neg_curv']:>7.4f} {row['outlier_ratio']:>7.2f} "
                f"{row['top10_share']:>8.3f} {row['trace']:>8.2f} {loss:>7.4f}"
            )
    # verdict 1: negative mass
    ok_neg = []
    for name in results:
        init, ep2 = mean(name, 0, "neg_mass"), mean(name, min(2, args.epochs), "neg_mass")
        ok = init >= 0.01 and ep2 <= 0.5 * init
        ok_neg.append(ok)
        print(
            f"{name}: negative mass {init:.4f} at init -> {ep2:.4f} after epoch {min(2, args.epochs)} "
            f"-> {mean(name, args.epochs, 'neg_mass'):.4f} after epoch {args.epochs}; negative share of sum|λ| "
            f"{mean(name, 0, 'neg_curv'):.4f} -> {mean(name, min(2, args.epochs), 'neg_curv'):.4f} -> "
            f"{mean(name, args.epochs, 'neg_curv'):.4f}"
        )
    print(
        f"VERDICT negative mass: {'reproduced' if all(ok_neg) else 'not reproduced'} "
        f"(criterion: init negative mass >= 0.01 and <= half of it after epoch 2, for both networks: {ok_neg})"
    )
    names = list(results)
    r_plain, r_bn = mean(names[0], args.epochs, "outlier_ratio"), mean(names[1], args.epochs, "outlier_ratio")
    r_plain0, r_bn0 = mean(names[0], 0, "outlier_ratio"), mean(names[1], 0, "outlier_ratio")
    ok_bn = r_plain >= 2 * r_bn
    print(
        f"outlier ratio λ1/λ11: init {r_plain0:.2f} (no BN) vs {r_bn0:.2f} (BN); epoch {args.epochs} {r_plain:.2f} "
        f"(no BN) vs {r_bn:.2f} (BN)"
    )
    print(
        f"VERDICT BatchNorm removes outliers: {'reproduced' if ok_bn else 'not reproduced'} "
        f"(criterion: trained no-BN λ1/λ11 >= 2 x BN λ1/λ11: {r_plain:.2f} vs {r_bn:.2f})"
    )
    plot(results, checkpoints, args.out)
    print(
        f"total {time.perf_counter() - start:.0f} s; plots: {args.out} and "
        f"{args.out.with_name(args.out.stem + '_zoom.png')}"
    )


if __name__ == "__main__":
    main()
