"""Ordinary least squares with the statistics of a regression table (statsmodels' definitions), and
the side-by-side table (:func:`regression_table`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_hessian._utils.stats import student_t_quantile
from lightning_hessian.analysis._distributions import _f_sf, _t_two_sided_pvalue

__all__ = ["OLSResult", "ols", "regression_table"]


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


def _design(
    y: Sequence[float] | np.ndarray, regressors: Mapping[str, Sequence[float] | np.ndarray], add_constant: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The design matrix and ``y`` on the complete rows, and the column names (checked)."""
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
    return x_mat, y_vec, names


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
    x_mat, y_vec, names = _design(y, regressors, add_constant)
    n, k = x_mat.shape

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
