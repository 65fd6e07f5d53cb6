"""End to end: a real training run whose Hessian trace drops sharply, and ``stop_on_sharp_drop``.

Setting (found by a sweep over MLPs/CNNs, optimizers, learning rates, schedules, label noise on
scikit-learn's bundled digits; see ``examples/sharp_drop_digits.py``): a small two-layer CNN
with its default initialisation scaled by 0.5, SGD (lr 0.05, momentum 0.9), batch size 256
(7 steps per epoch), no schedule, clean labels. The loss sits on its initial plateau for a few
epochs, the trace then shoots up while the network learns fast, and falls by about 75 % within
two or three epochs as the predictions become confident: the fall's middle (epoch 9 here) is
where validation accuracy ends its steep rise (78 % -> 92 % over epochs 7-9, 97 % at the end).
Nothing is scheduled: the drop is the network's own. The detector runs with its defaults; in
this run it confirms the drop at epoch 12 (middle at epoch 10), with the fall seen by then 43 %
of the pre-drop level.

The shuffling order is a function of the epoch (a sampler with ``set_epoch``), so a run resumed
from a checkpoint is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_hessian import TraceSharpDropDetector
from lightning_hessian.callbacks import HessianMonitor
from tests.lightning_helpers import trainer_kwargs

SEED = 3
MAX_EPOCHS = 20
PATIENCE = 5


# The model, data pipeline and accuracy recorder are the example's own (examples/sharp_drop_digits.py):
# the test runs exactly the setting the example documents.
_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharp_drop_digits.py"
_spec = importlib.util.spec_from_file_location("sharp_drop_digits", _EXAMPLE)
sharp_drop_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sharp_drop_digits)  # type: ignore[union-attr]
DigitsCNN = sharp_drop_digits.DigitsCNN
ValAccuracy = sharp_drop_digits.ValAccuracy


def _loaders() -> tuple[DataLoader, DataLoader]:
    return sharp_drop_digits.digits_loaders(SEED)


def _monitor(stop: bool) -> HessianMonitor:
    # The trace is plain Hutchinson on the runs' start vectors: one Lanczos step per run gives the
    # same 8 samples as longer runs for 8 HVPs. Detector defaults.
    return HessianMonitor(
        num_runs=8, num_steps=1, log_density=False, stop_on_sharp_drop=stop, sharp_drop_patience=PATIENCE
    )


def _fit(monitor, max_epochs=MAX_EPOCHS, ckpt_path=None, callbacks=(), **kwargs):
    pl.seed_everything(SEED, verbose=False)
    module = DigitsCNN()
    train, val = _loaders()
    trainer = pl.Trainer(
        callbacks=[monitor, *callbacks],
        **trainer_kwargs(max_epochs=max_epochs, num_sanity_val_steps=0, **kwargs),
    )
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer


def _logged(log_dir: str, name: str) -> dict[int, float]:
    """``name`` per epoch, as written by the CSVLogger."""
    with open(Path(log_dir) / "metrics.csv", newline="") as fh:
        return {int(row["epoch"]): float(row[name]) for row in csv.DictReader(fh) if row.get(name, "") != ""}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny model: intra-op threads only add overhead (and the run's numbers do not depend on them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The run with ``stop_on_sharp_drop=True`` (also the uninterrupted reference for resuming)."""
    monitor, acc = _monitor(stop=True), ValAccuracy()
    logger = CSVLogger(tmp_path_factory.mktemp("stopped"), name="csv")
    trainer = _fit(monitor, callbacks=[acc], logger=logger)
    return trainer, monitor, acc, logger.log_dir


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    monitor, acc = _monitor(stop=False), ValAccuracy()
    logger = CSVLogger(tmp_path_factory.mktemp("unstopped"), name="csv")
    trainer = _fit(monitor, callbacks=[acc], logger=logger)
    return trainer, monitor, acc, logger.log_dir


def test_training_stops_patience_epochs_after_the_drop(stopped, unstopped):
    trainer, monitor, acc, log_dir = stopped
    det = monitor.detector
    assert det.flagged
    # a real sharp drop: large (the fall seen when flagged, which may be mid-fall), after a long
    # enough history, and confirmed before the stop
    assert det.drop_size > det.min_relative_drop
    assert 5 <= det.drop_start_epoch < det.drop_middle_epoch < det.flagged_at_epoch
    expected = det.drop_middle_epoch + PATIENCE
    assert expected > det.flagged_at_epoch  # the patience, not the flag, decides the stop epoch
    assert expected < MAX_EPOCHS - 1
    assert monitor.stopped_epoch == expected
    assert trainer.should_stop
    assert trainer.current_epoch == expected + 1  # epochs 0..expected were trained
    assert [int(row["epoch"]) for row in monitor.history] == list(range(expected + 1))

    flags = _logged(log_dir, "hessian/trace_sharp_drop")
    assert list(flags) == list(range(expected + 1))
    assert flags[expected] == 1.0
    assert all(flags[e] == (1.0 if e >= det.flagged_at_epoch else 0.0) for e in flags)
    assert _logged(log_dir, "hessian/trace_sharp_drop_epoch")[expected] == det.drop_middle_epoch

    # the paper's reading: learning is over once the trace has dropped. Stopping here costs at
    # most 2 points of validation accuracy against training to the end.
    full_acc = unstopped[2].acc
    assert max(full_acc.values()) - acc.acc[expected] <= 0.02
    # and, in this run, the drop's middle is where the steep rise of the validation accuracy ends
    knee = min(e for e, a in full_acc.items() if a >= 0.9 * max(full_acc.values()))
    assert abs(det.drop_middle_epoch - knee) <= 1


def test_without_stop_training_runs_on_and_flags(stopped, unstopped):
    trainer, monitor, _, log_dir = unstopped
    ref = stopped[1].detector
    det = monitor.detector
    assert monitor.stopped_epoch is None
    assert not trainer.should_stop
    assert trainer.current_epoch == MAX_EPOCHS
    assert len(monitor.history) == MAX_EPOCHS
    # same drop as the stopped run (the callback never changes training)
    assert det.flagged
    assert (det.flagged_at_epoch, det.drop_start_epoch, det.drop_middle_epoch) == (
        ref.flagged_at_epoch,
        ref.drop_start_epoch,
        ref.drop_middle_epoch,
    )
    n = len(ref.history.traces)
    assert det.history.traces[:n] == ref.history.traces
    assert det.history.epochs == tuple(range(MAX_EPOCHS))

    flags = _logged(log_dir, "hessian/trace_sharp_drop")
    middles = _logged(log_dir, "hessian/trace_sharp_drop_epoch")
    assert list(flags) == list(range(MAX_EPOCHS))
    for epoch in range(MAX_EPOCHS):
        if epoch < det.flagged_at_epoch:
            assert flags[epoch] == 0.0 and math.isnan(middles[epoch]), epoch
        else:
            assert flags[epoch] == 1.0 and middles[epoch] == det.drop_middle_epoch, epoch


def test_resume_keeps_detector_state(stopped, tmp_path):
    ref_trainer, ref_monitor, _, _ = stopped
    ref = ref_monitor.detector
    # resume after the trace has started to fall but before the drop is confirmed: without the
    # restored history the resumed detector could not confirm it (checked at the end)
    resume_at = ref.drop_middle_epoch + 1
    assert ref.drop_start_epoch < resume_at < ref.flagged_at_epoch

    first = _monitor(stop=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    _fit(first, max_epochs=resume_at, callbacks=[ckpt], enable_checkpointing=True)
    assert not first.detector.flagged
    assert first.detector.history.epochs == tuple(range(resume_at))

    resumed = _monitor(stop=True)
    trainer = _fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    det = resumed.detector
    history, ref_history = det.history, ref.history
    # restored, not recomputed: identical up to the resume point
    assert history.epochs[:resume_at] == ref_history.epochs[:resume_at]
    assert history.traces[:resume_at] == ref_history.traces[:resume_at]
    assert history.stderrs[:resume_at] == ref_history.stderrs[:resume_at]
    assert [row["trace"] for row in resumed.history[:resume_at]] == list(ref_history.traces[:resume_at])
    # and the rest of the run as in the uninterrupted one
    assert history.epochs == ref_history.epochs
    assert history.traces == pytest.approx(ref_history.traces, rel=1e-6)
    assert (det.flagged_at_epoch, det.drop_start_epoch, det.drop_middle_epoch) == (
        ref.flagged_at_epoch,
        ref.drop_start_epoch,
        ref.drop_middle_epoch,
    )
    assert resumed.stopped_epoch == ref_monitor.stopped_epoch == ref.drop_middle_epoch + PATIENCE
    assert trainer.current_epoch == ref_trainer.current_epoch

    # control: a detector that only saw the epochs after the resume point never flags the drop
    fresh = TraceSharpDropDetector()
    for epoch, trace, stderr in zip(*(seq[resume_at:] for seq in ref_history), strict=False):
        fresh.update(epoch, trace, stderr)
    assert not fresh.flagged


def test_stock_early_stopping_on_the_flag_stops_at_confirmation(unstopped):
    """The documented stock-EarlyStopping recipe: a threshold stop on the 0/1 flag."""
    from lightning.pytorch.callbacks import EarlyStopping

    confirmed = unstopped[1].detector.flagged_at_epoch
    assert confirmed is not None and confirmed < MAX_EPOCHS - 1
    stopper = EarlyStopping(
        monitor="hessian/trace_sharp_drop",
        mode="max",
        stopping_threshold=0.5,
        patience=MAX_EPOCHS,
        check_on_train_epoch_end=True,
    )
    monitor = _monitor(stop=False)
    trainer = _fit(monitor, callbacks=[stopper])
    assert stopper.stopped_epoch == confirmed
    assert trainer.current_epoch == confirmed + 1
    assert monitor.detector.flagged_at_epoch == confirmed
