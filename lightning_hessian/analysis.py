r"""Read a run's logged metrics and fit the paper's curvature regressions, without SciPy.

* :func:`load_metrics` reads a run's scalars from TensorBoard event files or a Lightning
  ``CSVLogger`` ``metrics.csv`` into a per-epoch :class:`MetricsTable`;
  :func:`load_density` reads the ``hessian/eigenvalue_density`` histograms written by
  :class:`~lightning_hessian.callbacks.HessianMonitor` (TensorBoard only).
* :func:`ols` is ordinary least squares with the statistics a regression table needs
  (standard errors, t and F tests, :math:`R^2`, log-likelihood, AIC/BIC: the statsmodels
  definitions), with p-values from the regularised incomplete beta function.
* :func:`curvature_regressions` fits the four models of Alabdulkareem (NeurIPS 2022)
  §4.2 / Table 1 on per-epoch changes,

  .. math::  \Delta\mathrm{acc}^{test}_t = \beta_0 + \beta_1\,\Delta\lambda_{max,t}
             \;[+\;\beta_2\,\Delta\mathrm{acc}^{val}_t] + \varepsilon_t,

  for the in-distribution and the out-of-distribution (noisy-input, §7.5) test accuracy, and
  :func:`regression_table` prints them side by side like Table 1 (coefficient with
  significance stars, standard error in parentheses, F-test, AIC, N).
"""

from __future__ import annotations

import bisect
import csv
import difflib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_hessian._utils.stats import student_t_quantile

__all__ = [
    "CurvatureRegressions",
    "DensityHistory",
    "MetricsTable",
    "OLSResult",
    "curvature_regressions",
    "find_run",
    "load_density",
    "load_metrics",
    "ols",
    "regression_table",
]

PathLike = str | Path
SourceFormat = Literal["auto", "tensorboard", "csv"]

#: Scalars that are bookkeeping, not metrics.
_IGNORED_SCALARS = frozenset({"epoch", "step", "hp_metric"})


# ============================================================================================
# Per-epoch metrics table
# ============================================================================================


@dataclass
class MetricsTable:
    """A run's scalar metrics, one row per epoch.

    Attributes:
        epochs: Sorted epoch numbers (``int64``), one per row (steps if the run logged no
            ``epoch`` scalar; then ``index_name == "step"``).
        data: Metric name -> ``float64`` array aligned with ``epochs``, NaN where the metric was
            not logged in that epoch.
        index_name: ``"epoch"`` (or ``"step"``).
        source: Where the table was read from.
    """

    epochs: np.ndarray
    data: dict[str, np.ndarray]
    index_name: str = "epoch"
    source: str | None = None

    def __post_init__(self) -> None:
        self.epochs = np.asarray(self.epochs, dtype=np.int64)
        data = {}
        for name, values in self.data.items():
            array = np.asarray(values, dtype=np.float64)
            if array.shape != self.epochs.shape:
                raise ValueError(f"Column {name!r} has shape {array.shape}, expected {self.epochs.shape}.")
            data[name] = array
        self.data = data

    @property
    def names(self) -> list[str]:
        """Metric names, sorted."""
        return sorted(self.data)

    def __len__(self) -> int:
        return int(self.epochs.size)

    def __contains__(self, name: object) -> bool:
        return name in self.data

    def column(self, name: str) -> np.ndarray:
        """The values of metric ``name`` per epoch (NaN where missing)."""
        if name not in self.data:
            close = difflib.get_close_matches(name, self.names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"No metric {name!r} in the table.{hint} Available: {', '.join(self.names) or '(none)'}.")
        return self.data[name]

    def to_csv(self, path: PathLike, columns: Sequence[str] | None = None) -> Path:
        """Write ``index_name`` then the metrics (all, or ``columns``) as CSV; NaN as an empty cell."""
        names = list(columns) if columns is not None else self.names
        for name in names:
            self.column(name)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([self.index_name, *names])
            for i, epoch in enumerate(self.epochs):
                writer.writerow([int(epoch), *(_csv_cell(self.data[name][i]) for name in names)])
        return path

    def to_string(self, columns: Sequence[str] | None = None, precision: int = 6) -> str:
        """The table as aligned text (NaN shown as ``-``)."""
        names = list(columns) if columns is not None else self.names
        cells = [[self.index_name, *names]]
        for i, epoch in enumerate(self.epochs):
            row = [str(int(epoch))]
            for name in names:
                value = self.column(name)[i]
                row.append("-" if math.isnan(value) else f"{value:.{precision}g}")
            cells.append(row)
        widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
        return "\n".join(
            "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False)) for row in cells
        )


def _csv_cell(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def _table_from_records(records: Iterable[tuple[int, str, float]], index_name: str, source: str) -> MetricsTable:
    """``(epoch, name, value)`` records in logging order -> table (the last value per epoch wins)."""
    last: dict[str, dict[int, float]] = {}
    epochs: set[int] = set()
    for epoch, name, value in records:
        epochs.add(epoch)
        last.setdefault(name, {})[epoch] = value
    ordered = np.array(sorted(epochs), dtype=np.int64)
    position = {int(e): i for i, e in enumerate(ordered)}
    data = {}
    for name, per_epoch in last.items():
        column = np.full(ordered.shape, np.nan)
        for epoch, value in per_epoch.items():
            column[position[epoch]] = value
        data[name] = column
    return MetricsTable(ordered, data, index_name=index_name, source=source)


# ============================================================================================
# Finding and reading a run
# ============================================================================================


def _event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*tfevents*") if p.is_file())


def find_run(path: PathLike, format: SourceFormat = "auto") -> tuple[Literal["tensorboard", "csv"], Path]:
    """Locate a run's logs: ``("tensorboard", directory_or_event_file)`` or ``("csv", metrics.csv)``.

    ``path`` may be an event file, a ``.csv`` file, a log directory (a Lightning
    ``version_N`` directory) or a directory above exactly one such directory. TensorBoard event
    files are preferred (they also hold the density histograms) unless ``format="csv"``.
    """
    if format not in ("auto", "tensorboard", "csv"):
        raise ValueError(f"`format` must be 'auto', 'tensorboard' or 'csv', got {format!r}.")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"No such file or directory: {str(root)!r}.")
    if root.is_file():
        if root.suffix == ".csv" and format != "tensorboard":
            return "csv", root
        if "tfevents" in root.name and format != "csv":
            return "tensorboard", root
        raise ValueError(f"{str(root)!r} is neither a TensorBoard event file nor a CSV file (format={format!r}).")
    want_tb, want_csv = format in ("auto", "tensorboard"), format in ("auto", "csv")
    if want_tb and _event_files(root):
        return "tensorboard", root
    if want_csv and (root / "metrics.csv").is_file():
        return "csv", root / "metrics.csv"
    tb_dirs = sorted({p.parent for p in root.rglob("*tfevents*") if p.is_file()}) if want_tb else []
    csv_files = sorted(root.rglob("metrics.csv")) if want_csv else []
    for kind, found in (("tensorboard", tb_dirs), ("csv", csv_files)):
        if len(found) == 1:
            return kind, found[0]  # type: ignore[return-value]
        if len(found) > 1:
            listing = "\n  ".join(str(p) for p in found[:10]) + ("\n  ..." if len(found) > 10 else "")
            raise ValueError(f"Several runs ({kind}) under {str(root)!r}; pass one of:\n  {listing}")
    wanted = {
        "auto": "TensorBoard event files or metrics.csv",
        "tensorboard": "TensorBoard event files",
        "csv": "metrics.csv",
    }
    raise FileNotFoundError(f"No {wanted[format]} under {str(root)!r}.")


def _accumulator(path: Path) -> Any:  # tensorboard's EventAccumulator (untyped)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 1, "audio": 1, "tensors": 1}
    )
    acc.Reload()
    return acc


class _EpochLocator:
    """Epoch of a TensorBoard event from Lightning's ``epoch`` scalar.

    Lightning writes ``epoch`` with every ``log_metrics`` call, at the same step and (nearly) the
    same wall time as the metrics. A scalar takes the epoch logged at its step (the nearest in
    wall time if several epochs share the step). Histograms are written by callbacks at the step
    of the epoch's scalars just before Lightning flushes the epoch's metrics, so an event without an
    ``epoch`` at its step (and every histogram) takes the epoch of the next flush in wall time.
    """

    def __init__(self, epoch_events: Sequence[tuple[float, int, float]]) -> None:
        self.by_step: dict[int, list[tuple[float, int]]] = {}
        for wall, step, value in epoch_events:
            self.by_step.setdefault(int(step), []).append((wall, int(round(value))))  # noqa: RUF046 - value may be a NumPy scalar (round() keeps float64 before NumPy 2)
        ordered = sorted((wall, int(round(value))) for wall, _, value in epoch_events)  # noqa: RUF046
        self.walls = [wall for wall, _ in ordered]
        self.epochs = [epoch for _, epoch in ordered]

    def __bool__(self) -> bool:
        return bool(self.walls)

    def next_flush(self, wall: float) -> int:
        i = bisect.bisect_left(self.walls, wall)
        return self.epochs[min(i, len(self.epochs) - 1)]

    def __call__(self, step: int, wall: float) -> int:
        candidates = self.by_step.get(int(step))
        if not candidates:
            return self.next_flush(wall)
        if len({epoch for _, epoch in candidates}) == 1:
            return candidates[0][1]
        return min(candidates, key=lambda c: abs(c[0] - wall))[1]


def _epoch_locator(acc: Any) -> _EpochLocator:
    if "epoch" not in acc.Tags().get("scalars", []):
        return _EpochLocator([])
    return _EpochLocator([(e.wall_time, e.step, e.value) for e in acc.Scalars("epoch")])


def _read_tensorboard(path: Path) -> MetricsTable:
    acc = _accumulator(path)
    tags = [t for t in acc.Tags().get("scalars", []) if t not in _IGNORED_SCALARS]
    locate = _epoch_locator(acc)
    index_name = "epoch"
    if not locate:
        warnings.warn(
            f"No `epoch` scalar in {str(path)!r} (not a Lightning run?): rows are indexed by step.", stacklevel=3
        )
        index_name = "step"
    events = []
    for tag in tags:
        for e in acc.Scalars(tag):
            index = locate(e.step, e.wall_time) if locate else int(e.step)
            events.append((e.wall_time, e.step, index, tag, float(e.value)))
    events.sort(key=lambda ev: (ev[0], ev[1]))  # logging order
    return _table_from_records(((index, tag, value) for _, _, index, tag, value in events), index_name, str(path))


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _read_csv(path: Path) -> MetricsTable:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "epoch" in fields:
            index_name = "epoch"
        elif "step" in fields:
            index_name = "step"
        else:
            raise ValueError(f"{str(path)!r} has neither an `epoch` nor a `step` column (columns: {fields}).")
        names = [f for f in fields if f not in _IGNORED_SCALARS]
        records = []
        for row in reader:
            index_text = (row.get(index_name) or "").strip()
            if not index_text:
                continue
            index = int(float(index_text))
            for name in names:
                text = (row.get(name) or "").strip()
                if text:  # sparse rows: an empty cell is "not logged here", "nan" is a logged NaN
                    records.append((index, name, _parse_float(text)))
    table = _table_from_records(records, index_name, str(path))
    for name in names:  # columns that never got a value still exist
        if name not in table.data:
            table.data[name] = np.full(table.epochs.shape, np.nan)
    return table


def load_metrics(path: PathLike, format: SourceFormat = "auto") -> MetricsTable:
    """Read a run's scalar metrics into a per-epoch :class:`MetricsTable`.

    Args:
        path: TensorBoard log directory or event file, a Lightning ``CSVLogger`` ``metrics.csv``
            (or its directory), or a directory above exactly one run (see :func:`find_run`).
        format: ``"auto"`` (TensorBoard preferred), ``"tensorboard"`` or ``"csv"``.

    TensorBoard: every scalar tag is read in full (``size_guidance`` 0) and each value is
    assigned to the epoch Lightning logged with it (its ``epoch`` scalar at the same step).
    CSV: rows are sparse (one ``log_metrics`` call each); per epoch the last non-empty cell of
    each column is kept. In both cases the last value logged in an epoch wins (e.g.
    ``train_loss_step``: the epoch's last step), and ``epoch``, ``step`` and ``hp_metric`` are
    not metrics.
    """
    kind, where = find_run(path, format)
    return _read_tensorboard(where) if kind == "tensorboard" else _read_csv(where)


# ============================================================================================
# Density histograms
# ============================================================================================


@dataclass
class DensityHistory:
    """The logged Hessian eigenvalue densities, one per epoch.

    Attributes:
        epochs: Epoch of each density (``int64``).
        grids: Eigenvalue grid of each epoch (the histogram's bucket limits).
        counts: Number of eigenvalues per grid cell (``density * spacing * num_params``).
        num_params: Number of parameters (eigenvalues) of each epoch's Hessian.
        tag: The TensorBoard tag read.
    """

    epochs: np.ndarray
    grids: list[np.ndarray]
    counts: list[np.ndarray]
    num_params: np.ndarray
    tag: str = "hessian/eigenvalue_density"

    def __len__(self) -> int:
        return len(self.epochs)

    def densities(self) -> list[np.ndarray]:
        r"""Density per unit eigenvalue on each grid: :math:`\phi = \text{count}/(\Delta t\cdot n)`."""
        out = []
        for grid, counts, n in zip(self.grids, self.counts, self.num_params, strict=False):
            spacing = np.gradient(grid) if grid.size > 1 else np.ones_like(grid)
            out.append(counts / (np.where(spacing > 0, spacing, np.inf) * max(float(n), 1.0)))
        return out

    def on_common_grid(self, num: int = 400) -> tuple[np.ndarray, np.ndarray]:
        """All densities interpolated onto one grid spanning every epoch's: ``(grid, [epochs, num])``."""
        lo = min(float(g.min()) for g in self.grids)
        hi = max(float(g.max()) for g in self.grids)
        grid = np.linspace(lo, hi, num)
        matrix = np.stack(
            [np.interp(grid, g, d, left=0.0, right=0.0) for g, d in zip(self.grids, self.densities(), strict=False)]
        )
        return grid, matrix


def load_density(path: PathLike, tag: str = "hessian/eigenvalue_density") -> DensityHistory:
    """Read the eigenvalue-density histograms logged by ``HessianMonitor`` (TensorBoard only).

    Raises:
        ValueError: The run has no TensorBoard event files, or no histogram ``tag``.
    """
    kind, where = find_run(path, "auto")
    if kind != "tensorboard":
        raise ValueError(f"Density histograms are only in TensorBoard event files; {str(where)!r} is a CSV log.")
    acc = _accumulator(where)
    available = acc.Tags().get("histograms", [])
    if tag not in available:
        raise ValueError(f"No histogram {tag!r} in {str(where)!r} (histograms: {', '.join(available) or 'none'}).")
    locate = _epoch_locator(acc)
    per_epoch: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
    for event in acc.Histograms(tag):  # logging order: the last one of an epoch wins
        epoch = locate.next_flush(event.wall_time) if locate else int(event.step)
        value = event.histogram_value
        per_epoch[epoch] = (
            np.asarray(value.bucket_limit, dtype=np.float64),
            np.asarray(value.bucket, dtype=np.float64),
            float(value.num),
        )
    epochs = sorted(per_epoch)
    return DensityHistory(
        epochs=np.array(epochs, dtype=np.int64),
        grids=[per_epoch[e][0] for e in epochs],
        counts=[per_epoch[e][1] for e in epochs],
        num_params=np.array([per_epoch[e][2] for e in epochs]),
        tag=tag,
    )


# ============================================================================================
# Distributions (no SciPy): regularised incomplete beta, t and F tail probabilities
# ============================================================================================

_CF_MAX_ITER = 100_000
_CF_EPS = 1e-16
_CF_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _CF_TINY else _CF_TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    warnings.warn(
        f"Incomplete beta continued fraction did not converge (a={a}, b={b}, x={x}).", RuntimeWarning, stacklevel=3
    )
    return h


def _betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    r"""Regularised incomplete beta :math:`I_x(a, b)`; ``y = 1 - x`` may be given exactly."""
    if not (a > 0 and b > 0):
        raise ValueError(f"_betainc needs a, b > 0, got a={a}, b={b}.")
    if math.isnan(x):
        return math.nan
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _t_two_sided_pvalue(t: float, dof: float) -> float:
    r""":math:`P(|T_\nu| \ge |t|) = I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`."""
    if math.isnan(t) or dof <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return _betainc(0.5 * dof, 0.5, dof / (dof + t2), t2 / (dof + t2))


def _f_sf(f: float, dfn: float, dfd: float) -> float:
    r""":math:`P(F_{d_1,d_2} \ge f) = I_{d_2/(d_2+d_1 f)}(d_2/2, d_1/2)`."""
    if math.isnan(f) or dfn <= 0 or dfd <= 0:
        return math.nan
    if math.isinf(f):
        return 0.0 if f > 0 else 1.0
    if f <= 0:
        return 1.0
    denom = dfd + dfn * f
    return _betainc(0.5 * dfd, 0.5 * dfn, dfd / denom, dfn * f / denom)


# ============================================================================================
# OLS
# ============================================================================================


def _stars(p: float) -> str:
    if not math.isfinite(p):
        return ""
    return "***" if p < 0.01 else "**" if p < 0.05 else "*" if p < 0.1 else ""


def _fmt(value: float, digits: int = 4) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


@dataclass(frozen=True)
class OLSResult:
    r"""An ordinary-least-squares fit :math:`y = X\beta + \varepsilon` (statsmodels' definitions).

    Attributes:
        dependent: Name of the dependent variable.
        names: Parameter names, in design-matrix order (``"const"`` first when added).
        params, bse, tvalues, pvalues: Coefficients :math:`\hat\beta`, standard errors
            :math:`\sqrt{\hat\sigma^2 [(X^\top X)^{-1}]_{jj}}` with
            :math:`\hat\sigma^2 = \mathrm{SSR}/(n-k)`, t statistics and two-sided p-values
            (Student t with :math:`n-k` degrees of freedom), by name.
        cov_params: :math:`\hat\sigma^2 (X^\top X)^{-1}`, in ``names`` order.
        nobs, df_model, df_resid: :math:`n` (complete rows), :math:`k - k_{const}`, :math:`n - k`.
        rsquared, rsquared_adj: :math:`R^2 = 1 - \mathrm{SSR}/\mathrm{TSS}` (TSS centred with a
            constant, uncentred without) and :math:`1 - \frac{n - k_{const}}{n-k}(1-R^2)`.
        fvalue, f_pvalue: :math:`F = \frac{(\mathrm{TSS}-\mathrm{SSR})/\mathrm{df_{model}}}
            {\mathrm{SSR}/\mathrm{df_{resid}}}` (all slopes zero) and its upper tail probability.
        llf: Gaussian log-likelihood :math:`-\frac n2(\log 2\pi + \log(\mathrm{SSR}/n) + 1)`.
        aic, bic: :math:`-2\,\mathrm{llf} + 2k` and :math:`-2\,\mathrm{llf} + k\log n`.
        ssr: Sum of squared residuals.
        resid, fitted: Residuals and fitted values of the complete rows.
    """

    dependent: str
    names: tuple[str, ...]
    params: dict[str, float]
    bse: dict[str, float]
    tvalues: dict[str, float]
    pvalues: dict[str, float]
    cov_params: np.ndarray
    nobs: int
    df_model: int
    df_resid: int
    rsquared: float
    rsquared_adj: float
    fvalue: float
    f_pvalue: float
    llf: float
    aic: float
    bic: float
    ssr: float
    resid: np.ndarray = field(repr=False)
    fitted: np.ndarray = field(repr=False)

    def conf_int(self, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
        """Two-sided ``1 - alpha`` confidence intervals of the coefficients (Student t)."""
        if not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
        q = student_t_quantile(1 - alpha / 2, self.df_resid)
        return {n: (self.params[n] - q * self.bse[n], self.params[n] + q * self.bse[n]) for n in self.names}

    def as_dict(self) -> dict[str, object]:
        """Plain-Python summary (JSON-serialisable)."""
        return {
            "dependent": self.dependent,
            "params": dict(self.params),
            "bse": dict(self.bse),
            "tvalues": dict(self.tvalues),
            "pvalues": dict(self.pvalues),
            "nobs": self.nobs,
            "df_model": self.df_model,
            "df_resid": self.df_resid,
            "rsquared": self.rsquared,
            "rsquared_adj": self.rsquared_adj,
            "fvalue": self.fvalue,
            "f_pvalue": self.f_pvalue,
            "llf": self.llf,
            "aic": self.aic,
            "bic": self.bic,
        }

    def summary(self, digits: int = 4) -> str:
        """A one-column regression table in the style of the paper's Table 1."""
        return regression_table({self.dependent: self}, digits=digits)


def ols(
    y: Sequence[float] | np.ndarray,
    regressors: Mapping[str, Sequence[float] | np.ndarray],
    add_constant: bool = True,
    *,
    dependent: str = "y",
) -> OLSResult:
    r"""Ordinary least squares of ``y`` on the named ``regressors`` (plus a constant).

    Rows with a NaN or infinite value in ``y`` or any regressor are dropped. The fit uses a QR
    decomposition of the design matrix :math:`X = QR`: :math:`\hat\beta = R^{-1}Q^\top y`,
    :math:`(X^\top X)^{-1} = R^{-1}R^{-\top}`. p-values use the regularised incomplete beta
    function (continued fraction, Numerical Recipes §6.4): two-sided t,
    :math:`I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`, and F, :math:`I_{d_2/(d_2+d_1F)}(d_2/2, d_1/2)`.
    A perfect fit (zero residuals) is not an error: standard errors are 0, t and F infinite,
    p-values 0, the log-likelihood :math:`+\infty` and AIC/BIC :math:`-\infty`.

    Args:
        y: Dependent variable, 1-D.
        regressors: Name -> 1-D array of the same length as ``y``.
        add_constant: Prepend an intercept named ``"const"``.
        dependent: Name of ``y`` in summaries.

    Raises:
        ValueError: Mismatched shapes, no more complete rows than parameters, or collinear regressors.
    """
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.ndim != 1:
        raise ValueError(f"`y` must be 1-D, got shape {y_arr.shape}.")
    if not isinstance(regressors, Mapping):
        raise TypeError(f"`regressors` must be a mapping name -> array, got {type(regressors).__name__}.")
    names: list[str] = []
    columns: list[np.ndarray] = []
    if add_constant:
        if "const" in regressors:
            raise ValueError("`regressors` has a column named 'const'; pass add_constant=False or rename it.")
        names.append("const")
        columns.append(np.ones_like(y_arr))
    for name, values in regressors.items():
        column = np.asarray(values, dtype=np.float64)
        if column.shape != y_arr.shape:
            raise ValueError(f"Regressor {name!r} has shape {column.shape}, expected {y_arr.shape} like `y`.")
        names.append(str(name))
        columns.append(column)
    if not columns:
        raise ValueError("No regressors and no constant: nothing to fit.")
    x_full = np.column_stack(columns)
    keep = np.isfinite(y_arr) & np.all(np.isfinite(x_full), axis=1)
    x_mat, y_vec = x_full[keep], y_arr[keep]
    n, k = x_mat.shape
    if n <= k:
        raise ValueError(f"OLS needs more complete observations than parameters: {n} rows for {k} parameters.")
    rank = int(np.linalg.matrix_rank(x_mat))
    if rank < k:
        raise ValueError(f"The regressors {names} are collinear (rank {rank} < {k} parameters).")

    q, r = np.linalg.qr(x_mat)
    beta = np.linalg.solve(r, q.T @ y_vec)
    r_inv = np.linalg.solve(r, np.eye(k))
    xtx_inv = r_inv @ r_inv.T
    fitted = x_mat @ beta
    resid = y_vec - fitted
    ssr = float(resid @ resid)
    df_resid = n - k
    k_const = 1 if add_constant else 0
    df_model = k - k_const
    scale = ssr / df_resid
    cov = scale * xtx_inv
    bse = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        tvalues = beta / bse
    pvalues = [_t_two_sided_pvalue(float(t), df_resid) for t in tvalues]

    tss = float(((y_vec - y_vec.mean()) ** 2).sum()) if add_constant else float((y_vec**2).sum())
    ess = max(tss - ssr, 0.0)
    rsquared = 1.0 - ssr / tss if tss > 0 else math.nan
    rsquared_adj = 1.0 - (n - k_const) / df_resid * (1.0 - rsquared) if tss > 0 else math.nan
    if df_model == 0:
        fvalue = math.nan
    elif ssr > 0:
        fvalue = (ess / df_model) / scale
    else:
        fvalue = math.inf if ess > 0 else math.nan
    f_pvalue = _f_sf(fvalue, df_model, df_resid)
    llf = -0.5 * n * (math.log(2 * math.pi) + math.log(ssr / n) + 1.0) if ssr > 0 else math.inf
    return OLSResult(
        dependent=dependent,
        names=tuple(names),
        params=dict(zip(names, map(float, beta), strict=True)),
        bse=dict(zip(names, map(float, bse), strict=True)),
        tvalues=dict(zip(names, map(float, tvalues), strict=True)),
        pvalues=dict(zip(names, pvalues, strict=True)),
        cov_params=cov,
        nobs=n,
        df_model=df_model,
        df_resid=df_resid,
        rsquared=rsquared,
        rsquared_adj=rsquared_adj,
        fvalue=fvalue,
        f_pvalue=f_pvalue,
        llf=llf,
        aic=-2.0 * llf + 2.0 * k,
        bic=-2.0 * llf + k * math.log(n),
        ssr=ssr,
        resid=resid,
        fitted=fitted,
    )


def regression_table(results: Mapping[str, OLSResult], digits: int = 4, title: str | None = None) -> str:
    """Several fits side by side, in the layout of the paper's Table 1.

    One column per fit (headed by its key, with the dependent variable underneath), one row per
    coefficient (the constant last): the coefficient with significance stars (``***`` p < 0.01,
    ``**`` p < 0.05, ``*`` p < 0.1) above its standard error in parentheses; then the F-test
    (with stars), AIC, N and R² rows.
    """
    if not results:
        return "(no regression results)"
    keys = list(results)
    params: list[str] = []
    for res in results.values():
        params += [n for n in res.names if n not in params and n != "const"]
    if any("const" in res.names for res in results.values()):
        params.append("const")
    rows: list[list[str]] = [["", *keys], ["dependent", *(results[k].dependent for k in keys)]]
    separators = [len(rows)]
    for name in params:
        coef_row = ["constant" if name == "const" else name]
        se_row = [""]
        for key in keys:
            res = results[key]
            if name in res.params:
                coef_row.append(_fmt(res.params[name], digits) + _stars(res.pvalues[name]))
                se_row.append(f"({_fmt(res.bse[name], digits)})")
            else:
                coef_row.append("")
                se_row.append("")
        rows += [coef_row, se_row]
    separators.append(len(rows))
    rows.append(["F-test", *(_fmt(results[k].fvalue, digits) + _stars(results[k].f_pvalue) for k in keys)])
    rows.append(["AIC", *(_fmt(results[k].aic, digits) for k in keys)])
    rows.append(["N", *(str(results[k].nobs) for k in keys)])
    rows.append(["R²", *(f"{results[k].rsquared:.3f}" for k in keys)])
    rows.append(["adj. R²", *(f"{results[k].rsquared_adj:.3f}" for k in keys)])
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = [title, rule] if title else [rule]
    for i, row in enumerate(rows):
        if i in separators:
            lines.append(rule)
        lines.append(
            "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=False))])
        )
    lines.append(rule)
    lines.append("Note: *** p<0.01; ** p<0.05; * p<0.1. Standard errors in parentheses.")
    return "\n".join(lines)


# ============================================================================================
# The paper's curvature regressions
# ============================================================================================


class CurvatureRegressions(dict):
    """``dict`` key -> :class:`OLSResult` of the fitted models, plus ``skipped``: key -> reason."""

    def __init__(
        self, results: Mapping[str, OLSResult], skipped: Mapping[str, str], available: Sequence[str] = ()
    ) -> None:
        super().__init__(results)
        self.skipped: dict[str, str] = dict(skipped)
        self.available: list[str] = list(available)

    def summary(self, digits: int = 4) -> str:
        """Table 1-style table of the fitted models, then one line per skipped model."""
        parts = []
        if self:
            parts.append(regression_table(self, digits=digits, title="OLS regressions of per-epoch changes (Table 1)"))
        for key, reason in self.skipped.items():
            parts.append(f"skipped {key}: {reason}")
        if any(reason.startswith("missing column") for reason in self.skipped.values()):
            parts.append(f"available metrics: {', '.join(self.available) or 'none'}")
        return "\n".join(parts) if parts else "(nothing to fit)"


def _changes(tables: Sequence[MetricsTable], columns: Sequence[str], scales: Sequence[float]) -> list[np.ndarray]:
    """Per-run first differences over the rows where every column is finite, pooled over runs."""
    pooled: list[list[np.ndarray]] = [[] for _ in columns]
    for table in tables:
        values = [table.column(c) * s for c, s in zip(columns, scales, strict=True)]
        complete = np.all(np.isfinite(np.stack(values)), axis=0)
        for i, column in enumerate(values):
            pooled[i].append(np.diff(column[complete]))
    return [np.concatenate(parts) if parts else np.empty(0) for parts in pooled]


def curvature_regressions(
    tables: MetricsTable | Sequence[MetricsTable],
    *,
    test_acc: str = "test/acc",
    ood_acc: str = "ood/acc",
    top_eigenvalue: str = "hessian/top_eigenvalue",
    val_acc: str = "val/acc",
    accuracy_scale: float = 1.0,
    warn: bool = True,
) -> CurvatureRegressions:
    r"""The four OLS models of Alabdulkareem (NeurIPS 2022), §4.2 / Table 1.

    On per-epoch changes :math:`\Delta z_t = z_t - z_{t-1}`:

    ===================  ==============================================================
    key                  model
    ===================  ==============================================================
    ``test~maxeig``      :math:`\Delta\mathrm{test} = \beta_0 + \beta_1\Delta\lambda_{max}`
    ``test~maxeig+val``  :math:`\Delta\mathrm{test} = \beta_0 + \beta_1\Delta\lambda_{max} + \beta_2\Delta\mathrm{val}`
    ``ood~maxeig``       :math:`\Delta\mathrm{ood} = \beta_0 + \beta_1\Delta\lambda_{max}`
    ``ood~maxeig+val``   :math:`\Delta\mathrm{ood} = \beta_0 + \beta_1\Delta\lambda_{max} + \beta_2\Delta\mathrm{val}`
    ===================  ==============================================================

    The paper's finding: with :math:`\Delta\mathrm{val}` in the model, :math:`\Delta\lambda_{max}`
    stops being significant for the in-distribution test accuracy but stays significant
    (negative) for the OOD one. For each model, the rows where all its columns are logged are
    differenced per run (so with a Hessian every ``k`` epochs the changes span ``k`` epochs),
    and the changes of several runs are pooled (the paper pools 1,470 epochs of many runs);
    runs are never differenced across.

    Args:
        tables: One run's :class:`MetricsTable`, or several runs' to pool.
        test_acc: Column of the (in-distribution) test accuracy.
        ood_acc: Column of the OOD test accuracy (e.g. :class:`~lightning_hessian.callbacks.NoisyInputAccuracy`).
        top_eigenvalue: Column of :math:`\lambda_{max}`.
        val_acc: Column of the validation accuracy.
        accuracy_scale: Multiplies the accuracies (100: percent, as in the paper).
        warn: Emit a ``UserWarning`` listing the skipped models.

    Returns:
        The fitted models by key; models whose columns are missing (or that have too few
        changes) are left out with the reason in ``.skipped``.
    """
    table_list = [tables] if isinstance(tables, MetricsTable) else list(tables)
    if not table_list or not all(isinstance(t, MetricsTable) for t in table_list):
        raise TypeError("`tables` must be a MetricsTable or a non-empty sequence of them.")
    if (
        isinstance(accuracy_scale, bool)
        or not isinstance(accuracy_scale, (int, float))
        or not math.isfinite(accuracy_scale)
        or accuracy_scale <= 0
    ):
        raise ValueError(f"`accuracy_scale` must be a positive finite number, got {accuracy_scale!r}.")
    specs = [
        ("test~maxeig", test_acc, [top_eigenvalue]),
        ("test~maxeig+val", test_acc, [top_eigenvalue, val_acc]),
        ("ood~maxeig", ood_acc, [top_eigenvalue]),
        ("ood~maxeig+val", ood_acc, [top_eigenvalue, val_acc]),
    ]
    accuracies = {test_acc, ood_acc, val_acc}
    available = sorted({n for t in table_list for n in t.names})
    results: dict[str, OLSResult] = {}
    skipped: dict[str, str] = {}
    for key, dep, regs in specs:
        columns = [dep, *regs]
        missing = sorted({c for c in columns for t in table_list if c not in t})
        if missing:
            skipped[key] = f"missing column(s) {', '.join(repr(m) for m in missing)}"
            continue
        scales = [accuracy_scale if c in accuracies else 1.0 for c in columns]
        changes = _changes(table_list, columns, scales)
        try:
            results[key] = ols(
                changes[0], {f"Δ {c}": v for c, v in zip(regs, changes[1:], strict=True)}, dependent=f"Δ {dep}"
            )
        except ValueError as err:
            skipped[key] = str(err)
    if skipped and warn:
        warnings.warn(
            "curvature_regressions skipped "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            + f" (available metrics: {', '.join(available) or 'none'})",
            UserWarning,
            stacklevel=2,
        )
    return CurvatureRegressions(results, skipped, available)
