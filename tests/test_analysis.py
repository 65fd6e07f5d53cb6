"""analysis: OLS against exact least squares and SciPy, the paper's regressions, log readers."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_hessian.analysis import (
    CurvatureRegressions,
    MetricsTable,
    curvature_regressions,
    find_run,
    load_density,
    load_metrics,
    ols,
    regression_table,
)
from lightning_hessian.analysis._distributions import _betainc, _f_sf, _t_two_sided_pvalue
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


# --------------------------------------------------------------------------------------------
# OLS
# --------------------------------------------------------------------------------------------


def _design(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    x1, x2, x3 = rng.normal(size=(3, n))
    y = 2.0 + 3.0 * x1 - 1.0 * x2 + 0.0 * x3 + 0.3 * rng.normal(size=n)
    return y, {"x1": x1, "x2": x2, "x3": x3}


def test_ols_matches_exact_least_squares_and_scipy():
    y, regs = _design()
    res = ols(y, regs, dependent="y")
    x = np.column_stack([np.ones_like(y), regs["x1"], regs["x2"], regs["x3"]])
    n, k = x.shape
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    ssr = float(resid @ resid)
    cov = ssr / (n - k) * np.linalg.inv(x.T @ x)
    se = np.sqrt(np.diag(cov))
    t = beta / se

    assert res.names == ("const", "x1", "x2", "x3")
    np.testing.assert_allclose([res.params[n_] for n_ in res.names], beta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose([res.params["const"], res.params["x1"], res.params["x2"]], [2, 3, -1], atol=0.1)
    np.testing.assert_allclose([res.bse[n_] for n_ in res.names], se, rtol=1e-10)
    np.testing.assert_allclose([res.tvalues[n_] for n_ in res.names], t, rtol=1e-10)
    np.testing.assert_allclose(
        [res.pvalues[n_] for n_ in res.names], 2 * scipy_stats.t.sf(np.abs(t), n - k), rtol=1e-9, atol=1e-300
    )
    assert 0.05 < res.pvalues["x3"] < 1  # the irrelevant regressor is not significant...
    assert res.pvalues["x1"] < 1e-50  # ...the real ones are, to many digits
    np.testing.assert_allclose(res.cov_params, cov, rtol=1e-10)
    np.testing.assert_allclose(res.resid, resid, atol=1e-12)

    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ssr / tss
    f = ((tss - ssr) / (k - 1)) / (ssr / (n - k))
    llf = float(scipy_stats.norm.logpdf(resid, scale=math.sqrt(ssr / n)).sum())
    assert (res.nobs, res.df_model, res.df_resid) == (n, k - 1, n - k)
    assert res.ssr == pytest.approx(ssr, rel=1e-12)
    assert res.rsquared == pytest.approx(r2, rel=1e-12)
    assert res.rsquared_adj == pytest.approx(1 - (1 - r2) * (n - 1) / (n - k), rel=1e-12)
    assert res.fvalue == pytest.approx(f, rel=1e-10)
    assert res.f_pvalue == pytest.approx(scipy_stats.f.sf(f, k - 1, n - k), rel=1e-9, abs=1e-300)
    assert res.llf == pytest.approx(llf, rel=1e-12)
    assert res.aic == pytest.approx(-2 * llf + 2 * k, rel=1e-12)
    assert res.bic == pytest.approx(-2 * llf + k * math.log(n), rel=1e-12)

    q = scipy_stats.t.ppf(0.975, n - k)
    for name, (lo, hi) in res.conf_int(0.05).items():
        assert lo == pytest.approx(res.params[name] - q * res.bse[name], rel=1e-8)
        assert hi == pytest.approx(res.params[name] + q * res.bse[name], rel=1e-8)


def test_ols_without_constant_and_with_missing_rows():
    y, regs = _design(n=50, seed=1)
    y = y.copy()
    y[[3, 10]] = np.nan
    regs["x2"] = regs["x2"].copy()
    regs["x2"][20] = np.inf
    res = ols(y, regs, add_constant=False)
    keep = np.isfinite(y) & np.isfinite(regs["x2"])
    x = np.column_stack([regs[n][keep] for n in ("x1", "x2", "x3")])
    beta, *_ = np.linalg.lstsq(x, y[keep], rcond=None)
    assert res.nobs == 47 and res.names == ("x1", "x2", "x3") and res.df_model == 3
    np.testing.assert_allclose([res.params[n] for n in res.names], beta, rtol=1e-12)
    ssr = float(((y[keep] - x @ beta) ** 2).sum())
    r2_uncentred = 1 - ssr / float((y[keep] ** 2).sum())  # statsmodels' R² without a constant
    assert res.rsquared == pytest.approx(r2_uncentred, rel=1e-12)
    assert res.rsquared_adj == pytest.approx(1 - (1 - r2_uncentred) * 47 / 44, rel=1e-12)


def test_ols_exact_fit_is_handled_gracefully():
    x = np.arange(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ols(1.0 + 2.0 * x, {"x": x})
        const_only = ols(np.full(6, 5.0), {})
        zero = ols(np.zeros(6), {"x": np.arange(6.0)})  # residuals exactly zero
    assert res.params["const"] == pytest.approx(1.0, abs=1e-12)
    assert res.params["x"] == pytest.approx(2.0, abs=1e-12)
    assert res.rsquared == pytest.approx(1.0, abs=1e-12)
    assert res.bse["x"] < 1e-12 and res.pvalues["x"] < 1e-12 and res.f_pvalue < 1e-12
    assert "***" in res.summary()
    assert const_only.params["const"] == pytest.approx(5.0, rel=1e-14) and const_only.ssr < 1e-25
    assert math.isnan(const_only.fvalue) and const_only.df_model == 0  # no slope to test
    assert zero.ssr == 0.0 and zero.bse["x"] == 0.0 and zero.params["x"] == 0.0
    assert math.isnan(zero.tvalues["x"]) and math.isnan(zero.pvalues["x"])  # 0/0: undefined, not an error
    assert zero.llf == math.inf and zero.aic == -math.inf and zero.bic == -math.inf
    assert math.isnan(zero.fvalue) and math.isnan(zero.rsquared)  # no variance to explain
    assert "nan" in zero.summary()


@pytest.mark.parametrize(
    ("y", "regs", "match"),
    [
        (np.ones(2), {"x": np.arange(2.0)}, "more complete observations"),
        (np.array([1.0, 2.0, np.nan]), {"x": np.arange(3.0)}, "2 rows for 2 parameters"),
        (np.arange(5.0), {"x": np.arange(4.0)}, "shape"),
        (np.arange(6.0), {"a": np.arange(6.0), "b": 2 * np.arange(6.0)}, "collinear"),
        (np.arange(6.0), {"const": np.ones(6)}, "const"),
        (np.ones((3, 2)), {}, "1-D"),
    ],
)
def test_ols_errors(y, regs, match):
    with pytest.raises(ValueError, match=match):
        ols(y, regs)


# --------------------------------------------------------------------------------------------
# Distributions without SciPy
# --------------------------------------------------------------------------------------------


def test_incomplete_beta_matches_scipy_and_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(0)
    for a, b, x in zip(rng.uniform(0.1, 800, 60), rng.uniform(0.1, 50, 60), rng.uniform(0, 1, 60), strict=True):
        exact = float(mpmath.betainc(a, b, 0, x, regularized=True))
        assert _betainc(a, b, x) == pytest.approx(exact, rel=1e-11, abs=1e-300)
        if exact > 1e-200:  # SciPy loses accuracy deep in the tail
            assert _betainc(a, b, x) == pytest.approx(float(scipy_special.betainc(a, b, x)), rel=1e-10)
    assert _betainc(2.0, 3.0, 0.0) == 0.0 and _betainc(2.0, 3.0, 1.0) == 1.0


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 30, 1467])
def test_t_pvalues_match_scipy(dof):
    for t in (0.0, 0.05, 0.7, 1.96, 3.5, 12.0, 80.0, -2.5):
        expected = 2 * scipy_stats.t.sf(abs(t), dof)
        assert _t_two_sided_pvalue(t, dof) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert _t_two_sided_pvalue(math.inf, dof) == 0.0 and math.isnan(_t_two_sided_pvalue(math.nan, dof))


@pytest.mark.parametrize(("dfn", "dfd"), [(1, 1), (1, 5), (2, 30), (3, 100), (1, 1468), (2, 1467)])
def test_f_pvalues_match_scipy(dfn, dfd):
    for f in (0.0, 0.01, 0.5, 1.0, 2.7, 10.0, 172.0, 383.0):
        expected = scipy_stats.f.sf(f, dfn, dfd)
        assert _f_sf(f, dfn, dfd) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert _f_sf(math.inf, dfn, dfd) == 0.0


# --------------------------------------------------------------------------------------------
# The paper's regressions
# --------------------------------------------------------------------------------------------


def _synthetic_run(n_epochs: int = 60, seed: int = 0, with_ood: bool = True) -> MetricsTable:
    rng = np.random.default_rng(seed)
    lam = 5 + np.cumsum(rng.normal(size=n_epochs))
    val = np.cumsum(rng.normal(0.5, 1.0, size=n_epochs))
    d_lam, d_val = np.diff(lam), np.diff(val)
    test = np.concatenate(
        [[10.0], 10 + np.cumsum(0.2 - 0.01 * d_lam + 0.95 * d_val + 0.05 * rng.normal(size=n_epochs - 1))]
    )
    ood = np.concatenate([[8.0], 8 + np.cumsum(0.1 - 0.5 * d_lam + 0.7 * d_val + 0.05 * rng.normal(size=n_epochs - 1))])
    data = {"hessian/top_eigenvalue": lam, "val/acc": val, "test/acc": test}
    if with_ood:
        data["ood/acc"] = ood
    return MetricsTable(np.arange(n_epochs), data)


def test_curvature_regressions_are_ols_on_first_differences():
    table = _synthetic_run()
    table.data["hessian/top_eigenvalue"][[7, 30]] = np.nan  # Hessian missing in two epochs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = curvature_regressions(table)
    assert isinstance(results, CurvatureRegressions) and not results.skipped
    assert list(results) == ["test~maxeig", "test~maxeig+val", "ood~maxeig", "ood~maxeig+val"]

    complete = np.isfinite(table.column("hessian/top_eigenvalue"))
    d = {name: np.diff(table.column(name)[complete]) for name in table.names}
    for key, dep in (("test~maxeig+val", "test/acc"), ("ood~maxeig+val", "ood/acc")):
        x = np.column_stack([np.ones(d[dep].size), d["hessian/top_eigenvalue"], d["val/acc"]])
        beta, *_ = np.linalg.lstsq(x, d[dep], rcond=None)
        res = results[key]
        assert res.nobs == 57 and res.dependent == f"Δ {dep}"
        np.testing.assert_allclose(
            [res.params["const"], res.params["Δ hessian/top_eigenvalue"], res.params["Δ val/acc"]], beta, rtol=1e-10
        )
    # the known answer, away from the epochs where the differences span two epochs
    assert results["ood~maxeig+val"].params["Δ hessian/top_eigenvalue"] == pytest.approx(-0.5, abs=0.05)
    assert results["ood~maxeig+val"].pvalues["Δ hessian/top_eigenvalue"] < 0.01
    assert results["test~maxeig+val"].params["Δ val/acc"] == pytest.approx(0.95, abs=0.05)

    text = results.summary()
    for token in (
        "test~maxeig",
        "ood~maxeig+val",
        "Δ hessian/top_eigenvalue",
        "constant",
        "F-test",
        "AIC",
        "N",
        "***",
        "(",
    ):
        assert token in text


def test_curvature_regressions_pool_runs_and_skip_missing_columns():
    runs = [_synthetic_run(seed=1, with_ood=False), _synthetic_run(n_epochs=30, seed=2, with_ood=False)]
    with pytest.warns(UserWarning, match="ood/acc"):
        results = curvature_regressions(runs, accuracy_scale=100.0)
    assert set(results) == {"test~maxeig", "test~maxeig+val"}
    assert set(results.skipped) == {"ood~maxeig", "ood~maxeig+val"}
    assert results.skipped["ood~maxeig"] == "missing column(s) 'ood/acc'"
    assert "available metrics: hessian/top_eigenvalue, test/acc, val/acc" in results.summary()
    # pooled = concatenated per-run differences (never across runs), accuracies x100
    y = np.concatenate([np.diff(r.column("test/acc")) * 100 for r in runs])
    x = np.concatenate([np.diff(r.column("hessian/top_eigenvalue")) for r in runs])
    beta, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(x), x]), y, rcond=None)
    assert results["test~maxeig"].nobs == 59 + 29
    np.testing.assert_allclose(
        [results["test~maxeig"].params[n] for n in ("const", "Δ hessian/top_eigenvalue")], beta, rtol=1e-10
    )
    assert "skipped ood~maxeig" in results.summary()

    short = MetricsTable(
        np.arange(2),
        {"hessian/top_eigenvalue": [1.0, 2.0], "test/acc": [0.1, 0.2], "val/acc": [0.1, 0.3], "ood/acc": [0.0, 0.1]},
    )
    few = curvature_regressions(short, warn=False)
    assert not few and "more complete observations" in few.skipped["test~maxeig"]
    with pytest.raises(ValueError, match="accuracy_scale"):
        curvature_regressions(short, accuracy_scale=0)


def test_regression_table_layout():
    y, regs = _design()
    a = ols(y, {"x1": regs["x1"]})
    b = ols(y, regs)
    text = regression_table({"only x1": a, "all": b}, title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[2].split() == ["only", "x1", "all"]
    labels = [line.split()[0] for line in lines if line and not line.startswith(("-", " ", "T", "Note"))]
    assert labels[:5] == ["dependent", "x1", "x2", "x3", "constant"]  # the constant last, as in Table 1
    assert lines[-1].startswith("Note: *** p<0.01")
    assert f"({a.bse['x1']:.4g})" in text


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def test_synthetic_sparse_metrics_csv(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train_loss_step,val/acc,hessian/trace,hessian/trace_sharp_drop_epoch,never\n"
        "0,0,2.0,,,,\n"
        "0,1,1.5,,,,\n"
        "0,1,,0.25,,,\n"
        "0,1,,,10.0,nan,\n"
        "1,2,1.2,,,,\n"
        "1,3,,0.5,,,\n"
        "1,3,,0.55,,,\n"  # a second value in the same epoch: the last one wins
        "3,7,,0.75,12.5,2,\n"  # epoch 2 was not logged at all
    )
    table = load_metrics(path)
    assert table.index_name == "epoch" and table.source == str(path)
    np.testing.assert_array_equal(table.epochs, [0, 1, 3])
    assert table.names == sorted(
        ["train_loss_step", "val/acc", "hessian/trace", "hessian/trace_sharp_drop_epoch", "never"]
    )
    np.testing.assert_array_equal(table.column("train_loss_step"), [1.5, 1.2, np.nan])
    np.testing.assert_array_equal(table.column("val/acc"), [0.25, 0.55, 0.75])
    np.testing.assert_array_equal(table.column("hessian/trace"), [10.0, np.nan, 12.5])
    np.testing.assert_array_equal(table.column("hessian/trace_sharp_drop_epoch"), [np.nan, np.nan, 2.0])
    assert np.isnan(table.column("never")).all()
    assert load_metrics(tmp_path).names == table.names  # the directory works too
    with pytest.raises(KeyError, match="val/acc"):
        table.column("val/ac")

    # round trip through to_csv (NaN as empty cells)
    again = load_metrics(table.to_csv(tmp_path / "out" / "table.csv"))
    np.testing.assert_array_equal(again.epochs, table.epochs)
    for name in table.names:
        np.testing.assert_array_equal(again.column(name), table.column(name))
    text = table.to_string()
    assert text.splitlines()[0].split()[0] == "epoch" and "0.55" in text

    steps_only = tmp_path / "steps.csv"
    steps_only.write_text("step,loss\n0,1.0\n5,0.5\n")
    table = load_metrics(steps_only)
    assert table.index_name == "step"
    np.testing.assert_array_equal(table.epochs, [0, 5])


class _LoggingModule(DigitsModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def on_train_epoch_end(self):
        self.log("custom/metric", 1.5 * self.current_epoch + 0.25)


class _Recorder(Callback):
    def __init__(self):
        self.val_acc: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def test_tensorboard_and_csv_readers_on_a_real_run(tmp_path: Path):
    pl.seed_everything(0, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    recorder = _Recorder()
    trainer = pl.Trainer(
        callbacks=[recorder], **trainer_kwargs(max_epochs=3, logger=[tb, csv_logger], log_every_n_steps=1)
    )
    trainer.fit(_LoggingModule(hidden=16), digits_loader(limit=192), digits_loader(limit=96, shuffle=False))

    tb_table = load_metrics(tb.log_dir)
    csv_table = load_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    for table in (tb_table, csv_table):
        np.testing.assert_array_equal(table.epochs, [0, 1, 2])
        assert {"val/acc", "custom/metric", "train_loss_step", "train_loss_epoch"} <= set(table.names)
        assert not {"epoch", "step", "hp_metric"} & set(table.names)
        np.testing.assert_allclose(table.column("val/acc"), recorder.val_acc, rtol=1e-6)
        np.testing.assert_allclose(table.column("custom/metric"), [0.25, 1.75, 3.25], rtol=1e-6)
    for name in ("train_loss_step", "train_loss_epoch"):
        np.testing.assert_allclose(tb_table.column(name), csv_table.column(name), rtol=1e-6)

    # the root holds one TensorBoard run and one CSV run: TensorBoard is preferred unless asked
    assert find_run(tmp_path) == ("tensorboard", Path(tb.log_dir))
    assert find_run(tmp_path, format="csv") == ("csv", Path(csv_logger.log_dir) / "metrics.csv")
    with pytest.raises(ValueError, match="CSV"):
        load_density(tmp_path / "csv")
    with pytest.raises(ValueError, match="No histogram"):
        load_density(tb.log_dir)


def test_find_run_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        find_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"No TensorBoard event files or metrics\.csv"):
        find_run(tmp_path)
    for version in ("version_0", "version_1"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "metrics.csv").write_text("epoch,a\n0,1\n")
    with pytest.raises(ValueError, match="Several runs"):
        find_run(tmp_path)
    with pytest.raises(ValueError, match="format"):
        find_run(tmp_path, format="json")  # type: ignore[arg-type]


def test_load_density_from_raw_histograms(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    grid = np.linspace(-1.0, 4.0, 51)
    n = 1000
    step = 0
    for epoch in range(3):
        for _ in range(4):  # training steps
            writer.add_scalar("epoch", epoch, step)
            step += 1
        density = np.exp(-0.5 * ((grid - epoch) / 0.3) ** 2) / (0.3 * math.sqrt(2 * math.pi))
        counts = density * (grid[1] - grid[0]) * n
        # like HessianMonitor: at the step of the epoch's scalars, before the epoch's flush
        writer.add_histogram_raw(
            "hessian/eigenvalue_density",
            min=-1.0,
            max=4.0,
            num=n,
            sum=0.0,
            sum_squares=0.0,
            bucket_limits=grid.tolist(),
            bucket_counts=counts.tolist(),
            global_step=step - 1,
        )
        writer.add_scalar("hessian/trace", float(epoch), step - 1)
        writer.add_scalar("epoch", epoch, step - 1)
    writer.close()

    history = load_density(tmp_path)
    np.testing.assert_array_equal(history.epochs, [0, 1, 2])
    np.testing.assert_array_equal(history.num_params, [n, n, n])
    for epoch, (g, d) in enumerate(zip(history.grids, history.densities(), strict=False)):
        np.testing.assert_allclose(g, grid, rtol=1e-6)
        assert g[np.argmax(d)] == pytest.approx(epoch, abs=0.1)
        assert float(d.sum() * (g[1] - g[0])) == pytest.approx(1.0, rel=1e-3)
    common, matrix = history.on_common_grid(num=101)
    assert matrix.shape == (3, 101) and common[0] == pytest.approx(-1.0) and common[-1] == pytest.approx(4.0)
    np.testing.assert_array_equal(load_metrics(tmp_path).column("hessian/trace"), [0.0, 1.0, 2.0])
