"""Density and log-radius histograms reach W&B and MLflow (real packages, offline), not only TensorBoard."""

from __future__ import annotations

import itertools
import json
import math
import struct
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._logging import (
    WANDB_MAX_BINS,
    Histogram,
    density_histogram,
)
from lightning_hessian.estimators.density import spectral_density
from lightning_hessian.operators import MatrixOperator
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs

EPOCHS = 2


def _monitors():
    hessian = HessianMonitor(num_runs=2, num_steps=8, detect_sharp_drop=False)
    volume = LocalVolumeMonitor(num_directions=6, preconditioner=None)
    return hessian, volume


def _fit(logger, monitors):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=list(monitors), **trainer_kwargs(logger=logger, max_epochs=EPOCHS))
    trainer.fit(DigitsModule(hidden=8), digits_loader(limit=200))
    return trainer


# --------------------------------------------------------------------------------------------
# The histogram itself
# --------------------------------------------------------------------------------------------


def test_density_histogram_counts_eigenvalues_and_coarsens_for_wandb():
    eigenvalues = torch.cat([torch.linspace(-1.0, 1.0, 40), torch.tensor([5.0, 9.0])]).double()
    op = MatrixOperator(torch.diag(eigenvalues))
    sd = spectral_density(op, num_runs=4, num_steps=42, seed=0)
    hist = density_histogram(sd)
    assert len(hist.edges) == len(hist.counts) + 1 == sd.grid.numel() + 1
    assert hist.edges[1:] == sd.grid.tolist()  # right edges are the grid (TensorBoard's bucket limits)
    assert sum(hist.counts) == pytest.approx(eigenvalues.numel(), rel=1e-2)  # ~n eigenvalues in all
    assert hist.total == pytest.approx(float(eigenvalues.sum()), rel=1e-6)  # exact: Krylov space is full
    assert hist.maximum == pytest.approx(9.0, rel=1e-8)
    coarse = hist.coarsened(WANDB_MAX_BINS)
    assert len(coarse.counts) <= WANDB_MAX_BINS and len(coarse.edges) == len(coarse.counts) + 1
    assert coarse.edges[0] == hist.edges[0] and coarse.edges[-1] == hist.edges[-1]
    assert sum(coarse.counts) == pytest.approx(sum(hist.counts), rel=1e-12)
    samples = Histogram.of_samples(torch.tensor([0.0, 1.0, 1.0, 3.0]), bins=3)
    assert samples.counts == [1.0, 2.0, 1.0] and samples.raw == [0.0, 1.0, 1.0, 3.0]


# --------------------------------------------------------------------------------------------
# Weights & Biases, offline
# --------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of an offline ``run-*.wandb`` file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # noqa: BLE001 - a record still being written: stop here
                return
            yield record


def test_wandb_offline_run_has_density_histogram_image_and_scalars(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_API_KEY": "",
    }.items():
        monkeypatch.setenv(key, value)
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-hessian-test")
    hessian, volume = _monitors()
    try:
        _fit(logger, (hessian, volume))
    finally:
        wandb.finish()
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    for _ in range(120):  # wandb-core may still be flushing the file after finish() returns
        records = list(_wandb_records(run_files[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.25)
    rows = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]

    densities = [r for r in rows if r.get("hessian/eigenvalue_density/_type") == "histogram"]
    assert len(densities) == EPOCHS
    for row in densities:
        counts, bins = row["hessian/eigenvalue_density/values"], row["hessian/eigenvalue_density/bins"]
        assert len(bins) == len(counts) + 1 and len(counts) <= WANDB_MAX_BINS
        assert all(b2 > b1 for b1, b2 in itertools.pairwise(bins))
        assert row["hessian/eigenvalue_density_plot/_type"] == "image-file"
        assert (run_files[0].parent / "files" / row["hessian/eigenvalue_density_plot/path"]).is_file()
    # the last density is the monitor's own (W&B stores float32 counts)
    expected = density_histogram(hessian.last_density).coarsened(WANDB_MAX_BINS)
    assert densities[-1]["hessian/eigenvalue_density/values"] == pytest.approx(expected.counts, rel=1e-5, abs=1e-9)
    radii = [r for r in rows if r.get("volume/log_radii/_type") == "histogram"]
    assert len(radii) == EPOCHS and sum(radii[-1]["volume/log_radii/values"]) == volume.num_directions
    scalars = [r for r in rows if "hessian/trace" in r]
    assert [r["hessian/trace"] for r in scalars] == pytest.approx([h["trace"] for h in hessian.history], rel=1e-6)
    assert [r["volume/log_volume"] for r in scalars] == pytest.approx(
        [h["log_volume"] for h in volume.history], rel=1e-6
    )


# --------------------------------------------------------------------------------------------
# MLflow, local store
# --------------------------------------------------------------------------------------------


def test_mlflow_store_has_density_figures_and_histogram_json(tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    from lightning.pytorch.loggers import MLFlowLogger

    store = tmp_path / "mlruns"
    logger = MLFlowLogger(experiment_name="lightning-hessian-test", tracking_uri=store.as_uri())
    hessian, volume = _monitors()
    _fit(logger, (hessian, volume))
    artifacts = Path(logger.experiment.get_run(logger.run_id).info.artifact_uri.removeprefix("file://"))
    figures = sorted((artifacts / "hessian" / "eigenvalue_density_plot").glob("*.png"))
    assert len(figures) == EPOCHS and all(f.stat().st_size > 1000 for f in figures)
    assert figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = sorted((artifacts / "hessian" / "eigenvalue_density").glob("*.json"))
    assert [t.name for t in tables] == [f.name.replace(".png", ".json") for f in figures]
    last = json.loads(tables[-1].read_text())
    expected = density_histogram(hessian.last_density)
    assert last["epoch"] == EPOCHS - 1 and last["edges"] == expected.edges and last["counts"] == expected.counts
    assert last["num"] == float(sum(p.numel() for p in DigitsModule(hidden=8).parameters()))
    radii = sorted((artifacts / "volume" / "log_radii").glob("*.json"))
    assert len(radii) == EPOCHS
    last_radii = json.loads(radii[-1].read_text())
    assert last_radii["values"] == pytest.approx(volume.last_estimate.log_radii.double().tolist())
    metrics = logger.experiment.get_metric_history(logger.run_id, "hessian/trace")
    assert [m.value for m in metrics] == pytest.approx([h["trace"] for h in hessian.history], rel=1e-6)
    assert all(math.isfinite(m.value) for m in metrics)


def test_unsupported_logger_only_warns_once_and_scalars_flow(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    hessian, _ = _monitors()
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="no TensorBoardLogger, WandbLogger or MLFlowLogger") as record:
        _fit(logger, (hessian,))
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    header, *rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("hessian/trace")
    traces = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert traces == pytest.approx([h["trace"] for h in hessian.history], rel=1e-6)
