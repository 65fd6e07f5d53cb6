"""Command line: ``python -m lightning_hessian plot|regress|table`` on a real run's logs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_hessian.analysis import MetricsTable, load_metrics
from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.callbacks.noisy_accuracy import NoisyInputAccuracy
from lightning_hessian.cli import main, plot_run
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _ValModule(DigitsModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    """A real 2-epoch run with HessianMonitor and NoisyInputAccuracy, logged to TensorBoard."""
    root = tmp_path_factory.mktemp("cli_run")
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name="tb")
    callbacks = [HessianMonitor(num_runs=2, num_steps=8, analysis_fraction=0.25), NoisyInputAccuracy()]
    trainer = pl.Trainer(
        callbacks=callbacks, **trainer_kwargs(max_epochs=2, logger=logger, num_sanity_val_steps=0, log_every_n_steps=1)
    )
    trainer.fit(_ValModule(hidden=16), digits_loader(limit=192), digits_loader(limit=96, shuffle=False))
    return Path(logger.log_dir)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_subprocess_writes_valid_pngs(tb_run: Path, tmp_path: Path):
    out = tmp_path / "plots"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "TkAgg"}  # the CLI must pick Agg itself
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_hessian", "plot", str(tb_run), "--out", str(out), "--dpi", "80"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("curves.png", "accuracy.png", "loss.png", "density.png"):
        path = out / name
        assert path.is_file() and f"wrote {path}" in proc.stdout
        width, height = _png_size(path)
        assert width >= 300 and height >= 200
        assert path.stat().st_size > 10_000  # non-trivial content, not an empty canvas
    assert not (out / "volume.png").exists() and "skipped volume.png: no volume/* metrics" in proc.stdout


def test_table_prints_the_per_epoch_metrics(tb_run: Path, tmp_path: Path, capsys):
    csv_path = tmp_path / "table.csv"
    assert main(["table", str(tb_run), "--csv", str(csv_path)]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0].split()
    assert header[0] == "epoch"
    assert {"val/acc", "ood/acc", "hessian/trace", "hessian/top_eigenvalue", "hessian/min_eigenvalue"} <= set(header)
    assert [line.split()[0] for line in captured.out.splitlines()[1:]] == ["0", "1"]
    assert f"wrote {csv_path}" in captured.err
    written = load_metrics(csv_path)
    original = load_metrics(tb_run)
    np.testing.assert_array_equal(written.epochs, [0, 1])
    np.testing.assert_allclose(written.column("ood/acc"), original.column("ood/acc"), rtol=1e-12)

    assert main(["table", str(tb_run), "--columns", "val/acc", "ood/acc"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["epoch", "val/acc", "ood/acc"]


def _synthetic_csv_run(path: Path, n_epochs: int = 40) -> Path:
    rng = np.random.default_rng(0)
    lam = 5 + np.cumsum(rng.normal(size=n_epochs))
    val = np.cumsum(rng.normal(0.01, 0.02, size=n_epochs))
    test = val + 0.01 * rng.normal(size=n_epochs)
    ood = 0.8 * val - 0.002 * lam + 0.01 * rng.normal(size=n_epochs)
    data = {
        "hessian/top_eigenvalue": lam,
        "val/acc": val,
        "test/acc": test,
        "ood/acc": ood,
        "hessian/trace": 50 + 3 * lam,
    }
    return MetricsTable(np.arange(n_epochs), data).to_csv(path / "metrics.csv")


def test_regress_prints_the_four_models(tmp_path: Path, capsys):
    run = _synthetic_csv_run(tmp_path)
    assert main(["regress", str(run), "--accuracy-scale", "100"]) == 0
    out = capsys.readouterr().out
    for token in (
        "test~maxeig",
        "test~maxeig+val",
        "ood~maxeig",
        "ood~maxeig+val",
        "Δ test/acc",
        "Δ ood/acc",
        "Δ hessian/top_eigenvalue",
        "Δ val/acc",
        "constant",
        "F-test",
        "AIC",
        "N",
        "Note: *** p<0.01",
    ):
        assert token in out, token
    assert main(["regress", str(run), str(run), "--json"]) == 0  # two runs pooled
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["results"]) == {"test~maxeig", "test~maxeig+val", "ood~maxeig", "ood~maxeig+val"}
    assert payload["results"]["ood~maxeig+val"]["nobs"] == 2 * 39 and payload["skipped"] == {}

    renamed = ["--test-acc", "val/acc", "--ood-acc", "nope/acc"]
    assert main(["regress", str(run), *renamed]) == 0
    out = capsys.readouterr().out
    assert "skipped ood~maxeig: missing column(s) 'nope/acc'" in out and "available metrics:" in out


def test_regress_on_a_short_real_run_explains_what_is_missing(tb_run: Path, capsys):
    assert main(["regress", str(tb_run)]) == 1  # nothing could be fitted
    out = capsys.readouterr().out
    assert "skipped test~maxeig: missing column(s) 'test/acc'" in out
    assert "skipped ood~maxeig: OLS needs more complete observations" in out  # 2 epochs: one change


def test_plot_run_on_a_csv_log_leaves_the_backend_alone(tmp_path: Path):
    import matplotlib

    backend = matplotlib.get_backend()
    table = load_metrics(_synthetic_csv_run(tmp_path))
    n = len(table)
    table.data.update(
        {
            "hessian/trace_stderr": np.full(n, 2.0),
            "hessian/trace_sharp_drop_epoch": np.where(np.arange(n) > 20, 15.0, np.nan),
            "volume/log_volume": -np.arange(n, dtype=float),
            "volume/log_radius_mean": np.linspace(-3, -2, n),
            "volume/log_radius_std": np.full(n, 0.1),
            "volume/seconds": np.ones(n),
        }
    )
    run = table.to_csv(tmp_path / "rich" / "metrics.csv")
    written = plot_run(run, tmp_path / "plots", dpi=60)
    assert matplotlib.get_backend() == backend
    for name in ("curves.png", "accuracy.png", "volume.png"):
        assert isinstance(written[name], Path) and _png_size(written[name])[0] > 0
    assert written["density.png"] == "density histograms are only in TensorBoard logs"
    assert written["loss.png"] == "no *loss* metrics"


def _curve_axes(table: MetricsTable, monkeypatch) -> dict[str, object]:
    """The axes of curves.png, by panel title (the figure is caught before it is saved)."""
    import lightning_hessian.analysis.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: figures.append(fig) or path)
    assert plots._plot_curves(table, "hessian/", Path("unused.png"), 60) is not None
    (fig,) = figures
    return {ax.get_title(): ax for ax in fig.get_axes()}


def test_curve_panels_have_y_labels_and_the_trace_band_is_the_logged_95_interval(tmp_path: Path, monkeypatch):
    n = 6
    trace = np.linspace(40.0, 10.0, n)
    data = {
        "hessian/trace": trace,
        "hessian/trace_stderr": np.full(n, 1.0),
        "hessian/trace_ci_low": trace - 4.3,  # 3 runs: ±4.30 stderr, not ±1
        "hessian/trace_ci_high": trace + 4.3,
        "hessian/top_eigenvalue": np.linspace(5.0, 2.0, n),
        "hessian/min_eigenvalue": np.linspace(-0.2, -0.01, n),
        "hessian/negative_mass": np.linspace(0.1, 0.01, n),
    }
    axes = _curve_axes(MetricsTable(np.arange(n), data), monkeypatch)
    assert set(axes) == {"trace", "top eigenvalue", "smallest eigenvalue", "negative mass"}
    assert all(ax.get_ylabel() for ax in axes.values())
    assert axes["trace"].get_ylabel() == "tr(H)"
    (band,) = axes["trace"].collections
    assert band.get_label().startswith("95 % interval (Student-t")
    legend = [t.get_text() for t in axes["trace"].get_legend().get_texts()]
    assert band.get_label() in legend
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(trace.min() - 4.3) and high == pytest.approx(trace.max() + 4.3)

    # an older log without the interval: the band is ±1 stderr and says so
    for name in ("hessian/trace_ci_low", "hessian/trace_ci_high"):
        del data[name]
    axes = _curve_axes(MetricsTable(np.arange(n), data), monkeypatch)
    (band,) = axes["trace"].collections
    assert "not a 95 % interval" in band.get_label()
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(trace.max() + 1.0)


def test_errors_and_help(tmp_path: Path, capsys, monkeypatch):
    assert main(["table", str(tmp_path / "missing")]) == 1
    assert "lightning_hessian table: error: No such file" in capsys.readouterr().err
    assert main(["table", str(_synthetic_csv_run(tmp_path)), "--columns", "val/ac"]) == 1
    assert "Did you mean 'val/acc'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("plot", "regress", "table"))
    with pytest.raises(SystemExit) as exit_info:
        main(["plot"])  # RUN_DIR missing
    assert exit_info.value.code == 2

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", str(tmp_path)]) == 1
    assert 'python -m pip install ".[plot]"' in capsys.readouterr().err
