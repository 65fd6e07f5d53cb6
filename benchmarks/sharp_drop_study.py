"""Does the trace's sharp drop mean training has stopped? A study over 29 small training runs.

Every run trains with a :class:`~lightning_hessian.callbacks.HessianMonitor` at its defaults
(3 x 40 Lanczos, fixed probes, a 10 % analysis set; never stopping), records per evaluation the
trace, its standard error and 95 % interval, the validation loss and accuracy, and the seconds
spent training and monitoring. The analysis then replays, offline and exactly as the monitor does
online, the :class:`~lightning_hessian.TraceSharpDropDetector` on the logged trace and interval
(the detector is pure Python: the replay is the online decision), and a stock Lightning
``EarlyStopping(monitor="val_loss", patience=p)`` on the logged validation loss (its own
``_evaluate_stopping_criteria``, fresh instance per run). Per run it reports:

* whether and when a drop is flagged (the confirming evaluation) and its middle;
* the plateau: the first evaluation whose validation accuracy is within ``ACC_TOL`` (0.01) of the
  run's best (language model: validation loss within ``LOSS_TOL`` (2 %) of its best);
* the stop of ``stop_on_sharp_drop=True`` with ``sharp_drop_patience`` 0 and 5 and of
  ``EarlyStopping`` with patience 3 and 5;
* compute saved (fraction of the run's training + monitoring seconds after the stop) and accuracy
  lost (best accuracy of the whole run minus the best accuracy up to the stop; a stopped run keeps
  its best checkpoint) for each rule.

Runs: 13 digits MLPs and 13 digits CNNs (SGD with momentum and Adam, learning rates 1e-3-0.2,
batch sizes 32-512, widths, 20 % label noise or none, seeds) of 30 epochs, and 3 tiny GPTs on
``pydoc_data.topics`` evaluated every 10 optimizer steps (``every_n_train_steps``: the
detector's clock is then the evaluation index) for 300 steps, one with a step learning-rate
schedule (x0.1 at step 150). All on CPU, offline, one thread. CNN analysis sets are capped at
64 samples (budget).

    python benchmarks/sharp_drop_study.py             # collect + analyse, 56 min on the shared 2-core machine
    python benchmarks/sharp_drop_study.py --analyse   # re-analyse the committed raw sequences only
    python benchmarks/sharp_drop_study.py --quick     # smoke run (2 tiny runs, seconds; CI)

Writes ``benchmarks/results/sharp_drop_study{_raw.json,.csv,.md,.png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
ACC_TOL = 0.01  # plateau: validation accuracy within this of the run's best (absolute)
LOSS_TOL = 0.02  # language model: validation loss within 2 % of its best
ES_PATIENCES = (3, 5)
DROP_PATIENCES = (0, 5)


@dataclass
class RunConfig:
    """One training run of the study."""

    name: str
    model: str  # "mlp", "cnn" or "gpt"
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    lr: float = 0.05
    batch_size: int = 32
    width: int = 64  # MLP hidden units; CNN: channels of the first conv (second: 2x); GPT: model dim
    label_noise: float = 0.0
    init_scale: float = 1.0
    seed: int = 0
    epochs: int = 30  # digits: epochs; GPT: evaluations (every `steps_per_eval` steps)
    steps_per_eval: int = 10
    lr_step_at: int | None = None  # GPT: multiply the lr by 0.1 at this optimizer step
    max_samples: int | None = None  # analysis-set cap (CNN: 64 samples, to fit the study's budget)
    extra: dict[str, Any] = field(default_factory=dict)


def study_configs() -> list[RunConfig]:
    mlp = [
        RunConfig("mlp-sgd-lr0.01", "mlp", lr=0.01),
        RunConfig("mlp-sgd-lr0.05", "mlp", lr=0.05),
        RunConfig("mlp-sgd-lr0.05-seed1", "mlp", lr=0.05, seed=1),
        RunConfig("mlp-sgd-lr0.2", "mlp", lr=0.2),
        RunConfig("mlp-sgd-lr0.05-bs128", "mlp", lr=0.05, batch_size=128),
        RunConfig("mlp-sgd-lr0.05-bs512", "mlp", lr=0.05, batch_size=512),
        RunConfig("mlp-adam-lr1e-3", "mlp", optimizer="adam", lr=1e-3),
        RunConfig("mlp-adam-lr1e-2", "mlp", optimizer="adam", lr=1e-2),
        RunConfig("mlp-sgd-lr0.05-w16", "mlp", lr=0.05, width=16),
        RunConfig("mlp-sgd-lr0.01-bs128-w256", "mlp", lr=0.01, batch_size=128, width=256),
        RunConfig("mlp-sgd-lr0.05-noise0.2", "mlp", lr=0.05, label_noise=0.2),
        RunConfig("mlp-adam-lr1e-3-noise0.2", "mlp", optimizer="adam", lr=1e-3, label_noise=0.2),
        RunConfig("mlp-sgd-lr0.05-init0.5", "mlp", lr=0.05, init_scale=0.5),
    ]
    cnn = [
        RunConfig(
            "cnn-sgd-lr0.05-bs256-init0.5-seed3", "cnn", lr=0.05, batch_size=256, width=8, init_scale=0.5, seed=3
        ),
        RunConfig("cnn-sgd-lr0.05-bs256-init0.5", "cnn", lr=0.05, batch_size=256, width=8, init_scale=0.5),
        RunConfig(
            "cnn-sgd-lr0.05-bs256-init0.5-seed1", "cnn", lr=0.05, batch_size=256, width=8, init_scale=0.5, seed=1
        ),
        RunConfig("cnn-sgd-lr0.02-bs256-init0.5", "cnn", lr=0.02, batch_size=256, width=8, init_scale=0.5),
        RunConfig("cnn-sgd-lr0.1-bs256-init0.5", "cnn", lr=0.1, batch_size=256, width=8, init_scale=0.5),
        RunConfig("cnn-sgd-lr0.05-bs64-init0.5", "cnn", lr=0.05, batch_size=64, width=8, init_scale=0.5),
        RunConfig("cnn-sgd-lr0.05-bs256", "cnn", lr=0.05, batch_size=256, width=8),
        RunConfig("cnn-adam-lr1e-3-bs64", "cnn", optimizer="adam", lr=1e-3, batch_size=64, width=8),
        RunConfig(
            "cnn-adam-lr3e-3-bs256-init0.5", "cnn", optimizer="adam", lr=3e-3, batch_size=256, width=8, init_scale=0.5
        ),
        RunConfig(
            "cnn-sgd-lr0.05-bs256-init0.5-noise0.2",
            "cnn",
            lr=0.05,
            batch_size=256,
            width=8,
            init_scale=0.5,
            label_noise=0.2,
        ),
        RunConfig(
            "cnn-adam-lr1e-3-bs64-noise0.2", "cnn", optimizer="adam", lr=1e-3, batch_size=64, width=8, label_noise=0.2
        ),
        RunConfig("cnn-sgd-lr0.05-bs256-init0.5-w16", "cnn", lr=0.05, batch_size=256, width=16, init_scale=0.5),
        RunConfig("cnn-sgd-lr0.05-bs256-init0.5-w4", "cnn", lr=0.05, batch_size=256, width=4, init_scale=0.5),
    ]
    gpt = [
        RunConfig("gpt-adamw-lr3e-3", "gpt", optimizer="adam", lr=3e-3, batch_size=16, width=48),
        RunConfig(
            "gpt-adamw-lr3e-3-step150", "gpt", optimizer="adam", lr=3e-3, batch_size=16, width=48, lr_step_at=150
        ),
        RunConfig("gpt-adamw-lr1e-3", "gpt", optimizer="adam", lr=1e-3, batch_size=16, width=48),
    ]
    for config in cnn:
        config.max_samples = 64
    return mlp + cnn + gpt


def quick_configs() -> list[RunConfig]:
    return [
        RunConfig("quick-mlp", "mlp", lr=0.05, epochs=6, width=16),
        RunConfig("quick-gpt", "gpt", optimizer="adam", lr=3e-3, batch_size=8, width=16, epochs=6, steps_per_eval=3),
    ]


# ------------------------------------------------------------------------------------------ models


def _lightning_module(config: RunConfig, vocab: int = 0, seq_len: int = 0):
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch import nn

    if config.model == "mlp":
        net: nn.Module = nn.Sequential(nn.Linear(64, config.width), nn.ReLU(), nn.Linear(config.width, 10))
    elif config.model == "cnn":
        c = config.width
        net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, 10),
        )
    else:
        sys.path.insert(0, str(ROOT / "examples"))
        from tiny_gpt_text import TinyGPT

        net = TinyGPT(vocab, seq_len, dim=config.width, layers=2 if config.width >= 32 else 1, heads=2)
    if config.init_scale != 1.0:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(config.init_scale)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.val: dict[int, tuple[float, float]] = {}

        def forward(self, x):
            return self.net(x)

        def _loss(self, batch):
            x, y = batch
            logits = self(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), logits, y

        def training_step(self, batch, batch_idx):
            return self._loss(batch)[0]

        def validation_step(self, batch, batch_idx):
            loss, logits, y = self._loss(batch)
            self.log("val_loss", loss)
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            if config.optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=config.lr, momentum=0.9)
            else:
                opt = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=0.0)
            if config.lr_step_at is None:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_step_at, gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def _digits(config: RunConfig):
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))  # fixed split
    cut = int(0.9 * x.shape[0])
    xtr, ytr = x[perm[:cut]], y[perm[:cut]].clone()
    if config.label_noise > 0:  # training labels only; validation stays clean
        gen = torch.Generator().manual_seed(1000 + config.seed)
        flip = torch.rand(cut, generator=gen) < config.label_noise
        ytr[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    train = DataLoader(
        TensorDataset(xtr, ytr),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    val = DataLoader(TensorDataset(x[perm[cut:]], y[perm[cut:]]), batch_size=512)
    return train, val


def _text(config: RunConfig, seq_len: int):
    from torch.utils.data import DataLoader, Subset

    sys.path.insert(0, str(ROOT / "examples"))
    from tiny_gpt_text import CharWindows, topics_text

    data = CharWindows(topics_text(), seq_len)
    n_val = 64
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train = Subset(data, order[n_val:].tolist())
    val = Subset(data, order[:n_val].tolist())
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, DataLoader(val, batch_size=64), len(data.vocab)


# ------------------------------------------------------------------------------------------ runs


def run_one(config: RunConfig) -> dict[str, Any]:
    """Train one run with a default ``HessianMonitor``; return its per-evaluation record."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_hessian.callbacks import HessianMonitor

    pl.seed_everything(config.seed, verbose=False)
    by_steps = config.model == "gpt"
    if by_steps:
        seq_len = 32 if config.width >= 32 else 16
        train, val, vocab = _text(config, seq_len)
        module = _lightning_module(config, vocab, seq_len)
        monitor = HessianMonitor(
            every_n_train_steps=config.steps_per_eval, max_samples=8, analysis_batch_size=8, log_density=False
        )
        limits: dict[str, Any] = dict(
            max_steps=config.epochs * config.steps_per_eval, val_check_interval=config.steps_per_eval
        )
    else:
        train, val = _digits(config)
        module = _lightning_module(config)
        monitor = HessianMonitor(log_density=False, max_samples=config.max_samples)
        limits = dict(max_epochs=config.epochs)

    class Clock(Callback):
        """Training seconds between consecutive validations (the monitor's own time excluded)."""

        def __init__(self) -> None:
            self.last = time.perf_counter()
            self.rows: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            now = time.perf_counter()
            metrics = trainer.callback_metrics
            self.rows.append(
                {
                    "step": float(trainer.global_step),
                    "val_loss": float(metrics["val_loss"]),
                    "val_acc": float(metrics["val_acc"]),
                    "train_seconds": now - self.last,
                }
            )
            self.last = time.perf_counter()

    clock = Clock()
    trainer = pl.Trainer(
        callbacks=[monitor, clock],
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **limits,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    wall = time.perf_counter() - start
    history = monitor.history
    n = min(len(history), len(clock.rows))
    rows = []
    for h, c in zip(history[:n], clock.rows[:n], strict=True):
        rows.append(
            {
                "trace": float(h["trace"]),
                "stderr": float(h["trace_stderr"]),
                "ci_low": float(h["trace_ci_low"]),
                "ci_high": float(h["trace_ci_high"]),
                "val_loss": c["val_loss"],
                "val_acc": c["val_acc"],
                "step": c["step"],
                "monitor_seconds": float(h["seconds"]),
                "interval_seconds": c["train_seconds"],
            }
        )
    return {"config": asdict(config), "rows": rows, "wall_seconds": wall}


def collect(configs: list[RunConfig], raw_path: Path, resume: bool = True) -> list[dict[str, Any]]:
    """Run every configuration (skipping those already in ``raw_path`` when ``resume``)."""
    records: list[dict[str, Any]] = []
    if resume and raw_path.exists():
        records = json.loads(raw_path.read_text())["runs"]
    done = {r["config"]["name"] for r in records}
    for config in configs:
        if config.name in done:
            continue
        record = run_one(config)
        records.append(record)
        print(f"{config.name}: {len(record['rows'])} evaluations, {record['wall_seconds']:.0f} s", flush=True)
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps({"runs": records}, indent=0))
    order = {c.name: i for i, c in enumerate(configs)}
    return sorted((r for r in records if r["config"]["name"] in order), key=lambda r: order[r["config"]["name"]])


# ------------------------------------------------------------------------------------------ analysis


def replay_detector(rows: list[dict[str, float]], **kwargs: Any):
    """The detector fed exactly as ``HessianMonitor`` feeds it online (evaluation ``i`` at clock ``i``)."""
    from lightning_hessian import TraceSharpDropDetector

    det = TraceSharpDropDetector(**kwargs)
    for i, r in enumerate(rows):
        det.update_from_log(i, r["trace"], r["stderr"], r["ci_low"], r["ci_high"])
    return det


def early_stopping_stop(rows: list[dict[str, float]], patience: int) -> int | None:
    """Index of the evaluation at which a stock ``EarlyStopping(monitor="val_loss", patience)`` stops."""
    from lightning.pytorch.callbacks import EarlyStopping

    es = EarlyStopping(monitor="val_loss", patience=patience, mode="min")
    for i, r in enumerate(rows):
        should_stop, _ = es._evaluate_stopping_criteria(torch.tensor(r["val_loss"]))
        if should_stop:
            return i
    return None


def plateau_index(rows: list[dict[str, float]], lm: bool) -> int:
    """First evaluation within the tolerance of the run's best (accuracy; loss for the LM)."""
    if lm:
        best = min(r["val_loss"] for r in rows)
        return next(i for i, r in enumerate(rows) if r["val_loss"] <= best * (1 + LOSS_TOL))
    best = max(r["val_acc"] for r in rows)
    return next(i for i, r in enumerate(rows) if r["val_acc"] >= best - ACC_TOL)


def _stop_costs(rows: list[dict[str, float]], stop: int | None, lm: bool) -> tuple[float, float]:
    """(compute saved, quality lost) had training stopped after evaluation ``stop`` (best checkpoint kept)."""
    if stop is None:
        return 0.0, 0.0
    cost = [r["interval_seconds"] for r in rows]
    saved = sum(cost[stop + 1 :]) / sum(cost)
    if lm:  # validation loss: best so far minus best overall (>= 0, nats)
        return saved, min(r["val_loss"] for r in rows[: stop + 1]) - min(r["val_loss"] for r in rows)
    return saved, max(r["val_acc"] for r in rows) - max(r["val_acc"] for r in rows[: stop + 1])


def analyse_run(record: dict[str, Any], detector_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    rows, config = record["rows"], record["config"]
    lm = config["model"] == "gpt"
    det = replay_detector(rows, **(detector_kwargs or {}))
    plateau = plateau_index(rows, lm)
    out: dict[str, Any] = {
        "run": config["name"],
        "model": config["model"],
        "evaluations": len(rows),
        "flagged": det.flagged,
        "flag_at": det.flagged_at_epoch,
        "drop_middle": det.drop_middle_epoch,
        "drop_size": None if det.drop_size is None else round(det.drop_size, 3),
        "plateau_at": plateau,
        "best": round(min(r["val_loss"] for r in rows) if lm else max(r["val_acc"] for r in rows), 4),
        "final": round(rows[-1]["val_loss"] if lm else rows[-1]["val_acc"], 4),
        "trace_first": round(rows[0]["trace"], 4),
        "trace_max": round(max(r["trace"] for r in rows), 4),
        "trace_last": round(rows[-1]["trace"], 4),
    }
    stops: dict[str, int | None] = {}
    for p in DROP_PATIENCES:
        middle = det.drop_middle_epoch
        stops[f"drop_p{p}"] = None if middle is None else max(det.flagged_at_epoch, middle + p)
    for p in ES_PATIENCES:
        stops[f"es_p{p}"] = early_stopping_stop(rows, p)
    for key, stop in stops.items():
        if stop is not None and stop >= len(rows) - 1:
            stop = None  # stopping at the last evaluation is no stop
        saved, lost = _stop_costs(rows, stop, lm)
        out[f"{key}_stop"] = stop
        out[f"{key}_saved"] = round(saved, 3)
        out[f"{key}_lost"] = round(lost, 4)
    out["flag_minus_plateau"] = None if det.flagged_at_epoch is None else det.flagged_at_epoch - plateau
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates over the runs: flags, distances to the plateau, each stop rule's savings and losses."""
    import statistics

    flagged = [r for r in results if r["flagged"]]
    summary: dict[str, Any] = {"runs": len(results), "flagged": len(flagged)}
    if flagged:
        diffs = [r["flag_minus_plateau"] for r in flagged]
        summary["flag_minus_plateau_median"] = statistics.median(diffs)
        summary["flag_minus_plateau_range"] = (min(diffs), max(diffs))
        summary["flag_before_plateau"] = sum(d < 0 for d in diffs)
    for key in [f"drop_p{p}" for p in DROP_PATIENCES] + [f"es_p{p}" for p in ES_PATIENCES]:
        stopped = [r for r in results if r[f"{key}_stop"] is not None]
        digits = [r for r in stopped if r["model"] != "gpt"]
        summary[key] = {
            "stopped": len(stopped),
            "early_before_plateau": sum(r[f"{key}_stop"] < r["plateau_at"] for r in stopped),
            "mean_saved": round(statistics.fmean(r[f"{key}_saved"] for r in results), 3),
            "digits_acc_lost_max": max((r[f"{key}_lost"] for r in digits), default=0.0),
            "digits_acc_lost_mean": round(statistics.fmean([r[f"{key}_lost"] for r in digits]), 4) if digits else 0.0,
            "digits_lost_over_0.01": sum(r[f"{key}_lost"] > 0.01 for r in digits),
        }
    return summary


def write_outputs(results: list[dict[str, Any]], summary: dict[str, Any], out: Path, seconds: float | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    out.with_suffix(".md").write_text(markdown(results, summary, seconds))
    plot(results, out.with_suffix(".png"))


def _fmt(value: Any) -> str:
    return "–" if value is None else str(value)


def markdown(results: list[dict[str, Any]], summary: dict[str, Any], seconds: float | None) -> str:
    lines = [
        "# Sharp-drop study: does the flag mean training has stopped?",
        "",
        "Produced by `python benchmarks/sharp_drop_study.py`"
        + (f" (collection {seconds / 60:.0f} min wall on the shared 2-core machine)." if seconds else "."),
        f"Indices are evaluations (digits: epochs 0-based; GPT: every 10 steps). Plateau: first evaluation with "
        f"validation accuracy within {ACC_TOL} of the run's best (GPT: validation loss within {LOSS_TOL:.0%} of its "
        "best). `drop pP`: `stop_on_sharp_drop=True, sharp_drop_patience=P`; `ES pP`: stock "
        "`EarlyStopping(monitor='val_loss', patience=P)`. Saved: fraction of the run's seconds (training + "
        "monitoring) after the stop; lost: best accuracy of the full run minus the best up to the stop "
        "(GPT: extra validation loss, nats). – : no flag / no stop.",
        "",
        "| run | flag at | middle | size | plateau | best | drop p0 stop / saved / lost | drop p5 stop / saved / lost "
        "| ES p3 stop / saved / lost | ES p5 stop / saved / lost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [
            r["run"],
            _fmt(r["flag_at"]),
            _fmt(r["drop_middle"]),
            _fmt(r["drop_size"]),
            str(r["plateau_at"]),
            str(r["best"]),
        ]
        for key in ("drop_p0", "drop_p5", "es_p3", "es_p5"):
            stop = r[f"{key}_stop"]
            cells.append("–" if stop is None else f"{stop} / {r[f'{key}_saved']:.0%} / {r[f'{key}_lost']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Summary", "", "```", json.dumps(summary, indent=1), "```", ""]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    top = max(r["evaluations"] for r in results)
    markers = {"mlp": ("o", "tab:blue"), "cnn": ("s", "tab:orange"), "gpt": ("^", "tab:green")}
    for model, (marker, color) in markers.items():
        sub = [r for r in results if r["model"] == model]
        hit = [r for r in sub if r["flagged"]]
        miss = [r for r in sub if not r["flagged"]]
        if hit:
            ax.scatter(
                [r["plateau_at"] for r in hit],
                [r["flag_at"] for r in hit],
                marker=marker,
                color=color,
                label=f"{model}: flagged",
            )
        if miss:
            ax.scatter(
                [r["plateau_at"] for r in miss],
                [top + 1] * len(miss),
                marker=marker,
                facecolors="none",
                edgecolors=color,
                label=f"{model}: no flag",
            )
    ax.plot([0, top], [0, top], "k--", lw=1, label="flag = plateau")
    ax.axhline(top + 0.5, color="grey", lw=0.5)
    ax.set_xlabel("plateau evaluation (val. accuracy within 0.01 of best)")
    ax.set_ylabel("sharp-drop flag evaluation (top row: none)")
    ax.set_title("Sharp-drop flag vs validation plateau")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tiny runs (smoke test); writes under --out")
    parser.add_argument("--analyse", action="store_true", help="only re-analyse the raw sequences in --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "sharp_drop_study")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw_path = args.out.parent / (args.out.name + "_raw.json")
    configs = quick_configs() if args.quick else study_configs()
    start = time.perf_counter()
    if args.analyse:
        records = json.loads(raw_path.read_text())["runs"]
    else:
        records = collect(configs, raw_path, resume=not args.quick)
    seconds = sum(r["wall_seconds"] for r in records)
    results = [analyse_run(r) for r in records]
    summary = summarise(results)
    write_outputs(results, summary, args.out, seconds)
    print(json.dumps(summary, indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s; runs' own wall time {seconds:.0f} s")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    main()
