"""Summed-loss detection (issue 13 item 7): a dry run tells mean from sum exactly."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.operators import HessianOperator
from lightning_hessian.operators.reduction import (
    check_loss_reduction,
    detect_loss_reduction,
    split_batch,
)
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(size: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)


@pytest.mark.parametrize("size", [2, 21, 64])
def test_mean_and_sum_are_told_apart(size):
    model = _model()
    x, y = _batch(size)
    assert detect_loss_reduction(lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y)) == "mean"
    assert detect_loss_reduction(lambda b: F.cross_entropy(model(b[0]), b[1], reduction="sum"), (x, y)) == "sum"

    def mse_sum(b):
        return F.mse_loss(model(b["x"]), torch.zeros(b["x"].shape[0], 3), reduction="sum")

    assert detect_loss_reduction(mse_sum, {"x": x, "name": "not a tensor"}) == "sum"


def test_undecidable_cases_are_unknown():
    model = _model()
    x, y = _batch()
    assert detect_loss_reduction(lambda b: F.cross_entropy(model(b[0]), b[1]), (x[:1], y[:1])) == "unknown"
    assert detect_loss_reduction(lambda b: model(b[0]).sum() * 0.0, (x, y)) == "unknown"
    # samples that interact (train-mode BatchNorm) satisfy neither identity
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    assert detect_loss_reduction(lambda b: F.cross_entropy(bn(b[0]), b[1], reduction="sum"), (x, y)) == "unknown"


def test_split_keeps_structure():
    x, y = _batch(5)
    (a, b), (c, d) = split_batch((x, y), 2)
    assert a.shape[0] == b.shape[0] == 2 and c.shape[0] == d.shape[0] == 3


def test_warning_names_the_fix_and_the_operator_check():
    model = _model()
    x, y = _batch()
    with pytest.warns(UserWarning, match="reduction='mean'"):
        assert check_loss_reduction(lambda b: F.cross_entropy(model(b[0]), b[1], reduction="sum"), (x, y)) == "sum"
    from lightning_hessian.operators.reduction import check_operator_loss_reduction

    summed = HessianOperator(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"), [(x, y)])
    with pytest.warns(UserWarning, match="summed loss"):
        assert check_operator_loss_reduction(summed) == "sum"
    mean = HessianOperator(model, F.cross_entropy, [(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_operator_loss_reduction(mean) == "mean"
    assert mean.num_hvps == 0


def test_monitor_warns_once_on_a_summed_loss():
    monitor = HessianMonitor(
        num_runs=2,
        num_steps=5,
        analysis_fraction=0.1,
        log_density=False,
        loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="sum"),
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2))
    with pytest.warns(UserWarning, match="summed loss") as record:
        trainer.fit(DigitsModule(hidden=8), digits_loader(limit=200))
    assert sum("summed loss" in str(w.message) for w in record) == 1
