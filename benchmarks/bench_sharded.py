"""Benchmark: FSDP2-sharded analysis (``fully_shard``, gloo, CPU processes) at 1, 2 and 4 processes.

For each world size ``W`` the script spawns ``W`` CPU processes (gloo), shards an MLP with
``fully_shard`` (every ``Linear``, then the root) over a 1-D mesh, gives each process its share of
a fixed global analysis set, and measures on every rank:

* **basis memory per rank**: the bytes of the stored Lanczos basis (``LanczosResult.basis``,
  ``num_runs x num_steps x local entries x 8``) after ``lanczos`` from the sharded probes, against
  the unsharded size;
* **time per evaluation**: one ``spectral_density(num_runs, num_steps)`` (``num_runs * num_steps``
  finite-difference HVPs, each two sharded gradients of the whole analysis set), median of
  ``--repeats``;
* that every rank got the same top Ritz value and trace (bit for bit) and that they do not
  depend on ``W`` (relative spread).

At ``W = 1`` it also measures the cost of one HVP in gradients of the same model: a gradient
(forward + backward over the analysis set), exact HVPs (double backward, forward-over-reverse)
through :class:`~lightning_hessian.HessianOperator` on the unsharded model, and the
finite-difference HVP of :class:`~lightning_hessian.operators.sharded.ShardedHessianOperator`;
and the FD product's relative error against the exact one (float32 model); and λ_max by finite
differences against the exact one on a ReLU and a tanh digits MLP (the kinks of ReLU).

On a machine with fewer cores than ``4``, times at ``W = 4`` measure oversubscription, not
scaling; the memory figures do not depend on it.

Run: ``python benchmarks/bench_sharded.py [--world-sizes 1,2,4] [--width 512] [--repeats 3]``
(about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_SAMPLES = 256
MICRO_BATCH = 64
NUM_RUNS = 2
NUM_STEPS = 10


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def global_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(NUM_SAMPLES, 128, generator=g), torch.randint(0, 10, (NUM_SAMPLES,), generator=g)


def shard(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = global_data()
    lo, hi = rank * NUM_SAMPLES // world, (rank + 1) * NUM_SAMPLES // world
    return [(x[i : min(i + MICRO_BATCH, hi)], y[i : min(i + MICRO_BATCH, hi)]) for i in range(lo, hi, MICRO_BATCH)]


def fully_sharded(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sharded_figures(rank: int, world: int, width: int, repeats: int) -> dict[str, Any]:
    from lightning_hessian import spectral_density
    from lightning_hessian.estimators.lanczos import lanczos
    from lightning_hessian.operators.sharded import ShardedHessianOperator

    op = ShardedHessianOperator(
        fully_sharded(make_model(width), world), nn.functional.cross_entropy, shard(rank, world)
    )
    starts = op.vector_space.probes(op.num_params, NUM_RUNS, "rademacher", torch.Generator().manual_seed(0))
    result = lanczos(op, starts, NUM_STEPS)
    assert result.basis is not None
    basis_bytes = result.basis.numel() * result.basis.element_size()
    del result
    op.reset_num_hvps()
    densities = []

    def evaluate() -> None:
        densities.append(spectral_density(op, num_runs=NUM_RUNS, num_steps=NUM_STEPS, seed=0))

    seconds = _median_seconds(evaluate, repeats)
    gradient_s = _median_seconds(op.gradient, repeats)
    sd = densities[-1]
    return {
        "rank": rank,
        "local_params": op.num_params,
        "global_params": op.global_num_params,
        "basis_bytes": basis_bytes,
        "seconds_per_evaluation": seconds,
        "hvps_per_evaluation": op.num_hvps // len(densities),
        "sharded_gradient_s": gradient_s,
        "fd_error_estimate": op.fd_error_estimate,
        "top_eigenvalue": float(sd.top_ritz_values(1)[0][0]),
        "trace": float(sd.deflated_trace),
    }


def cost_per_vector(width: int, repeats: int) -> dict[str, float]:
    """World size 1: gradient, exact HVPs and the FD HVP on the same model and data (seconds)."""
    from lightning_hessian import HessianOperator
    from lightning_hessian.operators.sharded import ShardedHessianOperator

    data = shard(0, 1)
    model = make_model(width)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        for p in params:
            p.grad = None
        for x, y in data:
            (nn.functional.cross_entropy(model(x), y) * x.shape[0] / NUM_SAMPLES).backward()

    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    exact = {b: HessianOperator(model, nn.functional.cross_entropy, data, backend=b) for b in ("autograd", "func")}
    hv_exact = exact["autograd"].matvec(v)
    fd = ShardedHessianOperator(fully_sharded(make_model(width), 1), nn.functional.cross_entropy, data)
    hv_fd = fd.matvec(fd.local_rows(v))
    out = {"gradient_s": _median_seconds(gradient, repeats)}
    for name, op in exact.items():
        out[f"hvp_{name}_s"] = _median_seconds(lambda op=op: op.matvec(v), repeats)
    out["hvp_finite_difference_s"] = _median_seconds(lambda: fd.matvec(fd.local_rows(v)), repeats)
    out["fd_relative_error"] = float((hv_fd.to(torch.float64) - hv_exact).norm() / hv_exact.norm())
    return out


def activations() -> dict[str, dict[str, float]]:
    """World size 1: λ_max by sharded finite differences vs exact, ReLU vs tanh digits MLP (64-32-10)."""
    import copy

    from lightning_hessian import HessianOperator, top_eigenvalues
    from lightning_hessian.operators.sharded import ShardedHessianOperator
    from tests.helpers import digits_tensors

    x, y = digits_tensors()
    data = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]
    out = {}
    for act in (nn.ReLU, nn.Tanh):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), act(), nn.Linear(32, 10))
        exact = top_eigenvalues(HessianOperator(model, nn.functional.cross_entropy, data), k=1, seed=0)
        op = ShardedHessianOperator(fully_sharded(copy.deepcopy(model), 1), nn.functional.cross_entropy, data)
        fd = top_eigenvalues(op, k=1, seed=0)
        out[act.__name__] = {
            "exact": float(exact.values[0]),
            "fd": float(fd.values[0]),
            "fd_error_estimate": op.fd_error_estimate,
        }
    return out


def _worker(rank: int, world: int, port: int, width: int, repeats: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # one thread per process: no OpenMP oversubscription on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        record = sharded_figures(rank, world, width, repeats)
        if world == 1:
            record.update(cost_per_vector(width, repeats))
            record["activations"] = activations()
        Path(out, f"w{world}_r{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def run(world_sizes: list[int], width: int, repeats: int) -> dict[int, list[dict[str, Any]]]:
    from tests.fsdp_helpers import free_port

    results: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for world in world_sizes:
            mp.spawn(_worker, args=(world, free_port(), width, repeats, out), nprocs=world)
            results[world] = [json.loads(Path(out, f"w{world}_r{r}.json").read_text()) for r in range(world)]
    return results


def report(results: dict[int, list[dict[str, Any]]]) -> None:
    first = next(iter(results.values()))[0]
    full = NUM_RUNS * NUM_STEPS * first["global_params"] * 8
    print(f"MLP 128-w-w-10, {first['global_params']:,} parameters, {NUM_SAMPLES} analysis samples, ", end="")
    print(f"spectral_density({NUM_RUNS} runs x {NUM_STEPS} steps); unsharded basis {full / 2**20:.2f} MiB")
    print(
        "| processes | local params (max) | basis per rank (max, MiB) | vs unsharded | s / evaluation "
        "| FD HVP / sharded gradient | λ_max | trace |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for world, ranks in results.items():
        assert len({(r["top_eigenvalue"], r["trace"]) for r in ranks}) == 1, "ranks disagree"
        basis = max(r["basis_bytes"] for r in ranks)
        seconds = max(r["seconds_per_evaluation"] for r in ranks)
        per_gradient = seconds / ranks[0]["hvps_per_evaluation"] / max(r["sharded_gradient_s"] for r in ranks)
        print(
            f"| {world} | {max(r['local_params'] for r in ranks):,} | {basis / 2**20:.3f} | {basis / full:.3f} | "
            f"{seconds:.2f} | {per_gradient:.2f} | {ranks[0]['top_eigenvalue']:.6f} | {ranks[0]['trace']:.4f} |"
        )
    one = results.get(1, [{}])[0]
    if "gradient_s" in one:
        g = one["gradient_s"]
        print("\nCost of one HVP in gradients (1 process, same model and data):")
        for key in ("hvp_autograd_s", "hvp_func_s", "hvp_finite_difference_s"):
            print(
                f"  {key[4:-2]:>18}: {one[key] / g:.2f} gradients ({one[key] * 1e3:.1f} ms; gradient {g * 1e3:.1f} ms)"
            )
        print(f"  finite-difference product vs exact (float32): {one['fd_relative_error']:.2e} relative")
        print(f"  the operator's own measured error estimate: {one['fd_error_estimate']:.2e}")
        print("\nλ_max, sharded finite differences vs exact (digits MLP 64-32-10, 200 samples, float32):")
        for name, row in one["activations"].items():
            rel = abs(row["fd"] - row["exact"]) / abs(row["exact"])
            print(
                f"  {name:>5}: exact {row['exact']:.6f}  fd {row['fd']:.6f}  relative difference {rel:.2e}  "
                f"measured fd_rel_error {row['fd_error_estimate']:.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report(run([int(w) for w in args.world_sizes.split(",")], args.width, args.repeats))


if __name__ == "__main__":
    main()
