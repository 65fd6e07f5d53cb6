"""Command line: ``python -m lightning_hessian {plot,regress,table} RUN_DIR``.

* ``plot``: a run's curves and density evolution as PNG files (matplotlib, ``[plot]`` extra);
* ``regress``: the paper's OLS regressions of per-epoch changes (Table 1 layout);
* ``table``: the per-epoch metrics table (optionally written as CSV).

:func:`plot_run` is the library entry of ``plot``; it draws on ``matplotlib.figure.Figure``
objects (no pyplot), so it never changes the caller's matplotlib backend. :func:`main` (the
command line) selects the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_hessian.analysis import (
    DensityHistory,
    MetricsTable,
    curvature_regressions,
    find_run,
    load_density,
    load_metrics,
)

__all__ = ["build_parser", "main", "plot_run"]

_PLOT_EXTRA = 'install the `plot` extra (`python -m pip install ".[plot]"` in a clone) or matplotlib'
_MAX_DENSITY_LINES = 8


# ============================================================================================
# Plotting
# ============================================================================================


def _finite(table: MetricsTable, name: str) -> tuple[np.ndarray, np.ndarray]:
    values = table.column(name)
    mask = np.isfinite(values)
    return table.epochs[mask], values[mask]


def _grid(fig: Any, count: int, columns: int) -> list[Any]:
    rows = math.ceil(count / columns)
    return [fig.add_subplot(rows, columns, i + 1) for i in range(count)]


def _sharp_drop_epoch(table: MetricsTable, prefix: str) -> float | None:
    name = f"{prefix}trace_sharp_drop_epoch"
    if name not in table:
        return None
    _, values = _finite(table, name)
    return float(values[-1]) if values.size else None


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path, dpi: int) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.get_axes():
        if ax.get_xlabel() in ("epoch", "step"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=dpi)
    return path


# y-axis label of each curve panel (title, label)
_CURVE_PANELS = (
    ("min_eigenvalue", "smallest eigenvalue", "λ_min"),
    ("negative_mass", "negative mass", "fraction of eigenvalues below −τ"),
)
_VOLUME_UNITS = {
    "log_volume": "nats",
    "log_volume_lower_bound": "nats",
    "log10_probability": "log₁₀ P",
    "description_length_bits": "bits",
    "effective_sample_size": "directions",
    "top_weight_share": "share of the estimate",
    "log_radius_mean": "log radius",
    "log_contribution_std": "nats",
    "overhead": "evaluation time / training time",
}


def _trace_band(ax: Any, table: MetricsTable, prefix: str, epochs: np.ndarray) -> None:
    """The logged 95 % Student-t interval of the trace (or ±1 stderr for logs without it), labelled."""
    trace = table.column(f"{prefix}trace")
    rows = np.isfinite(trace)
    low_name, high_name = f"{prefix}trace_ci_low", f"{prefix}trace_ci_high"
    if low_name in table and high_name in table:
        low, high = table.column(low_name)[rows], table.column(high_name)[rows]
        label = "95 % interval (Student-t, num_runs − 1 dof)"
    elif f"{prefix}trace_stderr" in table:
        stderr = table.column(f"{prefix}trace_stderr")[rows]
        low, high = trace[rows] - stderr, trace[rows] + stderr
        label = "± 1 stderr (no interval logged; not a 95 % interval)"
    else:
        return
    ok = np.isfinite(low) & np.isfinite(high)
    ax.fill_between(epochs[ok], low[ok], high[ok], alpha=0.25, label=label)


def _curve_panels(table: MetricsTable, prefix: str) -> list[tuple[str, str, list[str]]]:
    top = sorted(
        (n for n in table.names if re.fullmatch(re.escape(prefix) + r"top_eigenvalue(_\d+)?", n)),
        key=lambda n: int(n.rsplit("_", 1)[1]) if n[-1].isdigit() else 1,
    )
    panels: list[tuple[str, str, list[str]]] = []
    if f"{prefix}trace" in table:
        panels.append(("trace", "tr(H)", [f"{prefix}trace"]))
    if top:
        panels.append(("top eigenvalue" + ("s" if len(top) > 1 else ""), "eigenvalue", top))
    for name, title, ylabel in _CURVE_PANELS:
        if f"{prefix}{name}" in table:
            panels.append((title, ylabel, [f"{prefix}{name}"]))
    return panels


def _plot_curves(table: MetricsTable, prefix: str, path: Path, dpi: int) -> Path | None:
    panels = _curve_panels(table, prefix)
    if not panels:
        return None
    drop = _sharp_drop_epoch(table, prefix)
    fig = _new_figure(10, 3.2 * math.ceil(len(panels) / 2))
    for ax, (title, ylabel, names) in zip(_grid(fig, len(panels), 2), panels, strict=False):
        for name in names:
            epochs, values = _finite(table, name)
            ax.plot(epochs, values, marker="o", ms=3, label=name.removeprefix(prefix))
            if name == f"{prefix}trace":
                _trace_band(ax, table, prefix, epochs)
        if drop is not None and title == "trace":
            ax.axvline(drop, color="red", ls="--", lw=1, label=f"sharp drop ({table.index_name} {drop:g})")
        if title == "smallest eigenvalue":
            ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel(table.index_name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(names) > 1 or title == "trace":
            ax.legend(fontsize=8)
    fig.suptitle("Hessian curvature")
    return _save(fig, path, dpi)


def _plot_volume(table: MetricsTable, prefix: str, path: Path, dpi: int) -> Path | None:
    skip = {f"{prefix}seconds", f"{prefix}num_forward_passes", f"{prefix}log_radius_std"}
    names = [n for n in table.names if n.startswith(prefix) and n not in skip and np.isfinite(table.column(n)).any()]
    if not names:
        return None
    columns = min(3, len(names))
    fig = _new_figure(4 * columns, 3 * math.ceil(len(names) / columns))
    for ax, name in zip(_grid(fig, len(names), columns), names, strict=False):
        epochs, values = _finite(table, name)
        ax.plot(epochs, values, marker="o", ms=3)
        if name == f"{prefix}log_radius_mean" and f"{prefix}log_radius_std" in table:
            std = table.column(f"{prefix}log_radius_std")[np.isfinite(table.column(name))]
            ok = np.isfinite(std)
            ax.fill_between(
                epochs[ok], (values - std)[ok], (values + std)[ok], alpha=0.25, label="± 1 std over directions"
            )
            ax.legend(fontsize=8)
        short = name.removeprefix(prefix)
        ax.set_title(short, fontsize=10)
        ax.set_xlabel(table.index_name)
        ax.set_ylabel(_VOLUME_UNITS.get(short, "count" if short.startswith("num_") else short))
        ax.grid(alpha=0.3)
    fig.suptitle("Local volume")
    return _save(fig, path, dpi)


def _plot_lines(
    table: MetricsTable,
    names: list[str],
    title: str,
    ylabel: str,
    path: Path,
    dpi: int,
    trace: str | None = None,
    drop: float | None = None,
) -> Path | None:
    names = [n for n in names if np.isfinite(table.column(n)).any()]
    if not names:
        return None
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    for name in names:
        epochs, values = _finite(table, name)
        ax.plot(epochs, values, marker="o", ms=3, label=name)
    ax.set_xlabel(table.index_name)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    top = ax
    if trace is not None and trace in table and np.isfinite(table.column(trace)).any():
        # the paper's Figure 6: validation accuracy with the trace (dashed red) on a second axis
        twin = ax.twinx()
        epochs, values = _finite(table, trace)
        (line,) = twin.plot(epochs, values, color="tab:red", ls="--", label=trace)
        twin.set_ylabel(trace, color="tab:red")
        top = twin
        handles.append(line)
        labels.append(trace)
    if drop is not None:
        handles.append(ax.axvline(drop, color="grey", ls=":", lw=1.5))
        labels.append(f"trace sharp drop (epoch {drop:g})")
    top.legend(handles, labels, fontsize=8, loc="best")  # on the topmost axes: above every line
    ax.set_title(title)
    return _save(fig, path, dpi)


def _plot_density(history: DensityHistory, path: Path, dpi: int) -> Path:
    from matplotlib import cm
    from matplotlib.colors import LogNorm, Normalize

    grid, matrix = history.on_common_grid(num=400)
    peak = float(np.nanmax(matrix)) if matrix.size else 1.0
    floor = max(peak * 1e-8, 1e-300)
    fig = _new_figure(13, 5)
    heat, lines = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    epochs = history.epochs.astype(float)
    mesh = heat.pcolormesh(
        grid, epochs, np.clip(matrix, floor, None), norm=LogNorm(vmin=floor, vmax=peak), shading="nearest", cmap="magma"
    )
    fig.colorbar(mesh, ax=heat, label="density (log scale)")
    heat.axvline(0.0, color="white", lw=0.5, alpha=0.6)
    heat.set_xlabel("eigenvalue")
    heat.set_ylabel("epoch")
    heat.set_title("eigenvalue density per epoch")
    if len(epochs) <= 20:
        heat.set_yticks(epochs)

    shown = np.unique(np.linspace(0, len(history) - 1, min(len(history), _MAX_DENSITY_LINES)).round().astype(int))
    norm = Normalize(vmin=float(epochs.min()), vmax=float(max(epochs.max(), epochs.min() + 1)))
    colours = cm.viridis
    for i, (g, d) in enumerate(zip(history.grids, history.densities(), strict=False)):
        if i in shown:
            lines.semilogy(
                g, np.clip(d, floor, None), color=colours(norm(epochs[i])), lw=1.2, label=f"epoch {int(epochs[i])}"
            )
    lines.set_ylim(bottom=floor)
    lines.axvline(0.0, color="grey", lw=0.5)
    lines.set_xlabel("eigenvalue")
    lines.set_ylabel("density (log scale)")
    lines.set_title("density at selected epochs")
    lines.legend(fontsize=8)
    lines.grid(alpha=0.3)
    fig.suptitle(f"Hessian eigenvalue density ({history.tag})")
    return _save(fig, path, dpi)


def plot_run(
    run: str | Path,
    out_dir: str | Path,
    *,
    hessian_prefix: str = "hessian/",
    volume_prefix: str = "volume/",
    dpi: int = 120,
    format: str = "auto",
) -> dict[str, Path | str]:
    """Render a run's metrics to PNG files in ``out_dir``.

    Files (each only if its metrics exist): ``curves.png`` (trace with its logged 95 % Student-t
    interval as a band, or ±1 stderr for logs without ``trace_ci_low``/``trace_ci_high``, and the
    sharp-drop epoch; top eigenvalue(s), smallest eigenvalue, negative mass; every panel with its
    y-axis label), ``volume.png``
    (``volume/*``), ``accuracy.png`` (every metric whose name contains ``acc``, with the trace on
    a second axis as in the paper's Figure 6), ``loss.png`` (names containing ``loss``) and
    ``density.png`` (TensorBoard runs: the eigenvalue density per epoch as a log-colour heatmap,
    and log-scale curves at up to 8 epochs).

    Returns:
        ``name -> path`` of every file written, and ``name -> reason`` (a string) for those not.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Plotting needs matplotlib: {_PLOT_EXTRA}") from err
    table = load_metrics(run, format=format)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | str] = {}

    def record(name: str, result: Path | None, reason: str) -> None:
        written[name] = result if result is not None else reason

    record("curves.png", _plot_curves(table, hessian_prefix, out / "curves.png", dpi), f"no {hessian_prefix}* metrics")
    record("volume.png", _plot_volume(table, volume_prefix, out / "volume.png", dpi), f"no {volume_prefix}* metrics")
    acc = [n for n in table.names if "acc" in n.lower()]
    drop = _sharp_drop_epoch(table, hessian_prefix)
    record(
        "accuracy.png",
        _plot_lines(
            table, acc, "accuracy", "accuracy", out / "accuracy.png", dpi, trace=f"{hessian_prefix}trace", drop=drop
        ),
        "no *acc* metrics",
    )
    losses = [n for n in table.names if "loss" in n.lower()]
    record("loss.png", _plot_lines(table, losses, "loss", "loss", out / "loss.png", dpi), "no *loss* metrics")
    tag = f"{hessian_prefix}eigenvalue_density"
    kind, _ = find_run(run, format)  # type: ignore[arg-type]
    if kind != "tensorboard":
        written["density.png"] = "density histograms are only in TensorBoard logs"
    else:
        try:
            history = load_density(run, tag=tag)
        except ValueError as err:
            written["density.png"] = str(err)
        else:
            written["density.png"] = (
                _plot_density(history, out / "density.png", dpi) if len(history) else "no density histogram"
            )
    return written


# ============================================================================================
# Command line
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hessian",
        description=(
            "Look at a run logged with lightning_hessian's callbacks (TensorBoard log directory or "
            "CSVLogger metrics.csv): render its curves, fit the paper's curvature regressions, or "
            "print its per-epoch metrics."
        ),
        epilog=(
            "examples:\n"
            "  python -m lightning_hessian plot lightning_logs/version_0 --out plots/\n"
            "  python -m lightning_hessian regress lightning_logs/version_0 --ood-acc ood/acc\n"
            "  python -m lightning_hessian table lightning_logs/version_0 --csv metrics_per_epoch.csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plot,regress,table}")

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format",
            choices=("auto", "tensorboard", "csv"),
            default="auto",
            help="which logs to read (default: auto, TensorBoard preferred)",
        )

    plot = sub.add_parser(
        "plot",
        help="render curves and the density evolution to PNG files",
        description="Write curves.png, volume.png, accuracy.png, loss.png and density.png (those whose metrics exist).",
    )
    plot.add_argument("run", metavar="RUN_DIR", help="log directory, event file or metrics.csv of one run")
    plot.add_argument("--out", metavar="OUT_DIR", default=None, help="output directory (default: RUN_DIR/plots)")
    plot.add_argument("--dpi", type=int, default=120, help="resolution of the PNG files (default: 120)")
    plot.add_argument("--prefix", default="hessian/", help="HessianMonitor's metric prefix (default: hessian/)")
    plot.add_argument("--volume-prefix", default="volume/", help="LocalVolumeMonitor's prefix (default: volume/)")
    add_source(plot)

    regress = sub.add_parser(
        "regress",
        help="OLS of per-epoch changes of test/OOD accuracy on the top eigenvalue (paper Table 1)",
        description=(
            "Fit Δtest ~ Δλmax, Δtest ~ Δλmax + Δval, Δood ~ Δλmax, Δood ~ Δλmax + Δval "
            "(Alabdulkareem, NeurIPS 2022, §4.2, Table 1). Several runs are pooled (differences within each run)."
        ),
    )
    regress.add_argument("runs", metavar="RUN_DIR", nargs="+", help="one or more runs to pool")
    regress.add_argument(
        "--test-acc", default="test/acc", help="in-distribution test accuracy metric (default: test/acc)"
    )
    regress.add_argument("--ood-acc", default="ood/acc", help="OOD test accuracy metric (default: ood/acc)")
    regress.add_argument(
        "--top-eigenvalue",
        default="hessian/top_eigenvalue",
        help="top eigenvalue metric (default: hessian/top_eigenvalue)",
    )
    regress.add_argument("--val-acc", default="val/acc", help="validation accuracy metric (default: val/acc)")
    regress.add_argument(
        "--accuracy-scale", type=float, default=1.0, help="multiply accuracies, e.g. 100 for percent (default: 1)"
    )
    regress.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    add_source(regress)

    table = sub.add_parser(
        "table",
        help="print the per-epoch metrics table",
        description="Print one row per epoch (last value logged in the epoch).",
    )
    table.add_argument("run", metavar="RUN_DIR", help="log directory, event file or metrics.csv of one run")
    table.add_argument("--csv", metavar="PATH", default=None, help="also write the table to this CSV file")
    table.add_argument("--columns", nargs="+", default=None, metavar="NAME", help="only these metrics")
    add_source(table)
    return parser


def _default_out(run: str) -> Path:
    path = Path(run)
    return (path.parent if path.is_file() else path) / "plots"


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:
        print(f"lightning_hessian plot: error: matplotlib is not installed: {_PLOT_EXTRA}", file=sys.stderr)
        return 1
    matplotlib.use("Agg")  # the command line process only: no display needed
    out = Path(args.out) if args.out is not None else _default_out(args.run)
    written = plot_run(
        args.run, out, hessian_prefix=args.prefix, volume_prefix=args.volume_prefix, dpi=args.dpi, format=args.format
    )
    any_written = False
    for name, result in written.items():
        if isinstance(result, Path):
            any_written = True
            print(f"wrote {result}")
        else:
            print(f"skipped {name}: {result}")
    return 0 if any_written else 1


def _cmd_regress(args: argparse.Namespace) -> int:
    tables = [load_metrics(run, format=args.format) for run in args.runs]
    results = curvature_regressions(
        tables,
        test_acc=args.test_acc,
        ood_acc=args.ood_acc,
        top_eigenvalue=args.top_eigenvalue,
        val_acc=args.val_acc,
        accuracy_scale=args.accuracy_scale,
        warn=False,
    )
    if args.json:
        payload = {"results": {k: v.as_dict() for k, v in results.items()}, "skipped": results.skipped}
        print(json.dumps(payload, indent=2, default=float))
    else:
        print(results.summary())
    return 0 if results else 1


def _cmd_table(args: argparse.Namespace) -> int:
    table = load_metrics(args.run, format=args.format)
    print(table.to_string(columns=args.columns))
    if args.csv is not None:
        path = table.to_csv(args.csv, columns=args.columns)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _ensure_printable() -> None:
    """Never crash on 'Δ' or '²' with a non-UTF-8 stdout."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "Δ²".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _ensure_printable()
    args = build_parser().parse_args(argv)
    commands = {"plot": _cmd_plot, "regress": _cmd_regress, "table": _cmd_table}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lightning_hessian {args.command}: error: {message}", file=sys.stderr)
        return 1
