"""Progress: one INFO record per evaluation on the ``lightning_hessian`` logger, an optional bar."""

from __future__ import annotations

import logging
import re
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_hessian import MatrixOperator, local_volume, spectral_density
from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor, _progress
from lightning_hessian.callbacks._progress import CountingOperator
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = _Records()
    logger = _progress.progress_logger()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _fit(monitors, module=None, epochs=2):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=list(monitors), **trainer_kwargs(max_epochs=epochs))
    trainer.fit(module or DigitsModule(hidden=8), digits_loader(limit=200))


def test_one_info_record_per_evaluation(records):
    hessian = HessianMonitor(num_runs=2, num_steps=8, detect_sharp_drop=False)
    volume = LocalVolumeMonitor(num_directions=6, preconditioner=None)
    _fit([hessian, volume])
    assert all(r.levelno == logging.INFO and r.name == "lightning_hessian" for r in records)
    reads = [r.getMessage() for r in records if "analysis set read once" in r.getMessage()]
    assert reads == [
        f"{name}: analysis set read once: 20 samples in 1 micro-batches, 0.0 MiB per process, kept in host memory"
        f" ({monitor.analysis.read_seconds:.1f} s)"
        for name, monitor in (("HessianMonitor", hessian), ("LocalVolumeMonitor", volume))
    ]
    # the projected cost of one evaluation: after each dry run, and in epochs after the first epoch
    projections = [r.getMessage() for r in records if "one evaluation will cost about" in r.getMessage()]
    assert len(projections) == 4
    messages = [r.getMessage() for r in records if " epoch " in r.getMessage() and r.getMessage() not in projections]
    # plus the HVP path measured (backend="auto") by the dry run's operator and the evaluations' (2 vectors)
    backend = [r.getMessage() for r in records if r.getMessage().startswith("HessianOperator: products of")]
    assert len(backend) == 2
    assert len(messages) == 4 == len(records) - 2 - len(backend) - len(projections), messages
    pattern = {
        "HessianMonitor": r"HessianMonitor epoch (\d): (\d+) HVPs in (\d+\.\d) s \((\d+\.\d)x the epoch\)",
        "LocalVolumeMonitor": r"LocalVolumeMonitor epoch (\d): (\d+) forward passes \(6 directions\) in (\d+\.\d) s "
        r"\((\d+\.\d)x the epoch\)",
    }
    for monitor, key in ((hessian, "num_hvps"), (volume, "num_forward_passes")):
        mine = [m for m in messages if m.startswith(type(monitor).__name__ + " ")]
        assert len(mine) == 2
        for row, message in zip(monitor.history, mine, strict=False):
            match = re.fullmatch(pattern[type(monitor).__name__], message)
            assert match, message
            assert int(match.group(1)) == int(row["epoch"]) and int(match.group(2)) == int(row[key])
            assert float(match.group(3)) == pytest.approx(row["seconds"], abs=0.051)
    assert "16 HVPs" in messages[0]


def test_failed_evaluation_is_reported(records):
    module = DigitsModule(hidden=8)
    module.poison_epoch = 1
    hessian = HessianMonitor(num_runs=2, num_steps=8, detect_sharp_drop=False)
    with pytest.warns(UserWarning, match="failed at epoch 1"):
        _fit([hessian], module)
    messages = [
        r.getMessage() for r in records if " epoch " in r.getMessage() and "will cost about" not in r.getMessage()
    ]
    assert re.fullmatch(r"HessianMonitor epoch 0: 16 HVPs in .*", messages[0])
    assert re.fullmatch(r"HessianMonitor epoch 1: failed after \d+\.\d s \(\d+\.\dx the epoch\)", messages[1])


class _SpyBar:
    instances: ClassVar[list[_SpyBar]] = []

    def __init__(self, total, desc, unit, **kwargs):
        self.total, self.desc, self.unit, self.kwargs, self.n, self.closed = total, desc, unit, kwargs, 0, False
        _SpyBar.instances.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_bar_follows_lanczos_steps_and_directions(monkeypatch):
    import tqdm.auto

    _SpyBar.instances = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _SpyBar)
    hessian = HessianMonitor(num_runs=2, num_steps=8, detect_sharp_drop=False, progress_bar=True)
    volume = LocalVolumeMonitor(num_directions=6, preconditioner=None, progress_bar=True)
    _fit([hessian, volume, HessianMonitor(num_runs=2, num_steps=4, prefix="quiet/")], epochs=1)
    bars = _SpyBar.instances
    assert [(b.desc, b.unit, b.total, b.n) for b in bars] == [
        ("HessianMonitor epoch 0", "HVP", 16, int(hessian.history[0]["num_hvps"])),
        ("LocalVolumeMonitor epoch 0", "direction", 6, 6),
    ]  # the third monitor has no bar (progress_bar=False)
    assert all(b.closed and b.kwargs["delay"] == _progress.BAR_DELAY_SECONDS and not b.kwargs["leave"] for b in bars)


def test_counting_operator_is_transparent():
    matrix = torch.diag(torch.linspace(-1.0, 3.0, 30, dtype=torch.float64))
    widths: list[int] = []
    counted = CountingOperator(MatrixOperator(matrix), widths.append)
    a = spectral_density(counted, num_runs=3, num_steps=10, seed=1)
    b = spectral_density(MatrixOperator(matrix), num_runs=3, num_steps=10, seed=1)
    assert torch.equal(a.density, b.density) and a.deflated_trace == b.deflated_trace
    assert sum(widths) == counted.num_hvps == 30 and set(widths) == {3}


def test_local_volume_reports_finished_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    calls: list[int] = []
    with_progress = local_volume(model, data, num_directions=8, directions_per_batch=3, seed=0, progress=calls.append)
    plain = local_volume(model, data, num_directions=8, directions_per_batch=3, seed=0)
    assert calls == [3, 3, 2]
    assert torch.equal(with_progress.log_radii, plain.log_radii)
