"""Changed analysis arguments on resume are applied with a warning, never silently ignored."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_hessian.callbacks import HessianMonitor
from tests.lightning_helpers import DigitsModule, digits_dataset, digits_loader, trainer_kwargs

OPTIONS: dict[str, Any] = dict(num_runs=2, num_steps=20, log_density=False, detect_sharp_drop=False)


def _fit(monitor: HessianMonitor, root: Path, epochs: int, ckpt_path: str | None = None) -> list[str]:
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=str(root), save_last=True)
    trainer = pl.Trainer(
        callbacks=[monitor, checkpoint],
        **trainer_kwargs(max_epochs=epochs, enable_checkpointing=True, default_root_dir=str(root)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsModule(hidden=8), digits_loader(limit=200), ckpt_path=ckpt_path)
    return [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HessianMonitor]:
    root = tmp_path_factory.mktemp("resume")
    monitor = HessianMonitor(analysis_fraction=0.5, **OPTIONS)
    _fit(monitor, root, epochs=1)
    return root, monitor


def test_changed_max_samples_redraws_the_set_with_a_warning(first_run: Any, tmp_path: Path) -> None:
    root, first = first_run
    assert len(first.analysis.indices) == 100
    resumed = HessianMonitor(analysis_fraction=0.5, max_samples=10, **OPTIONS)
    messages = _fit(resumed, tmp_path, epochs=2, ckpt_path=str(root / "last.ckpt"))
    (changed,) = [m for m in messages if "analysis arguments changed" in m]
    assert "`max_samples` None -> 10" in changed and "100 samples is redrawn" in changed
    assert resumed.analysis.num_samples == 10 and len(resumed.analysis.indices) == 10  # the new set is used
    assert [row["epoch"] for row in resumed.history] == [0.0, 1.0]  # history kept


def test_changed_fraction_keeps_the_history_and_warns(first_run: Any, tmp_path: Path) -> None:
    root, _ = first_run
    resumed = HessianMonitor(analysis_fraction=0.25, **OPTIONS)
    messages = _fit(resumed, tmp_path, epochs=2, ckpt_path=str(root / "last.ckpt"))
    assert any("saved with other analysis arguments" in m and "'analysis_fraction': 0.5" in m for m in messages)
    assert any("`analysis_fraction` 0.5 -> 0.25" in m for m in messages)
    assert resumed.analysis.num_samples == 50
    assert [row["epoch"] for row in resumed.history] == [0.0, 1.0]


def test_changed_dataset_content_warns(first_run: Any, tmp_path: Path) -> None:
    root, _ = first_run
    x, y = digits_dataset(200).tensors
    other = TensorDataset(torch.flip(x, dims=[0]), torch.flip(y, dims=[0]))  # same length, other samples
    resumed = HessianMonitor(analysis_fraction=0.5, dataset=other, **OPTIONS)
    messages = _fit(resumed, tmp_path, epochs=2, ckpt_path=str(root / "last.ckpt"))
    assert any("holds other data than the checkpoint's" in m for m in messages)


def test_unchanged_arguments_resume_quietly(first_run: Any, tmp_path: Path) -> None:
    root, first = first_run
    resumed = HessianMonitor(analysis_fraction=0.5, **OPTIONS)
    messages = _fit(resumed, tmp_path, epochs=2, ckpt_path=str(root / "last.ckpt"))
    assert not any("analysis" in m and ("changed" in m or "other data" in m) for m in messages)
    assert resumed.analysis.indices == first.analysis.indices
