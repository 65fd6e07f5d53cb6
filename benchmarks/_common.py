"""Small helpers shared by the benchmark scripts (not part of the package).

Puts the repository root on ``sys.path`` so that ``lightning_hessian`` and ``tests.helpers`` import
from the checkout, and provides interleaved timing, a 1-Wasserstein distance between discrete
measures on the line, and a cache for exact spectra under ``benchmarks/outputs/`` (gitignored).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "benchmarks" / "outputs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def interleaved_times(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    target_s: float = 0.05,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each case, measured round-robin.

    Every round runs every case once (the order rotates between rounds), each time as a block of
    ``inner`` back-to-back calls sized to take about ``target_s`` (calibrated on the warm-up), so
    slow drifts of the machine's load hit all cases alike.
    """
    inner: dict[str, int] = {}
    for name, fn in cases.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, min(200, int(target_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = cases[name], inner[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(v) for name, v in samples.items()}


def wasserstein1(
    x: Iterable[float] | np.ndarray,
    wx: Iterable[float] | np.ndarray | None,
    y: Iterable[float] | np.ndarray,
    wy: Iterable[float] | np.ndarray | None,
) -> float:
    """1-Wasserstein distance ``∫|F_x(t) - F_y(t)| dt`` between two weighted point sets on the line.

    Weights are normalised to sum to 1 (``None``: uniform). NaN nodes (padding) are dropped.
    """
    x = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64)
    y = np.asarray(list(y) if not isinstance(y, np.ndarray) else y, dtype=np.float64)
    wx = np.ones_like(x) if wx is None else np.asarray(wx, dtype=np.float64)
    wy = np.ones_like(y) if wy is None else np.asarray(wy, dtype=np.float64)
    keep_x, keep_y = np.isfinite(x), np.isfinite(y)
    x, wx, y, wy = x[keep_x], np.clip(wx[keep_x], 0, None), y[keep_y], np.clip(wy[keep_y], 0, None)
    wx, wy = wx / wx.sum(), wy / wy.sum()
    points = np.concatenate([x, y])
    order = np.argsort(points, kind="mergesort")
    points = points[order]
    signed = np.concatenate([wx, -wy])[order]
    cdf_diff = np.cumsum(signed)[:-1]
    return float(np.sum(np.abs(cdf_diff) * np.diff(points)))


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of tensors' values (to key caches on model parameters and data)."""
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def cached_exact_eigenvalues(
    name: str, model: torch.nn.Module, batches, compute: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, bool]:
    """Eigenvalues (float64, ascending) of the exact Hessian, cached by model and data fingerprint.

    Returns ``(eigenvalues, from_cache)``.
    """
    key = fingerprint(*model.parameters(), *[b for batch in batches for b in batch])
    path = OUTPUTS / f"exact_eigs_{name}_{key}.pt"
    if path.exists():
        try:
            return torch.load(path), True
        except Exception:  # noqa: BLE001 - a corrupt cache is recomputed
            pass
    eigs = compute()
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    torch.save(eigs, path)
    return eigs, False
