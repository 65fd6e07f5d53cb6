"""CPU checks of issue 11's scheduling targets: ``backend="auto"`` against the forced paths, and ``max_overhead``.

[1] ``backend="auto"`` (a fresh operator: the measurement on the first micro-batch is included;
    and "reused": an operator given the measured choice, as in ``HessianMonitor`` after its first
    evaluation) against ``backend="func"`` and ``backend="autograd"`` on the digits MLP and the small CNN:
    median time of one ``spectral_density`` at the monitor's defaults (3 x 40, product width 3)
    and of one ``top_eigenvalues`` (width 1), interleaved rounds; target: auto within 1.15x of
    the faster forced path.
[2] A 12-epoch digits run (``examples/digits_monitor.py``'s MLP, batch size 32) with the default
    ``HessianMonitor`` and ``max_overhead=0.5``, and without a budget: cumulative callback time
    over training time (the callback's own clock), evaluations run and skipped; target <= 0.6.

    python benchmarks/bench_schedule.py [--skip backend,overhead] [--rounds 5] [--epochs 12]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleaved_times

sys.path.insert(0, str(ROOT / "examples"))
from digits_monitor import DigitsMLP, digits_datasets

from lightning_hessian import HessianOperator, spectral_density, top_eigenvalues
from lightning_hessian.callbacks import HessianMonitor
from tests.helpers import analysis_batches, small_cnn, trained_digits_mlp


def backend_check(rounds: int) -> None:
    cases = {
        "digits MLP": (trained_digits_mlp(), analysis_batches(batch_size=60)),
        "small CNN+BN": (small_cnn(0).eval(), analysis_batches(batch_size=60, images=True)),
    }
    for name, (model, data) in cases.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"\n[1] {name} (n={n:,}, {sum(len(y) for _, y in data)} samples in {len(data)} micro-batches)")
        print(
            f"    {'task':<28} {'func s':>8} {'autograd s':>10} {'auto s':>8} {'auto/best':>9} "
            f"{'reused s':>9} {'reused/best':>11}  auto chose"
        )
        for task, _width in (("spectral_density 3x40", 3), ("top_eigenvalues (1 vector)", 1)):
            chosen: dict[int, str] = {}

            def run(backend: str, task: str = task, model=model, data=data, chosen=chosen) -> None:
                if backend == "reused":  # as in HessianMonitor after its first evaluation
                    op = HessianOperator(model, F.cross_entropy, data, backend_choices=chosen)
                else:
                    op = HessianOperator(model, F.cross_entropy, data, backend=backend)  # type: ignore[arg-type]
                if task.startswith("spectral"):
                    spectral_density(op, num_runs=3, num_steps=40, seed=0)
                else:
                    top_eigenvalues(op, seed=0)
                if backend == "auto":
                    chosen.update(op.backend_choices)

            run("auto")  # the choice that "reused" starts from
            cases = {b: (lambda b=b: run(b)) for b in ("func", "autograd", "auto", "reused")}
            times = interleaved_times(cases, rounds, target_s=0.0)
            best = min(times["func"], times["autograd"])
            print(
                f"    {task:<28} {times['func']:>8.3f} {times['autograd']:>10.3f} {times['auto']:>8.3f} "
                f"{times['auto'] / best:>8.2f}x {times['reused']:>9.3f} {times['reused'] / best:>10.2f}x  {chosen}"
            )


def overhead_check(epochs: int) -> None:
    print(f"\n[2] digits MLP, {epochs} epochs, batch size 32, default HessianMonitor (3 x 40)")
    print(
        f"    {'max_overhead':<13} {'evaluations':>11} {'skipped':>7} {'callback s':>10} "
        f"{'training s':>10} {'ratio':>6}"
    )
    for budget in (None, 0.5):
        pl.seed_everything(0, verbose=False)
        train_set, _ = digits_datasets(0)
        monitor = HessianMonitor(max_overhead=budget, log_density=False)
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[monitor],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(DigitsMLP(lr=0.05), DataLoader(train_set, batch_size=32, shuffle=True))
        s = monitor.schedule
        print(
            f"    {budget!s:<13} {s.num_evaluations:>11} {s.num_skipped:>7} {s.evaluation_seconds:>10.2f} "
            f"{s.training_seconds:>10.2f} {s.cumulative_overhead:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", default="", help="comma-separated: backend, overhead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(
        f"bench_schedule  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  "
        f"torch {torch.__version__}  "
        f"{torch.get_num_threads()} thread(s)"
    )
    if "backend" not in skip:
        backend_check(args.rounds)
    if "overhead" not in skip:
        overhead_check(args.epochs)


if __name__ == "__main__":
    main()
