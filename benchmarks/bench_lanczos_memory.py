"""Benchmark: peak working memory of ``spectral_density`` beyond its stored basis (issue 11, item 2).

Target: peak memory beyond the basis <= 2.5 x ``num_params x num_runs x 8`` bytes ("units"), at
unchanged accuracy. Measured on CPU with a cheap operator of large dimension: a diagonal operator
(``matmat(V) = d[:, None] * V`` in ``V``'s dtype; ``d`` is held in float64 and float32, both
allocated before the baseline) with a known spectrum (bulk uniform on [0, 1], outliers 5 and 10).

Each configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large
allocation is its own mapping, returned to the OS when freed, so RSS follows the live tensors) and
``torch.set_num_threads(1)``. The child builds the operator, runs a tiny warm-up call (lazy
initialisation is not counted), reads ``VmRSS`` (baseline) from ``/proc/self/status``, runs
``spectral_density``, then reads the high-water mark ``VmHWM``. Working memory =
``VmHWM - baseline - basis`` with ``basis = num_runs x num_steps x n x itemsize`` (0 without a
stored basis). The operator's own output ``n x num_runs`` in the input's dtype (1 unit in
float64, 0.5 in float32) is part of every product and is listed separately. A tiny-``n`` run
measures the fixed overhead (MiB). Accuracy: the top Ritz value of the float32 basis against the
float64 one (target: equal within 1e-5 relative) and against the exact top eigenvalue 10.

Run: ``python benchmarks/bench_lanczos_memory.py`` (about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_LARGE = 1 << 22  # 4,194,304 parameters
N_TINY = 1000
NUM_RUNS = 3
NUM_STEPS = 10
TARGET = 2.5


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(n: int, dtype_name: str, store_basis: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from lightning_hessian import spectral_density

    torch.set_num_threads(1)

    class DiagonalOperator:
        """``diag(d)`` behind the CurvatureOperator protocol; products in the input's dtype."""

        def __init__(self, d: torch.Tensor) -> None:
            self.d = {torch.float64: d, torch.float32: d.to(torch.float32)}
            self._num_hvps = 0

        @property
        def num_params(self) -> int:
            return self.d[torch.float64].numel()

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        @property
        def num_hvps(self) -> int:
            return self._num_hvps

        def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
            self._num_hvps += matrix.shape[1]
            return self.d[matrix.dtype][:, None] * matrix

    def make(size: int) -> DiagonalOperator:
        d = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
        d[-1], d[-2] = 10.0, 5.0
        return DiagonalOperator(d)

    dtype = getattr(torch, dtype_name)
    kwargs = dict(
        num_runs=NUM_RUNS, num_steps=NUM_STEPS, basis_dtype=dtype, basis_device="cpu", store_basis=store_basis
    )
    spectral_density(make(64), **kwargs)  # warm-up: lazy initialisation is not working memory
    op = make(n)
    rss0, hwm0 = _status_kib("VmRSS"), _status_kib("VmHWM")
    sd = spectral_density(op, **kwargs)
    hwm1 = _status_kib("VmHWM")
    return {
        "rss0": rss0 * 1024,
        "hwm0": hwm0 * 1024,
        "hwm1": hwm1 * 1024,
        "itemsize": torch.empty((), dtype=dtype).element_size(),
        "top": sd.max_eigenvalue,
        "num_deflated": sd.num_deflated,
    }


def _run(n: int, dtype_name: str, store_basis: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([n, dtype_name, store_basis])],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    print(f"torch {torch.__version__}; n = {N_LARGE:,}, {NUM_RUNS} runs x {NUM_STEPS} steps, basis on cpu")
    unit = N_LARGE * NUM_RUNS * 8
    tiny = _run(N_TINY, "float64", True)
    fixed = tiny["hwm1"] - tiny["rss0"]
    print(f"fixed overhead (n = {N_TINY}, float64, stored basis): {fixed / 2**20:.1f} MiB")
    rows, tops = [], {}
    header = (
        "| basis dtype | store_basis | basis MiB | peak - baseline MiB | beyond basis / unit "
        "| of which product output | meets <= 2.5 |"
    )
    print(header)
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype_name in ("float64", "float32"):
        for store in (True, False):
            res = _run(N_LARGE, dtype_name, store)
            basis = NUM_RUNS * NUM_STEPS * N_LARGE * res["itemsize"] if store else 0
            peak = res["hwm1"] - res["rss0"]
            if res["hwm0"] > res["rss0"] + peak:
                print(f"warning: the pre-run high-water mark hides the run's peak ({dtype_name}, {store})")
            ratio = (peak - basis) / unit
            product = res["itemsize"] / 8
            tops[(dtype_name, store)] = res["top"]
            row = (
                f"| {dtype_name} | {store} | {basis / 2**20:.0f} | {peak / 2**20:.0f} | {ratio:.2f} | "
                f"{product:.1f} | {'yes' if ratio <= TARGET else 'no'} |"
            )
            rows.append(row)
            print(row, flush=True)
    ref = tops[("float64", True)]
    rel = abs(tops[("float32", True)] - ref) / abs(ref)
    print(f"unit = n x runs x 8 bytes = {unit / 2**20:.0f} MiB")
    print(
        "top Ritz value (exact 10): "
        + ", ".join(f"{d} basis={s}: {v:.9f}" for (d, s), v in tops.items())
        + f"; float32 vs float64 stored basis: {rel:.2e} relative ({'<=' if rel <= 1e-5 else '>'} 1e-5)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        n, dtype_name, store_basis = json.loads(sys.argv[2])
        print(json.dumps(_child(n, dtype_name, store_basis)))
    else:
        main()
