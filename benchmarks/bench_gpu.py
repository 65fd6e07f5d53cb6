"""HVP cost, monitor cost and peak memory at real scale: ResNet-18 (CIFAR shape) and a GPT-2-small shape.

For each model, on synthetic data (no download), in one run:

1. one gradient over the analysis set (seconds);
2. HVP / gradient per path (``backend="func"``: vmapped forward-over-reverse; ``"autograd"``:
   double backward) and per width (1 vector, the monitor's Lanczos step = ``num_runs`` vectors,
   a trace block of 10), and what ``backend="auto"`` measured and chose for each width;
3. one default ``HessianMonitor`` evaluation (``spectral_density`` with the monitor's
   ``num_runs`` x ``num_steps`` and the monitor's HVP path) as a ratio to one training epoch
   over the training set (forward, backward, optimizer step) and in gradient passes;
4. peak extra memory of that evaluation (CUDA: ``max_memory_allocated`` above the memory held
   before it; on CPU: n/a);
5. when installed (import guarded, never a dependency): PyHessian's density and
   hessian-eigenthings' spectral density on the same batches at the same number of HVPs, as
   time ratios.

    python benchmarks/bench_gpu.py                 # full sizes (a GPU is expected)
    python benchmarks/bench_gpu.py --small         # tiny shapes: a smoke test on CPU (seconds)
    python benchmarks/bench_gpu.py --models resnet --num-steps 10

Ratios are measured within one run; figures go to ``benchmarks/README.md`` with date, device and
torch version.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_hessian import HessianOperator, spectral_density  # noqa: E402

# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): 11.2 M parameters at ``width=64``."""

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-shaped decoder (tied embeddings): 124 M parameters at the defaults."""

    def __init__(
        self, vocab: int = 50257, context: int = 1024, dim: int = 768, heads: int = 12, layers: int = 12
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    analysis: list[tuple[Tensor, Tensor]]  # micro-batches of the analysis set
    train: list[tuple[Tensor, Tensor]]  # one training epoch
    notes: list[str] = field(default_factory=list)


def _batches(make: Callable[[int], tuple[Tensor, Tensor]], total: int, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [make(min(batch, total - start)) for start in range(0, total, batch)]


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    cases = []
    if "resnet" in args.models:
        torch.manual_seed(0)
        if args.small:
            model, size, n_an, b_an, n_tr = ResNet18(width=4, blocks=(1, 1)), 8, 16, 8, 16
        else:
            model, size, n_an, b_an, n_tr = ResNet18(), 32, 1024, 256, 5120

        def image_batch(b: int) -> tuple[Tensor, Tensor]:
            return torch.randn(b, 3, size, size, generator=g).to(device), torch.randint(0, 10, (b,), generator=g).to(
                device
            )

        cases.append(
            Case(
                f"ResNet-18{' (--small)' if args.small else ''}",
                model.to(device).eval(),
                F.cross_entropy,
                _batches(image_batch, n_an, b_an),
                _batches(image_batch, n_tr, b_an),
            )
        )
    if "gpt" in args.models:
        torch.manual_seed(0)
        if args.small:
            vocab, ctx, kwargs, n_an, b_an, n_tr = 64, 16, dict(dim=16, heads=2, layers=1), 8, 4, 8
        else:
            vocab, ctx, kwargs, n_an, b_an, n_tr = 50257, args.gpt_context, {}, 32, 8, 256
        model = GPT(vocab=vocab, context=ctx, **kwargs)

        def token_batch(b: int) -> tuple[Tensor, Tensor]:
            tokens = torch.randint(0, vocab, (b, ctx + 1), generator=g).to(device)
            return tokens[:, :-1], tokens[:, 1:]

        cases.append(
            Case(
                f"GPT-2-small shape{' (--small)' if args.small else ''}",
                model.to(device).eval(),
                sequence_loss,
                _batches(token_batch, n_an, b_an),
                _batches(token_batch, n_tr, b_an),
            )
        )
    return cases


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    if warmup:
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def gradient_fn(case: Case) -> Callable[[], None]:
    params = [p for p in case.model.parameters() if p.requires_grad]
    total = sum(int(x.shape[0]) for x, _ in case.analysis)

    def grad() -> None:
        for x, y in case.analysis:
            loss = case.loss_fn(case.model(x), y) * (x.shape[0] / total)
            torch.autograd.grad(loss, params)

    return grad


def train_epoch_fn(case: Case) -> Callable[[], None]:
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay put

    def epoch() -> None:
        model.train()
        for x, y in case.train:
            optimizer.zero_grad(set_to_none=True)
            case.loss_fn(model(x), y).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    return epoch


@dataclass
class PeakMemory:
    device: torch.device

    def __enter__(self) -> PeakMemory:
        self.bytes: float = math.nan
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = float(torch.cuda.max_memory_allocated(self.device) - self.base)

    def text(self) -> str:
        return "n/a (CPU)" if math.isnan(self.bytes) else f"{self.bytes / 2**30:.2f} GiB"


def hvp_table(case: Case, widths: list[int], grad_s: float, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds per product and HVP/gradient per path and width; what ``backend="auto"`` chose."""
    n = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    rows = []
    auto = HessianOperator(case.model, case.loss_fn, case.analysis)
    for width in widths:
        V = torch.randn(
            n, width, device=device, dtype=torch.float32, generator=torch.Generator(device=device).manual_seed(width)
        )
        auto.matmat(V)  # measures and chooses for this width
        for backend in ("func", "autograd"):
            op = HessianOperator(case.model, case.loss_fn, case.analysis, backend=backend)
            try:
                seconds = timed(lambda op=op, V=V: op.matmat(V), device, repeats, warmup=repeats > 1)
            except (RuntimeError, NotImplementedError) as err:
                rows.append((backend, width, math.nan, f"fails: {type(err).__name__}"))
                continue
            rows.append((backend, width, seconds, ""))
    print(f"    {'path':<10} {'width':>5} {'s/product':>10} {'HVP/grad':>9}  {'auto chose':<10}")
    for backend, width, seconds, note in rows:
        per_vector = seconds / width / grad_s
        chose = auto.backend_for(width) or "-"
        print(f"    {backend:<10} {width:>5} {seconds:>10.4f} {per_vector:>8.2f}x  {chose:<10} {note}")
    return {"rows": rows, "choices": auto.backend_choices, "timings": auto.backend_timings}


def monitor_evaluation(
    case: Case, num_runs: int, num_steps: int, device: torch.device, basis_dtype: torch.dtype
) -> tuple[float, int, PeakMemory, Any]:
    """One evaluation as ``HessianMonitor`` runs it: a fresh operator (``backend="auto"``), SLQ."""
    with PeakMemory(device) as peak:
        _sync(device)
        start = time.perf_counter()
        op = HessianOperator(case.model, case.loss_fn, case.analysis)
        sd = spectral_density(op, num_runs=num_runs, num_steps=num_steps, seed=0, basis_dtype=basis_dtype)
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds, op.num_hvps, peak, sd


def comparisons(case: Case, num_runs: int, num_steps: int, ours_s: float, device: torch.device) -> None:
    """PyHessian / hessian-eigenthings density at equal HVPs (when installed)."""
    try:
        from pyhessian import hessian as pyhessian_hessian  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - optional
        print("    PyHessian: not installed")
    else:
        try:
            if not hasattr(torch, "eig") or getattr(torch.eig, "__name__", "") != "_eig_shim":

                def _eig_shim(a: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
                    values, vectors = torch.linalg.eigh(a)
                    return torch.stack([values, torch.zeros_like(values)], 1), vectors

                torch.eig = _eig_shim  # type: ignore[attr-defined]  # torch 2.x removed it
            comp = pyhessian_hessian(case.model, case.loss_fn, dataloader=case.analysis, cuda=device.type == "cuda")
            _sync(device)
            start = time.perf_counter()
            comp.density(iter=num_steps, n_v=num_runs)
            _sync(device)
            theirs = time.perf_counter() - start
            print(
                f"    PyHessian density ({num_runs}x{num_steps}): {theirs:.2f} s; "
                f"ours / PyHessian = {ours_s / theirs:.2f}"
            )
        except Exception as err:  # noqa: BLE001 - report, never fail the benchmark
            print(f"    PyHessian: failed ({type(err).__name__}: {err})")
    try:
        import hessian_eigenthings as eth  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - optional
        print("    hessian-eigenthings: not installed")
    else:
        try:
            op = eth.HessianOperator(case.model, case.analysis, eth.supervised_loss(case.loss_fn))
            _sync(device)
            start = time.perf_counter()
            eth.spectral_density(op, num_runs=num_runs, lanczos_steps=num_steps)
            _sync(device)
            theirs = time.perf_counter() - start
            print(
                f"    hessian-eigenthings density ({num_runs}x{num_steps}): {theirs:.2f} s; "
                f"ours / theirs = {ours_s / theirs:.2f}"
            )
        except Exception as err:  # noqa: BLE001
            print(f"    hessian-eigenthings: failed ({type(err).__name__}: {err})")


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    n = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    samples = sum(int(x.shape[0]) for x, _ in case.analysis)
    print(
        f"\n== {case.name}: {n:,} parameters; analysis set {samples} samples in {len(case.analysis)} micro-batches; "
        f"training epoch {sum(int(x.shape[0]) for x, _ in case.train)} samples"
    )
    grad_s = timed(gradient_fn(case), device, args.repeats)
    epoch_s = timed(train_epoch_fn(case), device, max(1, args.repeats // 2), warmup=args.repeats > 1)
    print(f"    one gradient over the analysis set: {grad_s:.4f} s; one training epoch: {epoch_s:.4f} s")
    widths = args.widths or sorted({1, args.num_runs, 10})
    table = hvp_table(case, widths, grad_s, device, args.repeats)
    basis_dtype = torch.float32 if args.basis_dtype == "float32" else torch.float64
    seconds, hvps, peak, sd = monitor_evaluation(case, args.num_runs, args.num_steps, device, basis_dtype)
    print(
        f"    HessianMonitor evaluation ({args.num_runs}x{args.num_steps}, {args.basis_dtype} basis): {seconds:.3f} s "
        f"= {seconds / epoch_s:.2f} training epochs = {seconds / grad_s:.1f} gradients ({hvps} HVPs: "
        f"{seconds / grad_s / hvps:.2f} gradients per HVP, Lanczos included); peak extra memory {peak.text()}"
    )
    print(f"    (top Ritz value {float(sd.top_ritz_values(1)[0][0]):.4g}, trace {sd.deflated_trace:.4g})")
    comparisons(case, args.num_runs, args.num_steps, seconds, device)
    return {
        "name": case.name,
        "num_params": n,
        "gradient_s": grad_s,
        "epoch_s": epoch_s,
        "hvp": table,
        "evaluation_s": seconds,
        "evaluation_hvps": hvps,
        "evaluation_over_epoch": seconds / epoch_s,
        "peak_extra_bytes": peak.bytes,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--models", default="resnet,gpt", help="comma-separated: resnet, gpt")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--num-runs", type=int, default=3, help="Lanczos runs (HessianMonitor default 3)")
    parser.add_argument("--num-steps", type=int, default=None, help="Lanczos steps (default 40; 4 with --small)")
    parser.add_argument("--widths", default=None, help="product widths to time (default: 1, num_runs, 10)")
    parser.add_argument("--basis-dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--gpt-context", type=int, default=1024)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions (median; default 5, 1 with --small)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.widths = [int(w) for w in args.widths.split(",")] if args.widths else None
    if args.num_steps is None:
        args.num_steps = 4 if args.small else 40
    if args.repeats is None:
        args.repeats = 1 if args.small else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(
        f"bench_gpu  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  torch {torch.__version__}  "
        f"device {name}  float32{' --small' if args.small else ''}"
    )
    return [run_case(case, args, device) for case in build_cases(args, device)]


if __name__ == "__main__":
    main()
