"""A run's curves and density evolution as PNG files (matplotlib, the ``plot`` extra).

:func:`plot_run` is the library entry of ``python -m lightning_hessian plot``; it draws on
``matplotlib.figure.Figure`` objects (no pyplot), so it never changes the caller's matplotlib
backend.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from lightning_hessian.analysis.events import DensityHistory, find_run, load_density, load_metrics
from lightning_hessian.analysis.tables import MetricsTable

__all__ = ["PLOT_EXTRA", "plot_run"]

#: How to get matplotlib (named in errors).
PLOT_EXTRA = 'install the `plot` extra (`python -m pip install ".[plot]"` in a clone) or matplotlib'
_MAX_DENSITY_LINES = 8


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
        raise ImportError(f"Plotting needs matplotlib: {PLOT_EXTRA}") from err
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
