"""Benchmark: the functional core (HVP cost, trace, top eigenvalue, spectral density).

Models: the digits MLP (64-64-10, 4,810 parameters) and a small CNN with BatchNorm on 1x8x8
digits (374 parameters), both trained briefly with full-batch Adam (``tests/helpers.py``), in
eval mode. Analysis set: the seeded 10 % of the digits data (180 samples), as three equal
micro-batches of 60 (equal sizes, so that hessian-eigenthings' unweighted mean over batches is
the same size-weighted mean loss that every other library and the exact reference use).

1. **HVP cost** as a multiple of one gradient (``torch.autograd.grad`` of the same mean loss over
   the same analysis set) for each HVP path of :class:`HessianOperator`: ``backend="func"`` with
   1, 3 (SLQ default), 10 (trace default) and 30 vectors per ``matmat`` (amortised per vector),
   ``backend="autograd"`` with 1 and 10 (loop). Reference rows (no operator) split the cost into
   torch.func's own overhead, the vmap and the operator's Python. Target: amortised HVP <= 2x a
   gradient. A cProfile of the single-vector func path is printed when it is above 2x.
2. **Estimators versus PyHessian, hessian-eigenthings and curvlinops** (each when importable):
   trace, top eigenvalue and spectral density at equal HVP budgets, with errors against the
   exact float64 Hessian (``torch.func.hessian`` + ``eigvalsh``, cached in
   ``benchmarks/outputs/``), HVPs counted by wrapping each library's HVP entry point, and wall
   times measured in the same run (methods interleaved within each seed). Density error: the
   1-Wasserstein distance between a method's discrete spectral measure (Ritz nodes, weights
   averaged over runs) and the exact eigenvalues with weights 1/n.
3. **Summary** of the target checks and key ratios.

The comparison libraries are optional; install them in a separate virtual environment::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0 && /tmp/benchvenv/bin/pip install -e .
    /tmp/benchvenv/bin/pip install pyhessian hessian-eigenthings curvlinops-for-pytorch scikit-learn
    # (curvlinops drags in backpack/torchvision, which may upgrade torch: re-pin it with
    #  pip install --force-reinstall --no-deps torch==2.13.0 torchvision==0.28.0)

Usage::

    python benchmarks/bench_core.py            # full run (~5-10 min on 2 busy CPU cores)
    python benchmarks/bench_core.py --quick    # smoke run (< 2 min once the exact spectra are cached)
    /tmp/benchvenv/bin/python benchmarks/bench_core.py   # with the comparison libraries
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import importlib
import io
import math
import platform
import pstats
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import cached_exact_eigenvalues, interleaved_times, wasserstein1  # puts the repo root on sys.path
from torch import Tensor, nn

from lightning_hessian import HessianOperator, hessian_trace, spectral_density, top_eigenvalues
from tests.helpers import analysis_batches, exact_hessian, small_cnn, train, trained_digits_mlp

HVP_TARGET = 2.0  # amortised HVP <= 2 gradients
EIG_TARGET_REL, EIG_TARGET_HVPS = 1e-6, 40
DENSITY_STEPS = 80
EIGENTHINGS_DEFAULT_RUNS = 10  # hessian_eigenthings.spectral_density(num_runs=10, lanczos_steps=80)

# ----------------------------------------------------------------------------------------------
# optional comparison libraries
# ----------------------------------------------------------------------------------------------


@dataclass
class Library:
    name: str
    dist: str
    module: Any = None
    version: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.module is not None

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}" if self.ok else f"{self.name}: {self.error}"


def load_library(name: str, module: str, dist: str, disabled: bool) -> Library:
    lib = Library(name, dist)
    if disabled:
        lib.error = "skipped (--no-baselines)"
        return lib
    try:
        lib.module = importlib.import_module(module)
        try:
            lib.version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            lib.version = getattr(lib.module, "__version__", "?")
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed"
        lib.error = f"not installed ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    return lib


# ----------------------------------------------------------------------------------------------
# models, data, exact spectra
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    model: nn.Module
    data: list[tuple[Tensor, Tensor]]
    eigs: np.ndarray  # exact eigenvalues, ascending
    exact_seconds: float
    from_cache: bool

    @property
    def n(self) -> int:
        return int(self.eigs.size)

    @property
    def trace(self) -> float:
        return float(self.eigs.sum())

    @property
    def top(self) -> float:
        return float(self.eigs[-1])

    @property
    def num_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.data)


def build_cases(names: list[str]) -> list[Case]:
    cases = []
    for name in names:
        images = name == "cnn"
        model = train(small_cnn(0), steps=200, images=True) if images else trained_digits_mlp()
        model.eval()
        data = analysis_batches(fraction=0.1, seed=42, batch_size=60, images=images)
        start = time.perf_counter()
        eigs, from_cache = cached_exact_eigenvalues(
            name, model, data, lambda m=model, d=data: torch.linalg.eigvalsh(exact_hessian(m, d))
        )
        cases.append(
            Case(
                name="digits MLP" if name == "mlp" else "small CNN+BN",
                model=model,
                data=data,
                eigs=eigs.double().numpy(),
                exact_seconds=time.perf_counter() - start,
                from_cache=from_cache,
            )
        )
    return cases


def mean_loss(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> Tensor:
    total = sum(int(x.shape[0]) for x, _ in data)
    loss = torch.zeros(())
    for x, y in data:
        loss = loss + F.cross_entropy(model(x), y) * (x.shape[0] / total)
    return loss


# ----------------------------------------------------------------------------------------------
# 1. HVP cost
# ----------------------------------------------------------------------------------------------


@dataclass
class HvpRow:
    label: str
    vectors: int
    seconds: float  # per call
    reference: bool = False

    def per_vector(self) -> float:
        return self.seconds / self.vectors


def hvp_section(case: Case, rounds: int, profile: bool) -> tuple[float, list[HvpRow]]:
    model, data = case.model, case.data
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in params)
    gen = torch.Generator().manual_seed(0)
    op_func = HessianOperator(model, F.cross_entropy, data, backend="func")
    op_ag = HessianOperator(model, F.cross_entropy, data, backend="autograd")
    n = op_func.num_params
    mats = {k: torch.randn((n, k), generator=gen, dtype=torch.float64) for k in (1, 3, 10, 30)}
    tangent = tuple(torch.randn(p.shape, generator=gen) for p in params)
    whole = (torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))

    def grad() -> object:
        with torch.enable_grad():
            return torch.autograd.grad(mean_loss(model, data), params)

    def batch_loss_fn(x: Tensor, y: Tensor) -> Callable[[tuple[Tensor, ...]], Tensor]:
        return lambda ps: F.cross_entropy(
            torch.func.functional_call(model, dict(zip(names, ps, strict=False)), (x,)), y
        )

    def bare_double_backward() -> object:
        with torch.enable_grad():
            for x, y in data:
                g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
                out = torch.autograd.grad(g, params, grad_outputs=tangent)
        return out

    def bare_jvp() -> object:
        for x, y in data:
            _, out = torch.func.jvp(torch.func.grad(batch_loss_fn(x, y)), (primals,), (tangent,))
        return out

    def bare_vmap_jvp() -> object:
        stacked = tuple(t.unsqueeze(0) for t in tangent)
        for x, y in data:
            g = torch.func.grad(batch_loss_fn(x, y))
            out = torch.func.vmap(lambda t, g=g: torch.func.jvp(g, (primals,), (t,))[1])(stacked)
        return out

    def bare_jvp_whole() -> object:
        _, out = torch.func.jvp(torch.func.grad(batch_loss_fn(*whole)), (primals,), (tangent,))
        return out

    rows_spec: list[tuple[str, int, Callable[[], object], bool]] = [
        ("func, 1 vector", 1, lambda: op_func.matmat(mats[1]), False),
        ("func, vmap 3 (SLQ default)", 3, lambda: op_func.matmat(mats[3]), False),
        ("func, vmap 10 (trace default)", 10, lambda: op_func.matmat(mats[10]), False),
        ("func, vmap 30", 30, lambda: op_func.matmat(mats[30]), False),
        ("autograd, 1 vector", 1, lambda: op_ag.matmat(mats[1]), False),
        ("autograd, loop 10", 10, lambda: op_ag.matmat(mats[10]), False),
        ("ref: bare double backward, 1", 1, bare_double_backward, True),
        ("ref: bare func jvp(grad), 1", 1, bare_jvp, True),
        ("ref: bare func vmap(jvp), 1", 1, bare_vmap_jvp, True),
        ("ref: bare jvp, one 180-batch", 1, bare_jvp_whole, True),
    ]
    cases: dict[str, Callable[[], object]] = {"grad": grad}
    cases.update({label: fn for label, _, fn, _ in rows_spec})
    times = interleaved_times(cases, rounds=rounds)
    g = times["grad"]
    rows = [HvpRow(label, k, times[label], ref) for label, k, _, ref in rows_spec]

    print(
        f"\n[1] HVP cost, {case.name} (n={n:,}, {case.num_samples} samples in {len(data)} micro-batches), "
        f"median of {rounds} interleaved rounds"
    )
    print(f"    one gradient (autograd.grad of the mean loss over the analysis set): {g * 1e3:.3f} ms")
    header = f"    {'path':<32} {'vectors':>7} {'ms/call':>9} {'ms/HVP':>9} {'HVP/grad':>9}  {'<=2x?':<6}"
    print(header)
    print("    " + "-" * (len(header) - 4))
    for row in rows:
        ratio = row.per_vector() / g
        ok = "" if row.reference else ("met" if ratio <= HVP_TARGET else "NOT")
        print(
            f"    {row.label:<32} {row.vectors:>7d} {row.seconds * 1e3:>9.3f} {row.per_vector() * 1e3:>9.3f} "
            f"{ratio:>8.2f}x  {ok:<6}"
        )
    single = next(r for r in rows if r.label == "func, 1 vector")
    if profile and single.per_vector() / g > HVP_TARGET:
        profile_single(op_func, mats[1])
    return g, rows


def profile_single(op: HessianOperator, mat: Tensor, calls: int = 40) -> None:
    for _ in range(3):
        op.matmat(mat)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        op.matmat(mat)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt / calls  # type: ignore[attr-defined]
    raw = stats.stats  # type: ignore[attr-defined]

    def cum(fragment: str, func: str) -> float:
        return sum(v[3] for k, v in raw.items() if fragment in k[0] and k[2] == func) / calls

    parts = [
        ("whole matmat (under cProfile)", cum("lightning_hessian/operators/hessian.py", "matmat")),
        ("  _func_hvp (torch.func: vmap/jvp/grad)", cum("lightning_hessian/operators/hessian.py", "_func_hvp")),
        ("    functional_call forward (incl. loss)", cum("lightning_hessian/operators/hessian.py", "loss_and_aux")),
        (
            "    autograd engine (run_backward)",
            sum(v[3] for k, v in raw.items() if k[2] == "<method 'run_backward' of 'torch._C._EngineBase' objects>")
            / calls,
        ),
        (
            "    python decompositions (torch._refs/_prims/_decomp)",
            sum(
                v[2] for k, v in raw.items() if any(s in k[0] for s in ("torch/_refs", "torch/_prims", "torch/_decomp"))
            )
            / calls,
        ),
        ("    pytree flatten/unflatten", sum(v[2] for k, v in raw.items() if "torch/utils/_pytree" in k[0]) / calls),
        ("  _guarded (state save/restore)", cum("lightning_hessian/operators/_state.py", "preserved_model_state")),
    ]
    print(f"\n    cProfile of func, 1 vector ({calls} calls; {total * 1e3:.2f} ms/call under the profiler):")
    for label, seconds in parts:
        print(f"      {label:<52} {seconds * 1e3:8.3f} ms")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(10)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    print("      top 10 by own time:")
    for ln in lines[start : start + 11]:
        print("      " + ln.replace(str(torch.__path__[0]), "torch")[:150])


# ----------------------------------------------------------------------------------------------
# 2. estimators
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    estimate: float | None = None
    hvps: int = 0
    seconds: float = 0.0
    measure: tuple[np.ndarray, np.ndarray] | None = None  # density: nodes, weights
    error: str = ""


@dataclass
class Row:
    label: str
    results: list[Result] = field(default_factory=list)
    note: str = ""

    @property
    def failed(self) -> str:
        errs = [r.error for r in self.results if r.error]
        return errs[0] if errs else ""

    def good(self) -> list[Result]:
        return [r for r in self.results if not r.error]

    def hvps(self) -> float:
        good = self.good()
        return statistics.mean(r.hvps for r in good) if good else float("nan")

    def seconds(self) -> float:
        good = self.good()
        return statistics.median(r.seconds for r in good) if good else float("nan")


def timed(fn: Callable[[], Result]) -> Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        try:
            res = fn()
        except Exception as err:  # noqa: BLE001 - a failing baseline is reported, not fatal
            return Result(error=f"{type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}")
        res.seconds = time.perf_counter() - start
    return res


class Counter:
    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def torch_eig_shim() -> Iterator[None]:
    """PyHessian 0.1's density calls ``torch.eig``, which torch 2.x keeps only as a stub that
    raises; supply the old ``(values[:, (re, im)], vectors)`` contract via ``eigh`` meanwhile."""
    missing = object()
    saved = getattr(torch, "eig", missing)

    def eig(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    torch.eig = eig  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if saved is missing:
            del torch.eig  # type: ignore[attr-defined]
        else:
            torch.eig = saved  # type: ignore[attr-defined]


class Baselines:
    """Adapters that call each library as its own source documents, counting HVPs."""

    def __init__(self, case: Case, pyh: Library, eth: Library, cvl: Library) -> None:
        self.case, self.pyh, self.eth, self.cvl = case, pyh, eth, cvl
        self.params = [p for p in case.model.parameters() if p.requires_grad]

    # -- PyHessian: hessian(model, criterion, dataloader=..., cuda=False); HVPs through
    #    dataloader_hv_product (one forward + double backward per micro-batch per HVP).
    def pyhessian(self) -> tuple[Any, Counter]:
        hess = self.pyh.module.hessian(self.case.model, nn.CrossEntropyLoss(), dataloader=self.case.data, cuda=False)
        counter = Counter()
        inner = hess.dataloader_hv_product

        def counted(v: Any) -> Any:
            counter.count += 1
            return inner(v)

        hess.dataloader_hv_product = counted
        return hess, counter

    # -- hessian-eigenthings 1.0: HessianOperator(model, dataloader, loss_fn); matvec = one HVP.
    def eigenthings(self) -> tuple[Any, Counter]:
        mod = self.eth.module
        op = mod.HessianOperator(self.case.model, self.case.data, mod.supervised_loss(F.cross_entropy))
        counter = Counter()
        inner = op.matvec

        def counted(v: Tensor) -> Tensor:
            counter.count += 1
            return inner(v)

        op.matvec = counted
        return op, counter

    # -- curvlinops 3.x: HessianLinearOperator(model, loss_func, params, data); count columns.
    def curvlinops(self) -> tuple[Any, Counter]:
        op = self.cvl.module.HessianLinearOperator(
            self.case.model,
            nn.CrossEntropyLoss(),
            self.params,
            self.case.data,
            check_deterministic=False,
            num_data=self.case.num_samples,
        )
        counter = Counter()
        inner = op._matmat

        def counted(mats: list[Tensor]) -> list[Tensor]:
            counter.count += int(mats[0].shape[-1])
            return inner(mats)

        op._matmat = counted
        return op, counter


def run_rows(specs: list[tuple[str, Library | None, Callable[[int], Result], str]], seeds: int) -> list[Row]:
    """Run every method once per seed, interleaved (all methods for seed 0, then seed 1, ...)."""
    rows = [Row(label, note=note) for label, _, _, note in specs]
    for seed in range(seeds):
        for row, (_, lib, fn, _) in zip(rows, specs, strict=False):
            if lib is not None and not lib.ok:
                row.results.append(Result(error=lib.error))
                continue
            row.results.append(timed(lambda fn=fn, seed=seed: fn(seed)))
    return rows


def ours_op(case: Case, backend: str = "auto") -> HessianOperator:
    return HessianOperator(case.model, F.cross_entropy, case.data, backend=backend)  # type: ignore[arg-type]


def warm_up(case: Case, libs: dict[str, Library]) -> None:
    """One untimed product through every HVP path, so that no timed row pays first-call costs."""
    n = case.n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = ours_op(case)
        for k in (1, 3, 10):
            op.matmat(torch.ones((n, k), dtype=torch.float64))
        ours_op(case, "autograd").matmat(torch.ones((n, 3), dtype=torch.float64))
        base = Baselines(case, libs["pyhessian"], libs["eigenthings"], libs["curvlinops"])
        v = torch.ones(n)
        for lib, go in (
            (
                libs["pyhessian"],
                lambda: base.pyhessian()[0].dataloader_hv_product(
                    [
                        t.reshape(p.shape)
                        for t, p in zip(v.split([p.numel() for p in base.params]), base.params, strict=True)
                    ]
                ),
            ),
            (libs["eigenthings"], lambda: base.eigenthings()[0].matvec(v)),
            (libs["curvlinops"], lambda: base.curvlinops()[0] @ torch.ones((n, 3))),
        ):
            if lib.ok:
                with contextlib.suppress(Exception):  # failures show up in the timed rows
                    go()


def trace_section(case: Case, libs: dict[str, Library], budget: int, seeds: int) -> list[Row]:
    base = Baselines(case, libs["pyhessian"], libs["eigenthings"], libs["curvlinops"])

    def ours(method: str) -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            op = ours_op(case)
            est = hessian_trace(op, method=method, num_probes=budget, seed=seed)
            return Result(est.value, op.num_hvps)

        return fn

    def pyh(seed: int) -> Result:
        torch.manual_seed(seed)
        hess, c = base.pyhessian()
        samples = hess.trace(maxIter=budget, tol=0.0)  # tol=0: never stops early
        return Result(float(np.mean(samples)), c.count)

    def eth(method: str) -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            op, c = base.eigenthings()
            if method == "hutchinson":
                res = base.eth.module.hutchinson(op, num_samples=budget, seed=1000 + seed)
            else:
                res = base.eth.module.hutch_plus_plus(op, num_matvecs=budget, seed=1000 + seed)
            return Result(float(res.estimate), c.count)

        return fn

    def cvl(method: str) -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            torch.manual_seed(seed)
            op, c = base.curvlinops()
            est = (base.cvl.module.hutchinson_trace if method == "hutchinson" else base.cvl.module.hutchpp_trace)(
                op, budget
            )
            return Result(float(est), c.count)

        return fn

    specs = [
        ("ours hutchinson", None, ours("hutchinson"), ""),
        ("ours hutch++", None, ours("hutch++"), ""),
        ("PyHessian trace (hutchinson)", libs["pyhessian"], pyh, "tol=0"),
        ("eigenthings hutchinson", libs["eigenthings"], eth("hutchinson"), ""),
        ("eigenthings hutch_plus_plus", libs["eigenthings"], eth("hutch++"), ""),
        ("curvlinops hutchinson_trace", libs["curvlinops"], cvl("hutchinson"), ""),
        ("curvlinops hutchpp_trace", libs["curvlinops"], cvl("hutch++"), ""),
    ]
    rows = run_rows(specs, seeds)
    exact = case.trace
    t_ref = rows[0].seconds()
    print(
        f"\n[2a] trace, {case.name}: exact tr(H) = {exact:.6g}; budget {budget} HVPs; {seeds} seed(s); "
        "|rel err| = RMS over seeds; time = median; t/ours = time / ours hutchinson"
    )
    header = (
        f"     {'method':<30} {'HVPs':>6} {'mean est':>11} {'|rel err|':>10} {'time ms':>9} {'ms/HVP':>7} {'t/ours':>7}"
    )
    print(header)
    print("     " + "-" * (len(header) - 5))
    for row in rows:
        if not row.good():
            print(f"     {row.label:<30} {row.failed}")
            continue
        ests = [r.estimate for r in row.good()]
        rms = math.sqrt(statistics.mean(((e - exact) / exact) ** 2 for e in ests))
        print(
            f"     {row.label:<30} {row.hvps():>6.0f} {statistics.mean(ests):>11.5g} {rms:>10.2e} "
            f"{row.seconds() * 1e3:>9.1f} {row.seconds() * 1e3 / max(row.hvps(), 1):>7.2f} "
            f"{row.seconds() / t_ref:>6.2f}x"
        )
    return rows


def eigen_section(case: Case, libs: dict[str, Library], seeds: int, max_power: int) -> tuple[list[Row], int]:
    base = Baselines(case, libs["pyhessian"], libs["eigenthings"], libs["curvlinops"])
    # our HVP count at the default tolerance fixes the equal budget for the baselines
    probe_op = ours_op(case)
    budget = top_eigenvalues(probe_op, k=1, seed=0).num_hvps

    def ours(seed: int, backend: str = "auto") -> Result:
        op = ours_op(case, backend)
        res = top_eigenvalues(op, k=1, seed=seed)
        return Result(float(res.values[0]), op.num_hvps)

    model64 = copy.deepcopy(case.model).double()
    data64 = [(x.double(), y) for x, y in case.data]

    def ours64(seed: int) -> Result:
        op = HessianOperator(model64, F.cross_entropy, data64)
        res = top_eigenvalues(op, k=1, seed=seed)
        return Result(float(res.values[0]), op.num_hvps)

    def ours_power(seed: int) -> Result:
        op = ours_op(case)
        res = top_eigenvalues(op, k=1, method="power", tol=1e-6, max_iter=max_power, seed=seed)
        return Result(float(res.values[0]), op.num_hvps)

    def pyh(max_iter: int, tol: float) -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            torch.manual_seed(seed)
            hess, c = base.pyhessian()
            values, _ = hess.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            return Result(float(values[0]), c.count)

        return fn

    def eth(seed: int) -> Result:
        op, c = base.eigenthings()
        res = base.eth.module.lanczos(op, k=1, max_iter=budget, which="LA", reorthogonalize=True, seed=1000 + seed)
        return Result(float(res.eigenvalues[0]), c.count)

    def cvl(seed: int) -> Result:
        from scipy.sparse.linalg import eigsh

        op, c = base.curvlinops()
        v0 = np.random.default_rng(seed).standard_normal(case.n)
        (value,) = eigsh(op.to_scipy(), k=1, which="LA", tol=EIG_TARGET_REL, v0=v0, return_eigenvectors=False)
        return Result(float(value), c.count)

    specs = [
        ("ours lanczos (default tol 1e-6)", None, ours, ""),
        ("ours lanczos, model in float64", None, ours64, "shows the float32 floor"),
        ("ours lanczos, backend='autograd'", None, lambda seed: ours(seed, "autograd"), "what-if: double backward"),
        ("ours power, tol 1e-6", None, ours_power, f"max {max_power}"),
        (f"PyHessian power, {budget} HVPs", libs["pyhessian"], pyh(budget, 0.0), "equal budget"),
        ("PyHessian power, tol 1e-6", libs["pyhessian"], pyh(max_power, EIG_TARGET_REL), f"max {max_power}"),
        (f"eigenthings lanczos, {budget} steps", libs["eigenthings"], eth, "equal budget, reorth"),
        ("curvlinops + scipy eigsh, tol 1e-6", libs["curvlinops"], cvl, "ARPACK, ncv=20"),
    ]
    rows = run_rows(specs, seeds)
    exact = case.top
    t_ref = rows[0].seconds()
    print(
        f"\n[2b] top eigenvalue, {case.name}: exact lambda_max = {exact:.9g} (next {case.eigs[-2]:.6g}); "
        f"{seeds} seed(s); |rel err| = max over seeds; time = median"
    )
    header = f"     {'method':<36} {'HVPs':>6} {'estimate':>14} {'|rel err|':>10} {'time ms':>9} {'t/ours':>7}  note"
    print(header)
    print("     " + "-" * (len(header) - 5))
    for row in rows:
        if not row.good():
            print(f"     {row.label:<36} {row.failed}")
            continue
        err = max(abs(r.estimate - exact) / abs(exact) for r in row.good())
        print(
            f"     {row.label:<36} {row.hvps():>6.1f} {row.good()[0].estimate:>14.9g} {err:>10.2e} "
            f"{row.seconds() * 1e3:>9.1f} {row.seconds() / t_ref:>6.2f}x  {row.note}"
        )
    return rows, budget


def density_section(case: Case, libs: dict[str, Library], seeds: int, runs: int) -> tuple[list[Row], list[float]]:
    base = Baselines(case, libs["pyhessian"], libs["eigenthings"], libs["curvlinops"])
    steps = DENSITY_STEPS

    def ours(deflate: bool, backend: str = "auto") -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            op = ours_op(case, backend)
            sd = spectral_density(op, num_runs=runs, num_steps=steps, seed=seed, deflate=deflate)
            nodes, weights = sd.measure()
            return Result(None, op.num_hvps, measure=(nodes.numpy(), weights.numpy()))

        return fn

    def eth(num_runs: int) -> Callable[[int], Result]:
        def fn(seed: int) -> Result:
            op, c = base.eigenthings()
            res = base.eth.module.spectral_density(op, num_runs=num_runs, lanczos_steps=steps, seed=1000 * (seed + 1))
            nodes = res.raw_eigenvalues.double().numpy().reshape(-1)
            weights = res.raw_weights.double().numpy().reshape(-1) / num_runs
            return Result(None, c.count, measure=(nodes, weights))

        return fn

    def pyh(seed: int) -> Result:
        torch.manual_seed(seed)
        hess, c = base.pyhessian()
        with torch_eig_shim():
            nodes, weights = hess.density(iter=steps, n_v=runs)
        nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)
        weights = np.asarray(weights, dtype=np.float64).reshape(-1) / runs
        return Result(None, c.count, measure=(nodes, weights))

    def cvl(seed: int) -> Result:
        from curvlinops.papyan2020traces.spectrum import fast_lanczos

        torch.manual_seed(seed)
        op, c = base.curvlinops()
        all_nodes, all_weights = [], []
        for _ in range(runs):
            evals, evecs = fast_lanczos(op, steps)
            all_nodes.append(evals.double().numpy())
            all_weights.append((evecs[0, :] ** 2).double().numpy() / runs)
        return Result(None, c.count, measure=(np.concatenate(all_nodes), np.concatenate(all_weights)))

    specs = [
        (f"ours spectral_density ({runs}x{steps}, deflate)", None, ours(True), "default"),
        (f"ours, deflate=False ({runs}x{steps})", None, ours(False), ""),
        (
            f"ours ({runs}x{steps}, deflate), backend='autograd'",
            None,
            ours(True, "autograd"),
            "what-if: double backward",
        ),
        (
            f"eigenthings spectral_density ({EIGENTHINGS_DEFAULT_RUNS}x{steps})",
            libs["eigenthings"],
            eth(EIGENTHINGS_DEFAULT_RUNS),
            "its default",
        ),
        (f"eigenthings spectral_density ({runs}x{steps})", libs["eigenthings"], eth(runs), "equal budget"),
        (f"PyHessian density ({runs}x{steps})", libs["pyhessian"], pyh, "equal budget; torch.eig shim"),
        (f"curvlinops fast_lanczos ({runs}x{steps})", libs["curvlinops"], cvl, "equal budget; no reorth"),
    ]
    rows = run_rows(specs, seeds)
    exact = case.eigs
    ref = rows[3] if rows[3].good() else None

    def w1(row: Row) -> float:
        return statistics.mean(wasserstein1(r.measure[0], r.measure[1], exact, None) for r in row.good() if r.measure)

    w_ref = w1(ref) if ref is not None else float("nan")
    t_ref = ref.seconds() if ref is not None else float("nan")
    h_ref = ref.hvps() if ref is not None else float("nan")
    print(
        f"\n[2c] spectral density, {case.name}: W1 to the exact spectrum (n={case.n:,} eigenvalues in "
        f"[{exact[0]:.4g}, {exact[-1]:.4g}]); {seeds} seed(s); W1 = mean over seeds; time = median; "
        "'/eth' = relative to eigenthings' default (10x80)"
    )
    header = (
        f"     {'method':<42} {'HVPs':>6} {'W1':>10} {'W1/eth':>7} {'HVPs/eth':>8} {'time ms':>9} "
        f"{'ms/HVP':>7} {'t/eth':>6}  note"
    )
    print(header)
    print("     " + "-" * (len(header) - 5))
    for row in rows:
        if not row.good():
            print(f"     {row.label:<42} {row.failed}")
            continue
        w = w1(row)
        print(
            f"     {row.label:<42} {row.hvps():>6.0f} {w:>10.3e} {w / w_ref:>7.3f} {row.hvps() / h_ref:>8.3f} "
            f"{row.seconds() * 1e3:>9.1f} {row.seconds() * 1e3 / max(row.hvps(), 1):>7.2f} "
            f"{row.seconds() / t_ref:>6.3f}  {row.note}"
        )
    return rows, [w1(row) if row.good() else float("nan") for row in rows]


# ----------------------------------------------------------------------------------------------
# 3. the default pipeline: top eigenvalue + trace (100 probes) + density, ours vs PyHessian
# ----------------------------------------------------------------------------------------------

PIPELINE_TRACE_PROBES = 100
#: Seeds of the trace-only repetitions behind the pipeline's trace error (one seed's error is noise).
PIPELINE_TRACE_SEEDS = 20


@dataclass
class PipelineRun:
    """One pipeline run: HVPs per estimate, wall time, and the three estimates."""

    hvps: dict[str, int]
    seconds: float
    top: float
    trace: float
    measure: tuple[np.ndarray, np.ndarray]


def pipeline_ours(case: Case, seed: int, session: bool = False) -> PipelineRun:
    """``top_eigenvalues(k=1)``, ``hessian_trace(num_probes=100)``, ``spectral_density()``, defaults.

    ``session=True``: the three inside one ``op.session()`` (one preparation for all products),
    where the operator has sessions.
    """
    start = time.perf_counter()
    op = ours_op(case)
    scope = op.session() if session else contextlib.nullcontext()  # type: ignore[attr-defined]
    with scope:
        top = top_eigenvalues(op, k=1, seed=seed)
        after_top = op.num_hvps
        tr = hessian_trace(op, num_probes=PIPELINE_TRACE_PROBES, seed=seed)
        after_trace = op.num_hvps
        sd = spectral_density(op, seed=seed)
    seconds = time.perf_counter() - start
    nodes, weights = sd.measure()
    hvps = {
        "top": after_top,
        "trace": after_trace - after_top,
        "density": op.num_hvps - after_trace,
        "reported": top.num_hvps + tr.num_hvps + sd.num_hvps,
    }
    return PipelineRun(hvps, seconds, float(top.values[0]), tr.value, (nodes.numpy(), weights.numpy()))


def pipeline_pyhessian(case: Case, base: Baselines, seed: int) -> PipelineRun:
    """PyHessian 0.1 with its defaults: ``eigenvalues()``, ``trace()``, ``density()``."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    hess, c = base.pyhessian()
    values, _ = hess.eigenvalues()
    after_top = c.count
    trace = float(np.mean(hess.trace()))
    after_trace = c.count
    with torch_eig_shim():
        nodes, weights = hess.density()
    seconds = time.perf_counter() - start
    runs = len(nodes)
    measure = (
        np.asarray(nodes, dtype=np.float64).reshape(-1),
        np.asarray(weights, dtype=np.float64).reshape(-1) / runs,
    )
    hvps = {"top": after_top, "trace": after_trace - after_top, "density": c.count - after_trace}
    hvps["reported"] = sum(hvps.values())
    return PipelineRun(hvps, seconds, float(values[0]), trace, measure)


def pipeline_section(case: Case, libs: dict[str, Library], seeds: int) -> list[str]:
    """The default pipeline against PyHessian's on the same model, data and loss (interleaved per seed)."""
    base = Baselines(case, libs["pyhessian"], libs["eigenthings"], libs["curvlinops"])
    sessions = hasattr(ours_op(case), "session")
    runs: dict[str, list[PipelineRun]] = {"ours": [], "PyHessian": []}
    if sessions:
        runs["ours+sess"] = []
    for seed in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs["ours"].append(pipeline_ours(case, seed))
            if sessions:
                runs["ours+sess"].append(pipeline_ours(case, seed, session=True))
            if libs["pyhessian"].ok:
                runs["PyHessian"].append(pipeline_pyhessian(case, base, seed))
    # the trace error needs many seeds: the trace parts of both pipelines again, alone
    trace_runs: dict[str, list[float]] = {"ours": [], "PyHessian": []}
    trace_op = ours_op(case)
    for seed in range(PIPELINE_TRACE_SEEDS):
        trace_runs["ours"].append(hessian_trace(trace_op, num_probes=PIPELINE_TRACE_PROBES, seed=seed).value)
        if libs["pyhessian"].ok:
            torch.manual_seed(seed)
            trace_runs["PyHessian"].append(float(np.mean(base.pyhessian()[0].trace())))
    trace_runs["ours+sess"] = trace_runs["ours"]
    print(
        f"\n[3] pipeline, {case.name}: top_eigenvalues(k=1) + hessian_trace(num_probes={PIPELINE_TRACE_PROBES}) "
        f"+ spectral_density(), all defaults; PyHessian eigenvalues() + trace() + density(), its defaults; "
        f"{seeds} seed(s); errors against the exact float64 spectrum (top: max over seeds, W1: mean; trace: RMS over "
        f"{PIPELINE_TRACE_SEEDS} seeds of the trace calls alone)"
    )
    header = (
        f"     {'pipeline':<10} {'HVPs':>6} {'top':>5} {'trace':>6} {'dens.':>6} {'time s':>8} {'t/PyH':>6} "
        f"{'top rel err':>12} {'trace rel err':>14} {'W1':>10}"
    )
    print(header)
    print("     " + "-" * (len(header) - 5))
    stats: dict[str, tuple[float, float, float, float, float]] = {}
    for name, group in runs.items():
        if not group:
            print(f"     {name:<10} {libs['pyhessian'].error}")
            continue
        hvps = statistics.mean(sum(r.hvps[k] for k in ("top", "trace", "density")) for r in group)
        seconds = statistics.median(r.seconds for r in group)
        top_err = max(abs(r.top - case.top) / abs(case.top) for r in group)
        trace_err = math.sqrt(statistics.mean(((t - case.trace) / case.trace) ** 2 for t in trace_runs[name]))
        w1 = statistics.mean(wasserstein1(r.measure[0], r.measure[1], case.eigs, None) for r in group)
        stats[name] = (hvps, seconds, top_err, trace_err, w1)
        parts = [statistics.mean(r.hvps[k] for r in group) for k in ("top", "trace", "density")]
        ref = statistics.median(r.seconds for r in runs["PyHessian"]) if runs["PyHessian"] else float("nan")
        print(
            f"     {name:<10} {hvps:>6.0f} {parts[0]:>5.0f} {parts[1]:>6.0f} {parts[2]:>6.0f} {seconds:>8.2f} "
            f"{seconds / ref:>5.2f}x {top_err:>12.2e} {trace_err:>14.2e} {w1:>10.3e}"
        )
    if "PyHessian" not in stats:
        return [
            f"[PIPELINE {case.name}] PyHessian unavailable; ours {stats['ours'][0]:.0f} HVPs, {stats['ours'][1]:.2f} s"
        ]
    lines = []
    p = stats["PyHessian"]
    for name in [k for k in stats if k != "PyHessian"]:
        o = stats[name]
        met = o[1] < p[1] and all(a <= b for a, b in zip(o[2:], p[2:], strict=True))
        lines.append(
            f"[PIPELINE {case.name}, {name}] faster than PyHessian at equal-or-better accuracy: "
            f"{'MET' if met else 'NOT MET'} (HVPs {o[0]:.0f} vs {p[0]:.0f}; time {o[1]:.2f} vs {p[1]:.2f} s = "
            f"{o[1] / p[1]:.2f}x; top {o[2]:.1e} vs {p[2]:.1e}; trace {o[3]:.1e} vs {p[3]:.1e}; "
            f"W1 {o[4]:.2e} vs {p[4]:.2e})"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (fewer rounds and seeds)")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds for [1] (default 9, quick 3)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per estimator (default 5/3/3, quick 2/1/1)")
    parser.add_argument("--trace-budget", type=int, default=30, help="HVPs per trace estimate (divisible by 3)")
    parser.add_argument("--density-runs", type=int, default=3, help="our SLQ runs (default: the library default 3)")
    parser.add_argument("--no-baselines", action="store_true", help="do not import the comparison libraries")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile of the single-vector HVP")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: hvp,trace,eigen,density,pipeline")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 9)
    trace_seeds = args.seeds or (2 if args.quick else 5)
    eig_seeds = args.seeds or (1 if args.quick else 3)
    density_seeds = args.seeds or (1 if args.quick else 3)
    max_power = 300 if args.quick else 1000
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()

    libs = {
        "pyhessian": load_library("PyHessian", "pyhessian", "pyhessian", args.no_baselines),
        "eigenthings": load_library(
            "hessian-eigenthings", "hessian_eigenthings", "hessian-eigenthings", args.no_baselines
        ),
        "curvlinops": load_library("curvlinops", "curvlinops", "curvlinops-for-pytorch", args.no_baselines),
    }
    print(
        f"bench_core  {datetime.datetime.now().isoformat(timespec='seconds')}  "
        f"python {platform.python_version()}  torch {torch.__version__}  "
        f"{torch.get_num_threads()} thread(s)  {'quick' if args.quick else 'full'} run"
    )
    print("baselines: " + "; ".join(lib.label for lib in libs.values()))

    cases = build_cases([m.strip() for m in args.models.split(",") if m.strip()])
    for case in cases:
        print(
            f"model {case.name}: n={case.n:,}, exact spectrum {'from cache' if case.from_cache else 'computed'} "
            f"({case.exact_seconds:.1f} s), tr={case.trace:.6g}, lambda_max={case.top:.6g}, "
            f"lambda_min={case.eigs[0]:.4g}"
        )

    summary: list[str] = []
    for case in cases:
        if "hvp" not in skip:
            g, rows = hvp_section(case, rounds, profile=not args.no_profile and case.name == "digits MLP")
            by = {r.label: r.per_vector() / g for r in rows}
            best = min((r for r in rows if not r.reference), key=lambda r: r.per_vector())
            summary.append(
                f"[HVP {case.name}] amortised HVP <= 2x grad: "
                f"{'MET' if best.per_vector() / g <= HVP_TARGET else 'NOT MET'} "
                f"(best: {best.label} {best.per_vector() / g:.2f}x); func x1 {by['func, 1 vector']:.1f}x, "
                f"x3 {by['func, vmap 3 (SLQ default)']:.2f}x, x10 {by['func, vmap 10 (trace default)']:.2f}x, "
                f"x30 {by['func, vmap 30']:.2f}x; autograd x1 {by['autograd, 1 vector']:.2f}x, "
                f"x10 {by['autograd, loop 10']:.2f}x; bare double-backward {by['ref: bare double backward, 1']:.2f}x, "
                f"bare func jvp {by['ref: bare func jvp(grad), 1']:.2f}x (grad {g * 1e3:.2f} ms)"
            )
        warm_up(case, libs)
        if "trace" not in skip:
            rows = trace_section(case, libs, args.trace_budget, trace_seeds)

            def rms(row: Row, exact: float = case.trace) -> float:
                return (
                    math.sqrt(statistics.mean(((r.estimate - exact) / exact) ** 2 for r in row.good()))
                    if row.good()
                    else float("nan")
                )

            parts = [
                f"{r.label}: rel err {rms(r):.2e}, t/ours {r.seconds() / rows[0].seconds():.2f}x"
                for r in rows
                if r.good()
            ]
            summary.append(f"[TRACE {case.name}, {args.trace_budget} HVPs] " + "; ".join(parts))
        if "eigen" not in skip:
            rows, _budget = eigen_section(case, libs, eig_seeds, max_power)
            ours = rows[0]
            err = max(abs(r.estimate - case.top) / abs(case.top) for r in ours.good())
            met = err <= EIG_TARGET_REL and ours.hvps() <= EIG_TARGET_HVPS
            others = [
                f"{r.label}: {r.hvps():.0f} HVPs rel err "
                f"{max(abs(x.estimate - case.top) / abs(case.top) for x in r.good()):.1e} "
                f"t/ours {r.seconds() / ours.seconds():.2f}x"
                for r in rows[1:]
                if r.good()
            ]
            summary.append(
                f"[EIG {case.name}] lambda_max to 1e-6 in <= 40 HVPs: {'MET' if met else 'NOT MET'} "
                f"({ours.hvps():.0f} HVPs, max rel err {err:.1e}); " + "; ".join(others)
            )
        if "density" in skip or (args.quick and case.name != "digits MLP"):
            summary.append(
                f"[DENSITY {case.name}] skipped" + (" (--quick runs the density on the MLP only)" if args.quick else "")
            )
        else:
            rows, w1s = density_section(case, libs, density_seeds, args.density_runs)
            ours, what_if, ref = rows[0], rows[2], rows[3]
            w_ours, w_nd, w_ref = w1s[0], w1s[1], w1s[3]
            if ref.good():
                h, t = ours.hvps() / ref.hvps(), ours.seconds() / ref.seconds()
                met = w_ours <= w_ref and h <= 1 / 3 + 1e-9 and t <= 1 / 3
                summary.append(
                    f"[DENSITY {case.name}] W1 <= eigenthings 10x80 with <= 1/3 HVPs and time: "
                    f"{'MET' if met else 'NOT MET'} "
                    f"(W1 ours {w_ours:.3e} vs {w_ref:.3e} = {w_ours / w_ref:.3f}x; deflate=False {w_nd:.3e} = "
                    f"{w_nd / w_ref:.3f}x; "
                    f"HVPs {ours.hvps():.0f}/{ref.hvps():.0f} = {h:.3f}; time "
                    f"{ours.seconds():.2f}/{ref.seconds():.2f} s = {t:.3f}; "
                    f"what-if backend='autograd': time {what_if.seconds():.2f} s = "
                    f"{what_if.seconds() / ref.seconds():.3f})"
                )
                others = [
                    f"{r.label}: W1 {w:.3e} ({w / w_ours:.2f}x ours), t/ours {r.seconds() / ours.seconds():.2f}x"
                    for r, w in zip(rows[4:], w1s[4:], strict=True)
                    if r.good()
                ]
                if others:
                    summary.append(f"[DENSITY {case.name}, equal budget] " + "; ".join(others))
            else:
                summary.append(
                    f"[DENSITY {case.name}] eigenthings unavailable ({ref.failed}); ours W1 {w_ours:.3e}, "
                    f"deflate=False {w_nd:.3e}, {ours.hvps():.0f} HVPs in {ours.seconds():.2f} s"
                )

        if "pipeline" not in skip:
            summary.extend(pipeline_section(case, libs, eig_seeds))

    print("\n" + "=" * 100)
    print(
        f"SUMMARY  bench_core {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print("baselines: " + "; ".join(lib.label for lib in libs.values()))
    for line in summary:
        print("- " + line)
    print("=" * 100)


if __name__ == "__main__":
    main()
