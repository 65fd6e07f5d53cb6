"""Estimators on row-sharded vectors (2 gloo processes) equal the single-process ones.

A toy sharded operator: each process holds a contiguous slice of the rows of every vector (uneven
sizes, 50 and 51), its :class:`VectorSpace` sums local partial inner products with
``all_reduce`` and draws the global probes' local rows, and ``matmat`` gathers the full vectors.
Every estimator must then give the single-process result (same seeds, same global probes), and
the processes must call the collectives alike (a mismatch deadlocks: the run has a timeout).
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from lightning_hessian import MatrixOperator, hessian_trace, spectral_density, top_eigenvalues
from lightning_hessian._utils.random import ProbeKind, draw_probes
from tests.spectra import hessian_like_eigenvalues, with_eigenvectors

N = 101
SPLIT = 50


def _matrix() -> Tensor:
    lam = hessian_like_eigenvalues(N, seed=7, outliers=(10.0, 10.0, 6.0, 3.0))
    return with_eigenvectors(lam, "haar", seed=7)


class RowShardedSpace:
    """Rows ``lo:hi`` of every vector on this process; sums over processes by ``all_reduce``."""

    def __init__(self, lo: int, hi: int, n: int) -> None:
        self.lo, self.hi, self.n = lo, hi, n

    def all_reduce(self, values: Tensor) -> Tensor:
        out = values.to(torch.float64).clone()
        dist.all_reduce(out)
        return out

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.all_reduce(a.to(torch.float64).t() @ b.to(torch.float64))

    def column_dots(self, a: Tensor, b: Tensor) -> Tensor:
        return self.all_reduce((a.to(torch.float64) * b.to(torch.float64)).sum(dim=0))

    def probes(
        self,
        num_params: int,
        num_probes: int,
        kind: ProbeKind,
        generator: torch.Generator,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        assert num_params == self.hi - self.lo
        full = draw_probes(self.n, num_probes, kind, generator, device=device, dtype=dtype)
        return full[self.lo : self.hi].contiguous()


class RowShardedOperator:
    """``A`` acting on row-sharded vectors: gathers the full input, returns this process's rows."""

    def __init__(self, matrix: Tensor, lo: int, hi: int) -> None:
        self.rows = matrix[lo:hi]
        self.vector_space = RowShardedSpace(lo, hi, matrix.shape[0])
        self.num_params = hi - lo
        self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.num_hvps = 0
        self._sizes = [SPLIT, matrix.shape[0] - SPLIT]

    def matmat(self, x: Tensor) -> Tensor:
        width = max(self._sizes)  # gloo gathers equal sizes: pad, then trim
        padded = torch.zeros((width, x.shape[1]), dtype=x.dtype)
        padded[: x.shape[0]] = x
        parts = [torch.zeros_like(padded) for _ in self._sizes]
        dist.all_gather(parts, padded)
        self.num_hvps += x.shape[1]
        full = torch.cat([part[:size] for part, size in zip(parts, self._sizes, strict=True)])
        return self.rows.to(x.dtype) @ full

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v.unsqueeze(1)).squeeze(1)


def _estimates(op: object) -> dict[str, Tensor]:
    eig = top_eigenvalues(op, k=3, seed=1)  # type: ignore[arg-type]
    low = top_eigenvalues(op, k=1, which="smallest", seed=2)  # type: ignore[arg-type]
    power = top_eigenvalues(op, k=1, method="power", seed=3)  # type: ignore[arg-type]
    tr = hessian_trace(op, num_probes=20, seed=4)  # type: ignore[arg-type]
    hpp = hessian_trace(op, method="hutch++", num_probes=30, seed=5)  # type: ignore[arg-type]
    sd = spectral_density(op, num_runs=3, num_steps=25, seed=6)  # type: ignore[arg-type]
    return {
        "eig": eig.values,
        "eig_conv": torch.tensor(float(eig.converged)),
        "eig_hvps": torch.tensor(float(eig.num_hvps)),
        "low": low.values,
        "power": power.values,
        "trace": torch.tensor(tr.value),
        "hutchpp": torch.tensor(hpp.value),
        "nodes": sd.nodes,
        "weights": sd.measure_weights,
        "loo": sd.deflated_trace_samples,
        "num_params": torch.tensor(float(sd.num_params)),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, N)
    results = _estimates(RowShardedOperator(_matrix(), lo, hi))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_estimators_on_row_sharded_vectors_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "init")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, init_file, tmp)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
            assert p.exitcode == 0, "a sharded worker failed or hung (collectives out of step?)"
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    single = _estimates(MatrixOperator(_matrix()))
    for key, want in single.items():
        for rank in ranks:
            got = rank[key]
            assert got.shape == want.shape, key
            assert torch.allclose(got, want, rtol=1e-7, atol=1e-9), (key, got, want)
    assert float(single["eig_conv"]) == 1.0
    assert torch.allclose(single["eig"], torch.tensor([10.0, 10.0, 6.0], dtype=torch.float64), atol=1e-5)
