"""Operating characteristic of the sharp-drop detector on real trace sequences.

Collects, with the estimator ``HessianMonitor`` runs (:func:`~lightning_hessian.spectral_density`
on the Hessian of the mean cross-entropy over a seeded 10 % analysis set of the digits, Rademacher
probes, deflated Hutchinson trace, 95 % Student-t interval):

* **pure estimator noise** (fixed weights, lr = 0, probes resampled every evaluation): the digits
  MLP (64-64-10, 161-sample analysis set) and the small CNN (64 samples) after 3 epochs of SGD,
  200 / 100 evaluations at the
  monitor's default 3 x 40 and at 3 x 10. Evaluations are i.i.d. given the weights, so a
  stationary "run of 50 evaluations" is 50 of them drawn without replacement;
* **plateaued late training** (fixed probes, the monitor's default): 6 runs (MLP and CNN, SGD and
  Adam, learning rates, seeds) trained 20 epochs, then evaluated at each of the next 50 epochs of
  training (validation accuracy has plateaued: the 50 evaluations are one run);

then measures, for the detector at a grid of its knob ``false_alarm_rate``:

* the **false-alarm rate**: fraction of stationary runs of 50 evaluations with a flag (pure
  noise: ``RUNS`` resampled runs per setting; late training: the 6 runs);
* the **detection delay**: a drop of ``k`` times the sequence's median standard error
  (k = 2, 3, 5), linear over ``w`` = 1, 2, 3 evaluations, injected at a random evaluation
  (20-35) of a pure-noise run; delay = flag evaluation minus the first evaluation at the lower
  level (0: flagged on it); a run without flag counts as missed.

    python benchmarks/sharp_drop_calibration.py             # collect + analyse (~45 min on 2 busy cores)
    python benchmarks/sharp_drop_calibration.py --analyse   # analyse the committed raw sequences only

Writes ``benchmarks/results/sharp_drop_calibration{_raw.json,.csv,.md,.png}``.
"""

from __future__ import annotations

import argparse
import json
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
ALPHAS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


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

        def record(epoch: int, model=model, rows=rows, analysis=analysis) -> None:
            rows.append(_evaluate(model, analysis, 40, 42))

        _train(model, xtr, ytr, HORIZON, opt, seed + 1, on_epoch=record)
        raw["late"][key] = rows
        raw.setdefault("seconds", {})[f"late-{key}"] = time.perf_counter() - start
        save()
        print(f"late {kind} {name} {lr} {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return raw


def _arrays(rows: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray, int]:
    from lightning_hessian.signals._drop_rule import dof_from_interval

    x = np.array([r["trace"] for r in rows])
    se = np.array([r["stderr"] for r in rows])
    dof = min(dof_from_interval(r["stderr"], 0.5 * (r["ci_high"] - r["ci_low"]), 0.95) or 10**6 for r in rows)
    return x, se**2, (0 if dof == 10**6 else dof)


def _draw_runs(x: np.ndarray, var: np.ndarray, runs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``runs`` stationary runs of ``HORIZON`` evaluations drawn without replacement from i.i.d. ones."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(len(x), HORIZON, replace=False) for _ in range(runs)])
    return x[idx], var[idx]


def _inject(x: np.ndarray, size: float, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    onset = rng.integers(20, 36, x.shape[0])
    for r, a in enumerate(onset):
        for i in range(width):
            x[r, a + i] -= size * (i + 1) / width
        x[r, a + width :] -= size
    return onset, onset + width - 1


def operating_characteristic(raw: dict[str, Any], alpha: float, gate: float) -> list[dict[str, Any]]:
    """False alarms and delays of the detector at ``false_alarm_rate=alpha``, ``min_relative_drop=gate``."""
    from lightning_hessian import TraceSharpDropDetector
    from lightning_hessian.signals._drop_rule import alarm_threshold, first_flags

    rule = TraceSharpDropDetector(min_relative_drop=gate, false_alarm_rate=alpha).rule
    rows: list[dict[str, Any]] = []
    for i, (name, seq) in enumerate(sorted(raw["noise"].items())):
        x, var, dof = _arrays(seq)
        threshold = alarm_threshold(rule, alpha, HORIZON, dof)
        xs, vs = _draw_runs(x, var, RUNS, seed=i)
        fa = float((first_flags(rule, xs, vs, threshold) >= 0).mean())
        row: dict[str, Any] = {
            "alpha": alpha,
            "min_relative_drop": gate,
            "sequences": f"pure noise {name}",
            "runs": RUNS,
            "rel_stderr": float(np.sqrt(np.mean(var)) / np.mean(x)),
            "spread_over_stderr": float(np.std(x) / np.sqrt(np.mean(var))),
            "false_alarms": fa,
        }
        se = float(np.sqrt(np.mean(var)))  # RMS standard error: the noise level
        for k in SIZES:
            for w in WIDTHS:
                xs, vs = _draw_runs(x, var, RUNS // 2, seed=100 + i)
                onset, low = _inject(xs, k * se, w, np.random.default_rng(int(10 * k) + w))
                flags = first_flags(rule, xs, vs, threshold)
                delay = np.where(flags >= onset, flags - low, 10**6)
                row[f"found_{k:g}x_w{w}"] = float((flags >= onset).mean())
                row[f"median_delay_{k:g}x_w{w}"] = float(np.median(delay))
        rows.append(row)
    late_flags = 0
    for seq in raw["late"].values():
        x, var, dof = _arrays(seq)
        threshold = alarm_threshold(rule, alpha, HORIZON, dof)
        late_flags += int(first_flags(rule, x[None], var[None], threshold)[0] >= 0)
    rows.append(
        {
            "alpha": alpha,
            "min_relative_drop": gate,
            "sequences": "late training (fixed probes)",
            "runs": len(raw["late"]),
            "false_alarms": late_flags / max(1, len(raw["late"])),
        }
    )
    return rows


def analyse(raw: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    import csv

    table = [r for alpha in ALPHAS for r in operating_characteristic(raw, alpha, 0.0)]
    table += operating_characteristic(raw, 0.05, 0.35)
    keys: list[str] = []
    for r in table:
        keys += [k for k in r if k not in keys]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    out.with_suffix(".md").write_text(_markdown(table, raw))
    _plot(table, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "miss" if value >= 10**6 else f"{value:.3g}"
    return str(value)


def _markdown(table: list[dict[str, Any]], raw: dict[str, Any]) -> str:
    seconds = sum(raw.get("seconds", {}).values())
    lines = [
        "# Sharp-drop detector: operating characteristic on real trace sequences",
        "",
        f"Produced by `python benchmarks/sharp_drop_calibration.py` (collection {seconds / 60:.0f} min on the "
        "shared 2-core machine; `--analyse` re-analyses the committed raw sequences in seconds). "
        f"False alarms: fraction of stationary runs of {HORIZON} evaluations with a flag. Delay: flag minus the "
        "first evaluation at the lower level, median over runs (a miss counts as infinite: 'miss' when most are "
        "missed); found: fraction flagged after the onset. `spread/stderr`: standard deviation of the estimates "
        "over their RMS standard error (1 if the reported errors are right).",
        "",
    ]
    cols = ["alpha", "min_relative_drop", "sequences", "runs", "rel_stderr", "spread_over_stderr", "false_alarms"]
    cols += [f"{m}_{k:g}x_w{w}" for k in SIZES for w in WIDTHS for m in ("found", "median_delay")]
    short = [c.replace("median_delay", "delay").replace("min_relative_drop", "gate") for c in cols]
    lines += ["| " + " | ".join(short) + " |", "|" + " --- |" * len(cols)]
    for r in table:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot(table: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    noise = [r for r in table if r["sequences"].startswith("pure noise") and r["min_relative_drop"] == 0.0]
    for name in sorted({r["sequences"] for r in noise}):
        sub = sorted((r for r in noise if r["sequences"] == name), key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in sub]
        axes[0].plot(alphas, [r["false_alarms"] for r in sub], "o-", label=name.replace("pure noise ", ""))
        for k, ls in ((3.0, "-"), (5.0, "--")):
            axes[1].plot(
                alphas,
                [min(r[f"median_delay_{k:g}x_w1"], 12) for r in sub],
                "o" + ls,
                label=f"{name.replace('pure noise ', '')}, {k:g} SE",
            )
    axes[0].plot([0.005, 0.2], [0.005, 0.2], "k--", lw=1, label="nominal")
    axes[0].set_xscale("log")
    axes[0].set_yscale("symlog", linthresh=0.005)
    axes[0].set_xlabel("false_alarm_rate (knob)")
    axes[0].set_ylabel(f"runs of {HORIZON} with a flag")
    axes[0].set_title("false alarms, fixed weights, resampled probes")
    axes[0].legend(fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("false_alarm_rate (knob)")
    axes[1].set_ylabel("median delay (evaluations; 12 = missed)")
    axes[1].set_title("delay, one-evaluation drops")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
