"""Benchmark: secant/Illinois radius finding versus plain bisection in ``local_volume``.

Both root finders start from the same first trial distance and stop at the same tolerance (the
crossing bracketed to a relative width ``rel_tol``), so they return the same radii; the table
compares the forward passes over the analysis set (one per direction and step) and the wall time
per estimate, with bisection/secant ratios, from one run.

Models: the paper's digits MLP (64-64-10, ReLU, 4,810 parameters, trained briefly with Adam, KL
cost on a 10 % analysis set), and optionally a wider MLP (64-512-512-10, 300k parameters) whose
forward passes dominate the run time.

Usage::

    python benchmarks/bench_volume.py                 # defaults: 100 directions, 3 repeats
    python benchmarks/bench_volume.py --directions 50 --repeats 1 --no-wide
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hessian.volume import VolumeEstimate, init_prior_std, local_volume


def trained_digits_mlp(hidden: tuple[int, ...], steps: int = 300, seed: int = 0):
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    analysis, train = perm[: len(x) // 10], perm[len(x) // 10 :]
    torch.manual_seed(seed)
    sizes = (64, *hidden, 10)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    prior = init_prior_std(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (128,), generator=gen)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = [(x[analysis[:90]], y[analysis[:90]]), (x[analysis[90:]], y[analysis[90:]])]
    return model, optimizer, data, prior


def timed(repeats: int, **kwargs) -> tuple[VolumeEstimate, float]:
    times, est = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        est = local_volume(**kwargs)
        times.append(time.perf_counter() - start)
    assert est is not None
    return est, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    parser.add_argument("--rel-tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    parser.add_argument("--wide-directions", type=int, default=32, help="directions for the 300k-parameter MLP")
    parser.add_argument("--no-wide", action="store_true", help="skip the 300k-parameter MLP")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    models = {"digits MLP 4,810": (trained_digits_mlp((64,)), args.directions)}
    if not args.no_wide:
        models["wide MLP 300k"] = (trained_digits_mlp((512, 512)), args.wide_directions)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), k={args.directions} directions "
        f"(wide MLP: {args.wide_directions}), "
        f"rel_tol={args.rel_tol:g}, KL cost, cutoff 1e-2, median of {args.repeats} run(s)\n"
    )
    header = (
        f"{'model':<18} {'measure/precond':<20} {'passes sec':>10} {'passes bis':>10} {'/dir sec':>8} "
        f"{'/dir bis':>8} {'ratio':>6} {'time sec':>9} {'time bis':>9} {'ratio':>6} {'|dlogV|':>8} {'max|dlog r|':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, ((model, optimizer, data, prior), k) in models.items():
        cases = [
            ("gaussian/none", dict(measure="gaussian", prior_std=prior)),
            ("gaussian/adam", dict(measure="gaussian", prior_std=prior, preconditioner="adam", optimizer=optimizer)),
            ("gaussian/ggn_diag", dict(measure="gaussian", prior_std=prior, preconditioner="hessian_diag")),
            ("lebesgue/none", dict(measure="lebesgue")),
        ]
        for label, extra in cases:
            common = dict(model=model, data=data, num_directions=k, rel_tol=args.rel_tol, seed=0, **extra)
            warnings.filterwarnings("ignore", message=r"local_volume: .* exactly flat")  # the digits' blank pixels
            sec, t_sec = timed(args.repeats, root_finder="secant", **common)
            bis, t_bis = timed(args.repeats, root_finder="bisection", **common)
            d_logv = abs(sec.log_volume - bis.log_volume) if math.isfinite(sec.log_volume) else float("nan")
            d_logr = float((sec.log_radii - bis.log_radii).abs().max())
            p_sec, p_bis = int(sec.evaluations.sum()) + 1, int(bis.evaluations.sum()) + 1
            print(
                f"{name:<18} {label:<20} {p_sec:>10d} {p_bis:>10d} "
                f"{sec.forward_passes_per_direction:>8.2f} {bis.forward_passes_per_direction:>8.2f} "
                f"{p_bis / p_sec:>5.2f}x {t_sec:>8.3f}s {t_bis:>8.3f}s "
                f"{t_bis / t_sec:>5.2f}x {d_logv:>8.2e} {d_logr:>11.2e}"
            )
    print(
        "\npasses: forward passes of the radius search over the analysis set (one per direction and step,"
        "\nplus the anchor; the Lebesgue measure's flat-coordinate check is in the times, not the passes);"
        "\nratio: bisection / secant; |dlogV|, max|dlog r|: disagreement of the two finders (nats)."
    )


if __name__ == "__main__":
    main()
