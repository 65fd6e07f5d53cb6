"""Benchmark: ``HessianOperator(compile=True)`` against eager products, on CPU (inductor).

For each model and HVP path (``backend="func"``: forward-over-reverse; ``backend="autograd"``:
double backward, compiled in its ``torch.func`` reverse-over-reverse form), the median seconds of
``matmat`` with 1 and 10 vectors inside one operator session, eager and compiled, as multiples of
one gradient of the same mean loss, the compiled/eager speed-up, and the one-off cost of the
first compiled products (compilation). Where compilation fails the operator warns and runs
eagerly: the row says so.

Models: the digits MLP (4,810 parameters) and small CNN with BatchNorm (374), analysis set of 180
digits in 3 micro-batches (as in ``bench_core.py``); optionally the tiny HF GPT-2 and the tiny ViT
of ``benchmarks/_models.py``.

Usage::

    python benchmarks/bench_compile.py                       # digits MLP and CNN (~5-10 min on 2 busy cores)
    python benchmarks/bench_compile.py --models mlp,cnn,gpt2,vit --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import interleaved_times  # puts the repo root on sys.path
from torch import Tensor, nn

from lightning_hessian import HessianOperator
from tests.helpers import analysis_batches, small_cnn, train, trained_digits_mlp


def build(name: str) -> tuple[str, nn.Module, list[Any], dict[str, Any], Callable[[], Tensor]]:
    """``(label, model, batches, operator kwargs, mean loss)`` of one benchmark model."""
    if name in ("mlp", "cnn"):
        images = name == "cnn"
        model = (train(small_cnn(0), steps=200, images=True) if images else trained_digits_mlp()).eval()
        data = analysis_batches(fraction=0.1, seed=42, batch_size=60, images=images)
        total = sum(int(x.shape[0]) for x, _ in data)

        def mean_loss() -> Tensor:
            return sum(F.cross_entropy(model(x), y) * (x.shape[0] / total) for x, y in data)  # type: ignore[return-value]

        label = "digits MLP" if name == "mlp" else "small CNN+BN"
        return label, model, data, {"loss_fn": F.cross_entropy}, mean_loss
    from _models import gpt2_tiny, vit_tiny

    model, batches, batch_loss = gpt2_tiny() if name == "gpt2" else vit_tiny()
    label = "HF GPT-2 tiny" if name == "gpt2" else "ViT tiny"
    return label, model, batches, {"batch_loss": batch_loss}, lambda: sum(batch_loss(model, b) for b in batches)


def measure(name: str, rounds: int) -> list[str]:
    label, model, batches, kwargs, loss = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    mats = {k: torch.randn((n, k), generator=gen, dtype=torch.float64) for k in (1, 10)}
    cases: dict[str, Callable[[], object]] = {"grad": lambda: torch.autograd.grad(loss(), params)}
    notes: dict[str, str] = {}
    stack = contextlib.ExitStack()
    for backend in ("func", "autograd"):
        for compiled in (False, True):
            op = HessianOperator(model, data=batches, backend=backend, compile=compiled, **kwargs)  # type: ignore[arg-type]
            stack.enter_context(op.session())
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                op.matmat(mats[1])
                op.matmat(mats[10])
            first = time.perf_counter() - start
            tag = f"{backend} {'compiled' if compiled else 'eager'}"
            failed = op._compiler.failed if op._compiler is not None else {}
            notes[tag] = f"first 1+10 products {first:.1f} s" + (
                f"; compile FAILED, eager: {next(iter(failed.values()))[:90]}" if failed else ""
            )
            if caught and compiled and not failed:
                notes[tag] += f"; {len(caught)} warning(s)"
            for k in (1, 10):
                cases[f"{tag} x{k}"] = lambda op=op, k=k: op.matmat(mats[k])
    with stack:
        times = interleaved_times(cases, rounds=rounds)
    g = times["grad"]
    print(
        f"\n{label}: n={n:,}, {len(batches)} micro-batch(es), one gradient {g * 1e3:.3f} ms, median of {rounds} rounds"
    )
    print(f"    {'path':<22} {'x1 HVP/grad':>12} {'x10 HVP/grad':>13} {'x1 speed-up':>12} {'x10 speed-up':>13}  notes")
    summary = []
    for backend in ("func", "autograd"):
        for compiled in (False, True):
            tag = f"{backend} {'compiled' if compiled else 'eager'}"
            r1, r10 = times[f"{tag} x1"] / g, times[f"{tag} x10"] / 10 / g
            if compiled:
                s1 = times[f"{backend} eager x1"] / times[f"{tag} x1"]
                s10 = times[f"{backend} eager x10"] / times[f"{tag} x10"]
                speed = f"{s1:>11.2f}x {s10:>12.2f}x"
                summary.append(f"{label} {backend}: compiled/eager speed-up x1 {s1:.2f}x, x10 {s10:.2f}x")
            else:
                speed = f"{'':>12} {'':>13}"
            print(f"    {tag:<22} {r1:>11.2f}x {r10:>12.2f}x {speed}  {notes[tag]}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn,gpt2,vit")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(
        f"bench_compile  {datetime.datetime.now().isoformat(timespec='seconds')}  python {platform.python_version()}  "
        f"torch {torch.__version__}  {torch.get_num_threads()} thread(s), inductor on CPU"
    )
    summary = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        summary.extend(measure(name, args.rounds))
    print("\nSUMMARY")
    for line in summary:
        print("- " + line)


if __name__ == "__main__":
    main()
