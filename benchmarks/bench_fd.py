"""Benchmark: finite-difference HVPs (``backend="finite_difference"``): cost in gradients, accuracy.

Models and analysis set as in ``bench_core.py``: the digits MLP (64-64-10, 4,810 parameters) and
the small CNN with BatchNorm (374 parameters), trained briefly, eval mode; the seeded 10 % of the
digits (180 samples) as three micro-batches of 60; one torch thread.

1. **Cost** per vector, as a multiple of one gradient of the same mean loss over the same
   analysis set (``torch.autograd.grad``, no operator): finite differences (central, and
   Richardson) at widths 1 and 10, next to ``func`` and ``autograd``; and the gradient count of a
   default ``HessianMonitor`` evaluation (3 runs x 40 steps + the one error estimate).
   Target: <= 2.2 gradients per vector.
2. **Accuracy** against exact float64 products (double backward on a float64 copy): relative
   matvec error on 10 Gaussian vectors (median, max) and on the exact top eigenvector, the
   top eigenvalue by ``top_eigenvalues`` versus ``eigvalsh`` of the exact Hessian, and the
   operator's own ``fd_error_estimate``; for float32 in place (central, Richardson, and 4x / 1/4x
   the default step), float32 with ``compute_dtype=torch.float64``, a float64 model, and a
   bfloat16 model (its products on float32 copies by default, and in bfloat16 in place).

3. **Cost on a wider model** (64-512-512-10, 300 k parameters, untrained): the same table, where
   the fixed per-product Python cost (a few dozen tensor operations) no longer shows.

Times are the least *thread CPU time* of round-robin calls (one torch thread), not wall time: on
a machine shared with other jobs, long calls are preempted more often than short ones.

Usage::

    python benchmarks/bench_fd.py              # all (~10 min on 2 busy cores)
    python benchmarks/bench_fd.py --models mlp --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times  # noqa: F401 - bench_core's timing; min-of-rounds here

from lightning_hessian import HessianOperator, top_eigenvalues
from lightning_hessian.operators.finite_difference import central_difference_products, fd_step
from tests.helpers import analysis_batches, exact_hessian, small_cnn, train, trained_digits_mlp

Batches = list[tuple[Tensor, Tensor]]


def build(name: str) -> tuple[nn.Module, Batches]:
    if name == "wide":  # cost only: where the per-product Python overhead no longer matters
        torch.manual_seed(0)
        wide = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
        return wide.eval(), analysis_batches(fraction=0.1, seed=42, batch_size=60)
    images = name == "cnn"
    model = train(small_cnn(0), steps=200, images=True) if images else trained_digits_mlp()
    model.eval()
    return model, analysis_batches(fraction=0.1, seed=42, batch_size=60, images=images)


def cast_data(data: Batches, dtype: torch.dtype) -> Batches:
    return [(x.to(dtype), y) for x, y in data]


def min_times(cases: dict[str, object], rounds: int) -> dict[str, float]:
    """Least CPU time of ``rounds`` round-robin calls per case (seconds).

    CPU time of this thread (``time.thread_time``; torch runs on one thread here), not wall time:
    on a machine shared with other jobs a long call is preempted more often than a short one, which
    biases wall-time ratios between calls of very different lengths.
    """
    best = dict.fromkeys(cases, math.inf)
    for fn in cases.values():
        fn()  # type: ignore[operator]
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.thread_time()
            fn()  # type: ignore[operator]
            best[name] = min(best[name], time.thread_time() - start)
    return best


def bare_fd(model: nn.Module, data: Batches, width: int):
    """The finite-difference machinery alone (no operator): ``central_difference_products`` per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    total = sum(x.shape[0] for x, _ in data)
    units = torch.randn(width, n, generator=torch.Generator().manual_seed(0))
    units = units / units.norm(dim=1, keepdim=True)
    chunks = units.split([p.numel() for p in params], dim=1)
    tangents = [c.reshape(width, *p.shape) for c, p in zip(chunks, params, strict=True)]
    step = fd_step(sum(float(p.detach().double().pow(2).sum()) for p in params), n, torch.float32)

    def run() -> object:
        out = []
        for x, y in data:

            def grad_fn(x=x, y=y):
                loss = F.cross_entropy(model(x), y) * (x.shape[0] / total)
                return torch.autograd.grad(loss, params), loss.detach()

            out.append(central_difference_products(params, tangents, grad_fn, step))
        return out

    return run


def cost_section(name: str, model: nn.Module, data: Batches, rounds: int) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    total = sum(x.shape[0] for x, _ in data)

    def grad() -> object:
        return [
            torch.autograd.grad(F.cross_entropy(model(x), y) * (x.shape[0] / total), params, allow_unused=True)
            for x, y in data
        ]

    cases: dict[str, object] = {"gradient": grad}
    widths: dict[str, int] = {}
    for width in (1, 10):
        cases[f"bare FD machinery k={width}"] = bare_fd(model, data, width)
        widths[f"bare FD machinery k={width}"] = width
    for label, backend, kwargs, width in [
        ("fd central k=1", "finite_difference", {}, 1),
        ("fd central k=10", "finite_difference", {}, 10),
        ("fd Richardson k=10", "finite_difference", {"fd_richardson": True}, 10),
        ("func k=1", "func", {}, 1),
        ("func k=10", "func", {}, 10),
        ("autograd k=1", "autograd", {}, 1),
        ("autograd k=10", "autograd", {}, 10),
    ]:
        op = HessianOperator(model, F.cross_entropy, data, backend=backend, **kwargs)  # type: ignore[arg-type]
        mat = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
        op.matmat(mat)  # the first product (FD: with the error estimate) is not timed
        cases[label] = lambda op=op, mat=mat: op.matmat(mat)
        widths[label] = width
    times = min_times(cases, rounds)
    g = times["gradient"]
    print(f"\n## {name}: cost per vector in gradients (one gradient over the 180 samples: {g * 1e3:.2f} ms)")
    print(f"(least thread CPU time of {rounds} round-robin calls per case)")
    print("| path | width | CPU ms per call | gradients per vector |")
    print("| --- | --- | --- | --- |")
    ratios = {}
    for label, width in widths.items():
        ratios[label] = times[label] / width / g
        print(f"| {label.rsplit(' ', 1)[0]} | {width} | {times[label] * 1e3:.2f} | {ratios[label]:.2f} |")
    op = HessianOperator(model, F.cross_entropy, data, backend="finite_difference")
    for step in range(40):  # a monitor evaluation's shape: 3 Lanczos runs advance together, 40 steps
        op.matmat(torch.randn(n, 3, generator=torch.Generator().manual_seed(step)))
    per_vector = op.num_gradients / len(data) / op.num_hvps
    print(f"monitor-shaped evaluation (3 x 40 HVPs): {per_vector:.3f} gradient evaluations per vector (counted)")
    ratios["counted per vector"] = per_vector
    return ratios


def exact_hvp_fn(model: nn.Module, data: Batches):
    """Exact products: double backward on a float64 copy (math SDPA kernel)."""
    op = HessianOperator(
        copy.deepcopy(model).double(), F.cross_entropy, cast_data(data, torch.float64), backend="autograd"
    )
    return op


def exact_top(model: nn.Module, data: Batches) -> tuple[float, Tensor]:
    """The top eigenpair of the exact float64 Hessian (``torch.func.hessian`` + ``eigh``)."""
    values, vectors = torch.linalg.eigh(exact_hessian(model, data))
    return float(values[-1]), vectors[:, -1]


def accuracy_row(
    label: str, op: HessianOperator, hvp: HessianOperator, probes: Tensor, top_vec: Tensor, lam: float
) -> str:
    errs = []
    for j in range(probes.shape[1]):
        got = op.matvec(probes[:, j].to(op.dtype)).double()
        want = hvp.matvec(probes[:, j])
        errs.append(float((got - want).norm() / want.norm()))
    got = op.matvec(top_vec.to(op.dtype)).double()
    want = hvp.matvec(top_vec)
    top_err = float((got - want).norm() / want.norm())
    eig = float(top_eigenvalues(op, k=1).values[0])
    step = f"{op.fd_step:.3g}" if op.fd_step is not None else "-"
    return (
        f"| {label} | {step} | {statistics.median(errs):.1e} | {max(errs):.1e} | {top_err:.1e} | "
        f"{abs(eig - lam) / abs(lam):.1e} | {op.fd_error_estimate:.1e} |"
    )


def accuracy_section(name: str, model: nn.Module, data: Batches) -> None:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hvp = exact_hvp_fn(model, data)
    lam, top_vec = exact_top(model, data)
    probes = torch.randn(n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    print(f"\n## {name}: accuracy against exact float64 products (lambda_max = {lam:.6g})")
    print("| model dtype / scheme | step | matvec median | matvec max | top eigvec | top eigenvalue | fd_error_est. |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fd = "finite_difference"
    rows = [
        ("float32, central (default)", model, data, {}),
        ("float32, Richardson", model, data, {"fd_richardson": True}),
        ("float32, float64 copies (compute_dtype)", model, data, {"compute_dtype": torch.float64}),
        ("float64 model, central", copy.deepcopy(model).double(), cast_data(data, torch.float64), {}),
    ]
    default = HessianOperator(model, F.cross_entropy, data, backend=fd)
    default.matvec(probes[:, 0].float())
    assert default.fd_step is not None
    rows += [
        ("float32, central, 4x step", model, data, {"fd_step": 4 * default.fd_step}),
        ("float32, central, 1/4 step", model, data, {"fd_step": default.fd_step / 4}),
    ]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16_data = cast_data(data, torch.bfloat16)
    rows += [
        ("bfloat16, float32 copies (default)", bf16, bf16_data, {}),
        ("bfloat16 in place (compute_dtype=bf16)", bf16, bf16_data, {"compute_dtype": torch.bfloat16}),
    ]
    for label, m, d, kwargs in rows:
        op = HessianOperator(m, F.cross_entropy, d, backend=fd, **kwargs)
        # the exact reference is the float64 Hessian of this model's own (rounded) weights
        ref = hvp if m is model else exact_hvp_fn(m, d)
        ref_lam, ref_vec = (lam, top_vec) if m is model else exact_top(m, d)
        print(accuracy_row(label, op, ref, probes, ref_vec, ref_lam))
    ad = HessianOperator(model, F.cross_entropy, data, backend="autograd")
    print(accuracy_row("float32, autograd (exact path, for scale)", ad, hvp, probes, top_vec, lam))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,wide", help="comma-separated: mlp,cnn,wide")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip", default="", help="comma-separated: cost,accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    names = {"mlp": "digits MLP", "cnn": "small CNN+BN", "wide": "wide MLP 64-512-512-10 (untrained)"}
    for key in args.models.split(","):
        name = names[key]
        model, data = build(key)
        if "cost" not in skip:
            cost_section(name, model, data, args.rounds if key != "wide" else min(args.rounds, 5))
        if "accuracy" not in skip and key != "wide":
            accuracy_section(name, model, data)


if __name__ == "__main__":
    main()
