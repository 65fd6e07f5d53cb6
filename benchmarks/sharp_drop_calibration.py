"""Operating characteristic of the sharp-drop detector on real trace sequences.

Collects, with the estimator ``HessianMonitor`` runs (:func:`~lightning_hessian.spectral_density`
on the Hessian of the mean cross-entropy over a seeded 10 % analysis set of the digits, Rademacher
probes, deflated Hutchinson trace, 95 % Student-t interval):

* **pure estimator noise** (fixed weights, lr = 0, probes resampled every evaluation): the digits
  MLP (64-64-10) and the small CNN after 3 epochs of SGD, ``EVALS`` evaluations each at the
  monitor's default 3 x 40 and at 3 x 10. Evaluations are i.i.d. given the weights, so a
  stationary "run of 50 evaluations" is 50 of them drawn without replacement;
* **plateaued late training** (fixed probes, the monitor's default): 6 runs (MLP and CNN, SGD and
  Adam, two learning rates) trained 20 epochs, then evaluated at each of the next 50 epochs of
  training (validation accuracy has plateaued: the 50 evaluations are one run);

then measures, for the detector at a grid of its knob ``false_alarm_rate``:

* the **false-alarm rate**: fraction of stationary runs of 50 evaluations with a flag (pure
  noise: ``RUNS`` resampled runs per setting; late training: the 8 runs);
* the **detection delay**: a drop of ``k`` times the sequence's median standard error
  (k = 2, 3, 5), linear over ``w`` = 1, 2, 3 evaluations, injected at a random evaluation
  (20-35) of a pure-noise run; delay = flag evaluation minus the first evaluation at the lower
  level (0: flagged on it); a run without flag counts as missed.

    python benchmarks/sharp_drop_calibration.py             # collect + analyse (~10 min on 2 busy cores)
    python benchmarks/sharp_drop_calibration.py --analyse   # analyse the committed raw sequences only

Writes ``benchmarks/results/sharp_drop_calibration{_raw.json,.csv,.md,.png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
EVALS = {"mlp": 200, "cnn": 100}  # pure-noise evaluations per (model, budget)
RUNS = 500  # stationary runs of HORIZON evaluations drawn from them
HORIZON = 50
SIZES = (2.0, 3.0, 5.0)
WIDTHS = (1, 2, 3)
CAPS = {"mlp": 1000, "cnn": 64}  # analysis-set size caps (MLP: the 10 % = 161 samples; CNN: 64)
ALPHAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def _model(kind: str) -> torch.nn.Module:
    from torch import nn

    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def _data(cap: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    xtr, ytr = x[perm[: int(0.9 * len(x))]], y[perm[: int(0.9 * len(x))]]
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(42))[: min(cap, len(xtr) // 10)]
    return xtr, ytr, [(xtr[pick], ytr[pick])]


def _evaluate(model: torch.nn.Module, analysis, num_steps: int, seed: int) -> dict[str, float]:
    """The monitor's trace computation (defaults but ``num_steps``) with probe seed ``seed``."""
    import torch.nn.functional as F

    from lightning_hessian import HessianOperator, spectral_density

    model.eval()
    op = HessianOperator(model, F.cross_entropy, analysis)
    sd = spectral_density(op, num_runs=3, num_steps=num_steps, seed=seed)
    low, high = sd.trace_confidence_interval(0.95)
    model.train()
    return {"trace": sd.deflated_trace, "stderr": sd.deflated_trace_stderr, "ci_low": low, "ci_high": high}


def _train(model, xtr, ytr, epochs: int, opt, seed: int, on_epoch=None) -> None:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(xtr), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


def collect(raw_path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {"noise": {}, "late": {}}
    if raw_path.exists():
        raw = json.loads(raw_path.read_text())

    def save() -> None:
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw))

    for kind in ("mlp", "cnn"):
        xtr, ytr, analysis = _data(CAPS[kind])
        if all(f"{kind}-3x{steps}" in raw["noise"] for steps in (40, 10)):
            continue
        torch.manual_seed(0)
        model = _model(kind)
        _train(model, xtr, ytr, 3, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 0)
        for steps in (40, 10):
            start = time.perf_counter()
            rows = [_evaluate(model, analysis, steps, 42 + i) for i in range(EVALS[kind])]
            raw["noise"][f"{kind}-3x{steps}"] = rows
            raw.setdefault("seconds", {})[f"noise-{kind}-3x{steps}"] = time.perf_counter() - start
            save()
            print(f"noise {kind} 3x{steps}: {time.perf_counter() - start:.0f} s", flush=True)
    late = [
        ("mlp", "sgd", 0.05, 0),
        ("mlp", "sgd", 0.01, 0),
        ("mlp", "adam", 1e-3, 0),
        ("mlp", "sgd", 0.05, 1),
        ("cnn", "sgd", 0.05, 0),
        ("cnn", "adam", 1e-3, 0),
    ]
    for kind, name, lr, seed in late:
        key = f"{kind}-{name}-lr{lr}-seed{seed}"
        if key in raw["late"]:
            continue
        xtr, ytr, analysis = _data(CAPS[kind])
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = _model(kind)
        params = model.parameters()
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if name == "sgd" else torch.optim.Adam(params, lr=lr)
        _train(model, xtr, ytr, 20, opt, seed)
        rows: list[dict[str, float]] = []
        _train(model, xtr, ytr, HORIZON, opt, seed + 1, on_epoch=lambda e: rows.append(_evaluate(model, analysis, 40, 42)))
        raw["late"][key] = rows
        raw.setdefault("seconds", {})[f"late-{key}"] = time.perf_counter() - start
        save()
        print(f"late {kind} {name} {lr} {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return raw


def analyse(raw, out):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analyse", action="store_true", help="only analyse the committed raw sequences")
    parser.add_argument("--out", type=Path, default=RESULTS / "sharp_drop_calibration")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    raw_path = args.out.parent / (args.out.name + "_raw.json")
    if not args.analyse:
        collect(raw_path)
    raw = json.loads(raw_path.read_text())
    analyse(raw, args.out)


if __name__ == "__main__":
    main()
