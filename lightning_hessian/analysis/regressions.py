r"""The paper's curvature regressions (Alabdulkareem, NeurIPS 2022, §4.2 / Table 1) on per-epoch
changes of a run's metrics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from lightning_hessian.analysis.ols import OLSResult, ols, regression_table
from lightning_hessian.analysis.tables import MetricsTable

__all__ = ["CurvatureRegressions", "curvature_regressions"]


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
