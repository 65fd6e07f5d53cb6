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

Usage::

    python benchmarks/bench_fd.py              # both models (~3-6 min on 2 busy cores)
    python benchmarks/bench_fd.py --models mlp --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times  # noqa: E402

from lightning_hessian import HessianOperator, top_eigenvalues  # noqa: E402
from lightning_hessian.operators import derivative_friendly_attention  # noqa: E402
from tests.helpers import analysis_batches, small_cnn, train, trained_digits_mlp  # noqa: E402

Batches = list[tuple[Tensor, Tensor]]


def build(name: str) -> tuple[nn.Module, Batches]:
    images = name == "cnn"
    model = train(small_cnn(0), steps=200, images=True) if images else trained_digits_mlp()
    model.eval()
    return model, analysis_batches(fraction=0.1, seed=42, batch_size=60, images=images)


def cast_data(data: Batches, dtype: torch.dtype) -> Batches:
    return [(x.to(dtype), y) for x, y in data]


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
    times = interleaved_times(cases, rounds=rounds)  # type: ignore[arg-type]
    g = times["gradient"]
    print(f"\n## {name}: cost per vector in gradients (gradient over the 180 samples: {g * 1e3:.2f} ms)")
    print("| path | width | ms per call | gradients per vector |")
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
    m64 = copy.deepcopy(model).double().eval()
    params = [p for p in m64.parameters() if p.requires_grad]
    total = sum(x.shape[0] for x, _ in data)

    def hvp(v: Tensor) -> Tensor:
        with derivative_friendly_attention():  # double backward needs the math SDPA kernel
            return _hvp(v)

    def _hvp(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        chunks = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)]
        for x, y in data:
            loss = F.cross_entropy(m64(x.double()), y) * (x.shape[0] / total)
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(g, params, grad_outputs=chunks)
            out += torch.cat([h.reshape(-1) for h in hv])
        return out

    return hvp


def exact_top(hvp, n: int, iters: int = 300) -> tuple[float, Tensor]:
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam = 0.0
    for _ in range(iters):
        w = hvp(v)
        lam = float(v @ w)
        v = w / w.norm()
    return lam, v


def accuracy_row(label: str, op: HessianOperator, hvp, probes: Tensor, top_vec: Tensor, lam: float) -> str:
    errs = []
    for j in range(probes.shape[1]):
        got = op.matvec(probes[:, j].to(op.dtype)).double()
        want = hvp(probes[:, j])
        errs.append(float((got - want).norm() / want.norm()))
    got = op.matvec(top_vec.to(op.dtype)).double()
    want = hvp(top_vec)
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
    lam, top_vec = exact_top(hvp, n)
    probes = torch.randn(n, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    print(f"\n## {name}: accuracy against exact float64 products (lambda_max = {lam:.6g})")
    print("| model dtype / scheme | step | matvec median | matvec max | top eigvec | top eigenvalue | fd_error_estimate |")
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
        ref_lam, ref_vec = (lam, top_vec) if m is model else exact_top(ref, n)
        print(accuracy_row(label, op, ref, probes, ref_vec, ref_lam))
    ad = HessianOperator(model, F.cross_entropy, data, backend="autograd")
    print(accuracy_row("float32, autograd (exact path, for scale)", ad, hvp, probes, top_vec, lam))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: cost,accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for key in args.models.split(","):
        name = "digits MLP" if key == "mlp" else "small CNN+BN"
        model, data = build(key)
        if "cost" not in skip:
            cost_section(name, model, data, args.rounds)
        if "accuracy" not in skip:
            accuracy_section(name, model, data)


if __name__ == "__main__":
    main()
