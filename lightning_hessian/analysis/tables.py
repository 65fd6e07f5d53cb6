"""The per-epoch metrics table of a run (:class:`MetricsTable`), read from its logs by :mod:`.events`."""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["MetricsTable", "PathLike", "SourceFormat"]

PathLike = str | Path
SourceFormat = Literal["auto", "tensorboard", "csv"]

#: Scalars that are bookkeeping, not metrics.
_IGNORED_SCALARS = frozenset({"epoch", "step", "hp_metric"})


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
