"""TensorBoard: the density histogram, its plot and the log-radius histogram of an evaluation sit at
the global step of that evaluation's scalars (read back from the event files)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs

pytest.importorskip("matplotlib")  # the density plot (the `plot` extra, in `dev`)


def _events(tmp_path: Path, **schedule) -> dict[str, dict[str, list[int]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [
        HessianMonitor(num_runs=2, num_steps=6, detect_sharp_drop=False, **schedule),
        LocalVolumeMonitor(num_directions=4, preconditioner=None, **schedule),
    ]
    # 200 samples in batches of 64: 4 batches per epoch, so the scalars' and the optimizer's
    # step counts differ by one at every epoch end.
    trainer = pl.Trainer(callbacks=monitors, **trainer_kwargs(logger=logger, max_epochs=3, log_every_n_steps=1))
    trainer.fit(DigitsModule(hidden=8), digits_loader(limit=200))
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    acc.Reload()
    return {
        "scalars": {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]},
        "histograms": {tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]},
        "images": {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]},
    }


def _assert_aligned(events: dict[str, dict[str, list[int]]], expected_steps: list[int]) -> None:
    scalars, histograms, images = events["scalars"], events["histograms"], events["images"]
    assert scalars["hessian/trace"] == expected_steps
    assert scalars["volume/log_volume"] == expected_steps
    assert histograms["hessian/eigenvalue_density"] == scalars["hessian/trace"]
    assert images["hessian/eigenvalue_density_plot"] == scalars["hessian/trace"]
    assert histograms["volume/log_radii"] == scalars["volume/log_volume"]


def test_epoch_schedule_histograms_and_images_at_the_scalars_steps(tmp_path: Path):
    events = _events(tmp_path)
    # Lightning writes epoch-end metrics at the step of the epoch's last batch: 3, 7, 11
    # (trainer.global_step reads 4, 8, 12 there).
    _assert_aligned(events, [3, 7, 11])
    assert events["scalars"]["train_loss"] == [3, 7, 11]  # the module's own epoch metric, same steps


def test_step_schedule_histograms_and_images_at_the_scalars_steps(tmp_path: Path):
    events = _events(tmp_path, every_n_train_steps=5)
    _assert_aligned(events, [5, 10])
