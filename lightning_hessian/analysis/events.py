"""Event-file and CSV IO: find a run's logs, read its scalars (:func:`load_metrics`) and its density
histograms (:func:`load_density`)."""

from __future__ import annotations

import bisect
import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_hessian.analysis.tables import (
    _IGNORED_SCALARS,
    MetricsTable,
    PathLike,
    SourceFormat,
    _table_from_records,
)

__all__ = ["DensityHistory", "find_run", "load_density", "load_metrics"]


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
