"""What every curvature callback shares: scheduling, guarded evaluation, DDP plumbing, logging.

No math lives here: the callbacks build a :class:`~lightning_hessian.HessianOperator` (or call
:func:`~lightning_hessian.local_volume`) over the analysis set and log what comes back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_hessian.callbacks._analysis_set import AnalysisSet, _plain_dataloader
from lightning_hessian.callbacks._isolation import isolated_training_state
from lightning_hessian.errors import HessianComputationError

__all__ = ["AnalysisSet", "CurvatureCallback", "default_classification_loss", "isolated_training_state"]


def default_classification_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy; logits ``[B, C]`` or sequence logits ``[B, T, C]`` with targets ``[B, T]``."""
    if outputs.ndim > 2:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(outputs, targets)


# --------------------------------------------------------------------------------------------
# Base callback
# --------------------------------------------------------------------------------------------

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "XLAFSDPStrategy")


def _check_fraction(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`analysis_fraction` must be in (0, 1], got {value!r}.")
    return float(value)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return value


class CurvatureCallback(Callback):
    """Scheduling, analysis set, isolation, DDP plumbing and logging shared by the monitors."""

    _metric_prefix = "hessian/"

    def __init__(
        self,
        *,
        every_n_epochs: int,
        analysis_fraction: float,
        max_samples: int | None,
        analysis_batch_size: int,
        seed: int,
        dataset: Dataset | None,
        dataloader: DataLoader | None,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        batch_loss: Callable[[torch.nn.Module, Any], Tensor] | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.every_n_epochs = _check_positive_int("every_n_epochs", every_n_epochs)
        self.analysis_fraction = _check_fraction(analysis_fraction)
        self.max_samples = _check_positive_int("max_samples", max_samples, allow_none=True)
        self.analysis_batch_size = _check_positive_int("analysis_batch_size", analysis_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.seed = seed
        if dataset is not None and dataloader is not None:
            raise ValueError("Pass at most one of `dataset` and `dataloader`.")
        if dataset is not None and not isinstance(dataset, Dataset):
            raise TypeError(f"`dataset` must be a torch.utils.data.Dataset, got {type(dataset).__name__}.")
        if dataloader is not None and not isinstance(dataloader, DataLoader):
            raise TypeError(f"`dataloader` must be a torch.utils.data.DataLoader, got {type(dataloader).__name__}.")
        if loss_fn is not None and batch_loss is not None:
            raise ValueError("Pass at most one of `loss_fn` and `batch_loss`.")
        for name, fn in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
        self.dataset = dataset
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.batch_loss = batch_loss
        self.prefix = prefix
        self.analysis = AnalysisSet(self.analysis_fraction, seed, self.analysis_batch_size, self.max_samples)
        self.history: list[dict[str, float]] = []
        self._warned_no_tensorboard = False

    # ------------------------------------------------------------------ lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        # subclasses of an unsupported strategy are unsupported too
        base = next((c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _UNSUPPORTED_STRATEGIES), None)
        if base is not None:
            if base != name:
                name = f"{name} (a {base})"
            raise RuntimeError(
                f"{type(self).__name__} does not support the {name} strategy yet (parameters are "
                "sharded or the model is not a plain module on each process). Use strategy='ddp' "
                "(or 'ddp_spawn', any number of nodes) or a single device."
            )

    # ------------------------------------------------------------------ helpers for subclasses

    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _analysis_data(self, trainer: pl.Trainer) -> DataLoader | list[Any]:
        rank, world = trainer.global_rank, trainer.world_size
        if self.dataloader is not None:
            return self.analysis.loader(None, None, rank, world, explicit_loader=self.dataloader)
        template = None
        dataset = self.dataset
        if dataset is None:
            template = _plain_dataloader(trainer.train_dataloader)
            dataset = template.dataset if template is not None else None
        return self.analysis.loader(dataset, template, rank, world)

    def _loss_kwargs(self) -> dict[str, Any]:
        if self.batch_loss is not None:
            return {"batch_loss": self.batch_loss}
        return {"loss_fn": self.loss_fn or default_classification_loss}

    @staticmethod
    def _all_reduce(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def reduce_sum(tensor: Tensor) -> Tensor:
            return strategy.reduce(tensor.clone(), reduce_op="sum")

        return reduce_sum

    def _log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        to_logger = bool(trainer.loggers)
        for name, value in values.items():
            # identical on every rank by construction: no sync needed
            pl_module.log(
                f"{self.prefix}{name}",
                float(value),
                on_step=False,
                on_epoch=True,
                prog_bar=False,
                logger=to_logger,
                sync_dist=False,
            )

    def _tensorboard_experiments(self, trainer: pl.Trainer) -> list[Any]:
        experiments = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not experiments and not self._warned_no_tensorboard and trainer.loggers:
            self._warned_no_tensorboard = True
            rank_zero_warn(
                f"{type(self).__name__}: no TensorBoardLogger among the trainer's loggers; scalars "
                "are logged, histograms and figures are skipped."
            )
        return experiments if trainer.global_rank == 0 else []

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], Any]:
        """The evaluation proper: metric values and the estimate object (subclasses)."""
        raise NotImplementedError

    def _nan_values(self, seconds: float) -> dict[str, float]:
        """Metric values of a failed evaluation (subclasses)."""
        raise NotImplementedError

    def _guarded_compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str
    ) -> tuple[dict[str, float], Any]:
        """Run :meth:`_compute` isolated from training; a numerical failure gives a warning and NaNs.

        Under DDP the core's collectives carry a failure flag, so every rank fails at the same
        product and all of them take this branch together (no deadlock).
        """
        start = self._timer()
        with isolated_training_state(pl_module):
            try:
                return self._compute(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - numerical failures only, see _failure
                if not self._failure(err):
                    raise
                rank_zero_warn(
                    f"{type(self).__name__}: {what} failed at epoch {trainer.current_epoch} "
                    f"({type(err).__name__}: {err}); logging NaN and continuing training."
                )
                return self._nan_values(self._timer() - start), None

    @staticmethod
    def _failure(err: BaseException) -> bool:
        """Numerical failures become warnings + NaN metrics; anything else is a bug and raises."""
        return isinstance(err, (HessianComputationError, torch.linalg.LinAlgError, FloatingPointError))

    @staticmethod
    def _timer() -> float:
        return time.perf_counter()

    @staticmethod
    def _nan() -> float:
        return math.nan
