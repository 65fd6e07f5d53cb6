"""Tiny LightningModules and data for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import digits_tensors


def digits_dataset(limit: int | None = None) -> TensorDataset:
    x, y = digits_tensors()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(x, y)


def digits_loader(batch_size: int = 64, limit: int | None = 600, shuffle: bool = True) -> DataLoader:
    return DataLoader(digits_dataset(limit), batch_size=batch_size, shuffle=shuffle)


class DigitsModule(pl.LightningModule):
    """MLP for digits; optional BatchNorm and dropout (to test that training is untouched)."""

    def __init__(
        self,
        hidden: int = 32,
        batchnorm: bool = False,
        dropout: float = 0.0,
        lr: float = 0.05,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(64, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, 10))
        self.net = nn.Sequential(*layers)
        self.poison_epoch: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.poison_epoch is not None and not self.training and self.current_epoch == self.poison_epoch:
            out = out * float("nan")  # only the (eval-mode) analysis sees it
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def trainer_kwargs(**overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        max_epochs=2,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs
