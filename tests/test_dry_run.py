"""Misconfiguration fails before the first training step; a failing evaluation never kills training.

Every configuration error is raised by the monitors' dry run (``on_train_start``: analysis set,
loss and one HVP / a few cost evaluations on one analysis micro-batch); the tests count the
training steps taken to show that it happens before the first one. After that, any exception in
a scheduled evaluation becomes a warning naming it and NaN metrics for that evaluation only.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from tests.lightning_helpers import (
    DigitsModule,
    digits_dataset,
    digits_loader,
    trainer_kwargs,
)


class CountingModule(DigitsModule):
    """Counts training steps; optionally raises in eval-mode forward passes at one epoch."""

    def __init__(self, fail_epoch: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = 0
        self.fail_epoch = fail_epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_epoch is not None and not self.training and self.current_epoch == self.fail_epoch:
            raise RuntimeError("injected failure in the analysis forward pass")
        return super().forward(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        if isinstance(batch, dict):
            return F.cross_entropy(self(batch["pixels"]), batch["label"])
        if isinstance(batch, list) and isinstance(batch[0], (list, tuple)):  # several loaders
            batch = batch[0]
        return super().training_step(batch, batch_idx)


class DictDigits(Dataset):
    def __init__(self) -> None:
        self.inner = digits_dataset(128)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return {"pixels": x, "label": y}


class StreamingDigits(IterableDataset):
    def __iter__(self):
        yield from digits_dataset(128)


def _small_hessian(**kwargs) -> HessianMonitor:
    return HessianMonitor(num_runs=1, num_steps=4, log_density=False, **kwargs)


def _small_volume(**kwargs) -> LocalVolumeMonitor:
    kwargs.setdefault("preconditioner", None)
    return LocalVolumeMonitor(num_directions=2, **kwargs)


def _fit(module, callbacks, loaders, **overrides) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(module, loaders)
    return trainer


@pytest.mark.parametrize(
    ("make_monitor", "loaders", "error", "names"),
    [
        pytest.param(
            _small_hessian,
            lambda: DataLoader(DictDigits(), batch_size=32),
            TypeError,
            "batch_loss",
            id="dict-batches-hessian",
        ),
        pytest.param(
            _small_volume,
            lambda: DataLoader(DictDigits(), batch_size=32),
            TypeError,
            "output_fn",
            id="dict-batches-volume",
        ),
        pytest.param(
            _small_hessian,
            lambda: DataLoader(StreamingDigits(), batch_size=32),
            ValueError,
            "max_samples",
            id="iterable-hessian",
        ),
        pytest.param(
            _small_volume,
            lambda: DataLoader(StreamingDigits(), batch_size=32),
            ValueError,
            "max_samples",
            id="iterable-volume",
        ),
        pytest.param(
            _small_hessian,
            lambda: [digits_loader(32, 128), digits_loader(32, 128)],
            ValueError,
            "`dataset=`",
            id="two-loaders",
        ),
        pytest.param(
            lambda: _small_hessian(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")),
            lambda: digits_loader(32, 128),
            TypeError,
            "scalar",
            id="per-example-loss",
        ),
        pytest.param(
            lambda: _small_hessian(batch_size_fn=lambda batch: -1.0),
            lambda: digits_loader(32, 128),
            ValueError,
            "batch_size_fn",
            id="negative-weight",
        ),
        pytest.param(
            lambda: _small_volume(cost="loss", batch_size_fn=lambda batch: float("nan")),
            lambda: digits_loader(32, 128),
            ValueError,
            "positive and finite",
            id="nan-weight-volume",
        ),
    ],
)
def test_configuration_errors_raise_before_the_first_training_step(make_monitor, loaders, error, names):
    module = CountingModule(hidden=8)
    with pytest.raises(error, match=names) as info:
        _fit(module, [make_monitor()], loaders(), max_epochs=1)
    assert module.steps == 0
    assert any("dry run before the first training step" in note for note in getattr(info.value, "__notes__", []))


def test_no_trainable_parameters_raises_before_training():
    class Frozen(CountingModule):
        def configure_optimizers(self):
            return None

    module = Frozen(hidden=8)
    module.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _fit(module, [_small_hessian()], digits_loader(32, 128), max_epochs=1)
    assert module.steps == 0


def test_correct_configuration_dry_run_leaves_training_untouched():
    """The dry run is isolated: same weights as without the monitors (the analysis is never scheduled)."""

    def final_weights(callbacks):
        torch.manual_seed(0)
        module = CountingModule(hidden=8, dropout=0.2)
        _fit(module, callbacks, digits_loader(32, 256), max_epochs=1)
        assert module.steps == 8
        return [p.detach().clone() for p in module.parameters()]

    plain = final_weights([])
    monitored = final_weights([_small_hessian(every_n_epochs=5), _small_volume(every_n_epochs=5)])
    assert all(torch.equal(a, b) for a, b in zip(plain, monitored, strict=True))


@pytest.mark.parametrize("make_monitor", [_small_hessian, _small_volume], ids=["hessian", "volume"])
def test_exception_in_a_later_evaluation_warns_logs_nan_and_training_continues(make_monitor):
    module = CountingModule(hidden=8, fail_epoch=1)
    monitor = make_monitor()
    with pytest.warns(
        UserWarning, match=r"failed at epoch 1 \(RuntimeError: injected failure in the analysis forward pass\)"
    ):
        trainer = _fit(module, [monitor], digits_loader(32, 128), max_epochs=3)
    assert trainer.current_epoch == 3 and module.steps == 12
    key = "trace" if isinstance(monitor, HessianMonitor) else "log_volume"
    values = [row[key] for row in monitor.history]
    assert math.isfinite(values[0]) and math.isnan(values[1]) and math.isfinite(values[2])


def test_on_error_raise_propagates():
    module = CountingModule(hidden=8, fail_epoch=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(module, [_small_hessian(on_error="raise")], digits_loader(32, 128), max_epochs=3)
    assert module.steps == 8  # epochs 0 and 1 trained, stopped at the failing evaluation


def test_numerical_failure_at_the_dry_run_warns_instead_of_raising():
    module = CountingModule(hidden=8)
    module.poison_epoch = 0  # NaN outputs in eval mode at epoch 0 (dry run and first evaluation)
    with pytest.warns(UserWarning, match="dry run before training hit a numerical failure"):
        trainer = _fit(module, [_small_hessian()], digits_loader(32, 128), max_epochs=2)
    assert trainer.current_epoch == 2


@pytest.mark.parametrize("value", ["ignore", None, 1])
def test_on_error_is_validated(value):
    with pytest.raises(ValueError, match="on_error"):
        HessianMonitor(on_error=value)
    with pytest.raises(ValueError, match="on_error"):
        LocalVolumeMonitor(on_error=value)


def test_batch_size_fn_must_be_callable():
    with pytest.raises(TypeError, match="batch_size_fn"):
        HessianMonitor(batch_size_fn=3)
