"""Errors name the culprit: data faults say so with the batch's structure; the memory guard refuses early."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.callbacks._analysis_set import AnalysisSet
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs


def _monitor(**kwargs: Any) -> HessianMonitor:
    return HessianMonitor(num_runs=2, num_steps=20, log_density=False, analysis_fraction=0.5, **kwargs)


def _fit(dataset: Dataset, **kwargs: Any) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[_monitor(**kwargs)], **trainer_kwargs(max_epochs=1))
    trainer.fit(DigitsModule(hidden=8), DataLoader(dataset, batch_size=50))


def _notes(err: BaseException) -> str:
    return " ".join(getattr(err, "__notes__", []))


def _digits(x_map: Any = None, y_map: Any = None) -> TensorDataset:
    x, y = digits_dataset(100).tensors
    return TensorDataset(x if x_map is None else x_map(x), y if y_map is None else y_map(y))


@pytest.mark.parametrize(
    ("dataset", "fault", "shown"),
    [
        (_digits(y_map=lambda y: y + 5), "targets look out of the model's range", "batch[1]: int64 [50] in [5, 14]"),
        (_digits(y_map=lambda y: y.float()), "dtypes do not fit", "batch[1]: float32 [50]"),
        (_digits(y_map=lambda y: y.int()), "dtypes do not fit", "batch[1]: int32 [50]"),
        (_digits(y_map=lambda y: torch.stack([y, y], 1)), "shapes do not fit", "batch[1]: int64 [50, 2]"),
    ],
    ids=["labels_out_of_range", "float_targets", "int32_targets", "2d_targets"],
)
def test_data_faults_blame_the_data_and_show_the_batch(dataset: Dataset, fault: str, shown: str) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - PyTorch's own error type varies
        _fit(dataset)
    notes = _notes(info.value)
    assert "the data is at fault, not the callback's arguments" in notes and fault in notes
    assert shown in notes
    assert "misconfigured" not in notes


def test_nan_inputs_warn_that_the_data_holds_nan() -> None:
    def with_nan(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 3] = float("nan")
        return x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_digits(x_map=with_nan))
    (message,) = [str(w.message) for w in caught if "dry run before training hit a numerical failure" in str(w.message)]
    assert "The analysis data holds NaN/Inf values" in message and "NaN/Inf" in message.split("batch[0]")[1]


def test_configuration_errors_keep_naming_the_argument() -> None:
    def bad_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise KeyError("my loss looks for a key the outputs do not have")

    with pytest.raises(KeyError) as info:
        _fit(_digits(), loss_fn=bad_loss)
    notes = _notes(info.value)
    assert "misconfigured" in notes and "names the argument to change" in notes


class CountingDataset(Dataset):
    """Samples of 1 MiB each; counts the reads."""

    def __init__(self, length: int) -> None:
        self.length, self.reads = length, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return torch.zeros(1 << 18), torch.tensor(i % 10)


def test_memory_guard_refuses_after_a_few_samples() -> None:
    dataset = CountingDataset(1000)
    analysis = AnalysisSet(fraction=1.0, seed=0, batch_size=256, max_samples=None, max_bytes=100 << 20)
    with pytest.raises(ValueError, match=r"first 8 samples take .* would take ~1,048,\d{3},\d{3} bytes") as info:
        analysis.materialize(dataset, None, rank=0, world_size=1)
    assert "refused before reading the rest" in str(info.value) and "`max_analysis_bytes`" in str(info.value)
    assert dataset.reads == 8  # not the ~100 samples the budget holds, nor the 1000 of the set


def test_memory_guard_lets_a_set_that_fits_through() -> None:
    dataset = CountingDataset(50)
    analysis = AnalysisSet(fraction=1.0, seed=0, batch_size=16, max_samples=None, max_bytes=100 << 20)
    batches = analysis.materialize(dataset, None, rank=0, world_size=1)
    assert dataset.reads == 50 and sum(b[0].shape[0] for b in batches) == 50
