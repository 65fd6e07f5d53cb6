"""What every curvature callback shares: scheduling, guarded evaluation, DDP plumbing, logging.

No math lives here: the callbacks build a :class:`~lightning_hessian.HessianOperator` (or call
:func:`~lightning_hessian.local_volume`) over the analysis set and log what comes back.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_hessian.callbacks._analysis_set import (
    DEFAULT_MAX_ANALYSIS_BYTES,
    AnalysisSet,
    _plain_dataloader,
)
from lightning_hessian.callbacks._blame import data_fault, describe_batch
from lightning_hessian.callbacks._cost import CostProjection, check_against_epoch, report_projection
from lightning_hessian.callbacks._honesty import check_analysis_size
from lightning_hessian.callbacks._isolation import isolated_training_state
from lightning_hessian.callbacks._logging import ArtifactPublisher
from lightning_hessian.callbacks._progress import (
    CountingOperator,
    evaluation_bar,
    progress_logger,
    summarize_evaluation,
)
from lightning_hessian.callbacks._resume import (
    RESUME_MODES,
    InterruptibleEvaluations,
    MissedEvaluations,
    state_saved_with_other_analysis,
)
from lightning_hessian.callbacks._schedule import EvaluationSchedule
from lightning_hessian.callbacks._sharding import SHARDED_PATH
from lightning_hessian.errors import HessianComputationError
from lightning_hessian.operators._batches import _default_batch_size

__all__ = [
    "AnalysisSet",
    "CurvatureCallback",
    "default_classification_loss",
    "isolated_training_state",
    "valid_target_count",
]

IGNORE_INDEX = -100
"""Targets equal to this are ignored by :func:`default_classification_loss` (as in ``F.cross_entropy``)."""

OnError = Literal["warn", "raise"]


def default_classification_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that count (``targets != -100``).

    Logits ``[B, C]`` with targets ``[B]``, or sequence logits ``[B, T, C]`` with targets ``[B, T]``
    (flattened over positions: the token mean).
    """
    if outputs.ndim > 2:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


def valid_target_count(batch: Any) -> float:
    """Weight of an ``(inputs, targets)`` micro-batch under :func:`default_classification_loss`.

    The number of integer targets that count, ``(targets != -100).sum()`` (tokens for a sequence
    model, examples for a classifier), so that the size-weighted mean of the micro-batches' mean
    losses is the mean over every counted target of the analysis set, even when padding differs
    between micro-batches. Other batches (float targets, no targets): the leading dimension.
    """
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        targets = batch[1]
        if not torch.is_floating_point(targets) and not torch.is_complex(targets) and targets.ndim >= 1:
            return float((targets != IGNORE_INDEX).sum())
    return float(_default_batch_size(batch))


# --------------------------------------------------------------------------------------------
# Base callback
# --------------------------------------------------------------------------------------------

_UNSUPPORTED_STRATEGIES = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "XLAStrategy",
    "XLAFSDPStrategy",
)


def _check_fraction(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`analysis_fraction` must be in (0, 1], got {value!r}.")
    return float(value)


def _on_cuda(batch: Any) -> bool:
    if isinstance(batch, Tensor):
        return batch.is_cuda
    if isinstance(batch, dict):
        return any(_on_cuda(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_on_cuda(v) for v in batch)
    return False


def _check_seed(seed: Any) -> int:
    """Any integral seed (Python or NumPy integers) in ``[0, 2**63)``, as a Python ``int``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"`seed` must be an integer in [0, 2**63) (Python or NumPy integer), got {seed!r}.")
    return int(seed)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
    return value


class CurvatureCallback(InterruptibleEvaluations, Callback):
    """Scheduling, analysis set, isolation, DDP plumbing and logging shared by the monitors.

    Signals and resumes (:mod:`lightning_hessian.callbacks._interrupt`,
    :mod:`lightning_hessian.callbacks._resume`): a SIGTERM or SIGINT during an evaluation stops it
    before the next product on every process, restores the training state, records the missed
    evaluation in the checkpointed state and hands the signal back to Lightning; after a resume the
    interrupted evaluation is re-run (``resume_missed="rerun"``) or warned about.
    """

    _metric_prefix = "hessian/"

    def __init__(
        self,
        *,
        every_n_epochs: int | None,
        analysis_fraction: float,
        max_samples: int | None,
        analysis_batch_size: int,
        seed: int,
        dataset: Dataset | None,
        dataloader: DataLoader | None,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        batch_loss: Callable[[torch.nn.Module, Any], Tensor] | None,
        prefix: str,
        batch_size_fn: Callable[[Any], float] | None = None,
        on_error: OnError = "warn",
        max_analysis_bytes: int = DEFAULT_MAX_ANALYSIS_BYTES,
        progress_bar: bool = False,
        every_n_train_steps: int | None = None,
        max_overhead: float | None = None,
        resume_missed: str = "rerun",
    ) -> None:
        super().__init__()
        if resume_missed not in RESUME_MODES:
            raise ValueError(f"`resume_missed` must be 'rerun' or 'warn', got {resume_missed!r}.")
        self.resume_missed = resume_missed
        self.missed = MissedEvaluations()
        self.schedule = EvaluationSchedule(every_n_epochs, every_n_train_steps, max_overhead, clock=self._timer)
        self.analysis_fraction = _check_fraction(analysis_fraction)
        self.max_samples = _check_positive_int("max_samples", max_samples, allow_none=True)
        self.analysis_batch_size = _check_positive_int("analysis_batch_size", analysis_batch_size)
        self.seed = _check_seed(seed)
        self.max_analysis_bytes = _check_positive_int("max_analysis_bytes", max_analysis_bytes)
        self.progress_bar = bool(progress_bar)
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
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(f"`batch_size_fn` must be callable (batch -> weight), got {type(batch_size_fn).__name__}.")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"`on_error` must be 'warn' or 'raise', got {on_error!r}.")
        self.batch_size_fn = batch_size_fn
        self.on_error: OnError = on_error
        self.dataset = dataset
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.batch_loss = batch_loss
        self.prefix = prefix
        self.analysis = AnalysisSet(
            self.analysis_fraction, self.seed, self.analysis_batch_size, self.max_samples, self.max_analysis_bytes
        )
        self.history: list[dict[str, float]] = []
        self._publisher = ArtifactPublisher(type(self).__name__)
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None
        self._projection: CostProjection | None = None  # the dry run's projection of one evaluation

    # ------------------------------------------------------------------ lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        # subclasses of an unsupported strategy are unsupported too
        base = next((c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _UNSUPPORTED_STRATEGIES), None)
        if base is not None:
            if base != name:
                name = f"{name} (a {base})"
            raise RuntimeError(
                f"{type(self).__name__} does not support the {name} strategy (its parameters are "
                "flattened or offloaded out of the module, not DTensors). Sharded training is supported "
                f"through {SHARDED_PATH}; otherwise use strategy='ddp' (or 'ddp_spawn', any number of "
                "nodes) or a single device."
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._last_batch_end = self._timer(), None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint of this monitor saved with another ``analysis_fraction``/``seed`` (another state key).

        Lightning would not restore it (the key differs): its history, schedule and missed
        evaluations are loaded instead, with a warning, and the analysis set is redrawn with the
        new arguments (:meth:`AnalysisSet.load_state_dict`).
        """
        found = state_saved_with_other_analysis(
            type(self).__qualname__, self.state_key, checkpoint.get("callbacks") or {}
        )
        if found is None:
            return
        key, state = found
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint holds this monitor's state under {key}, saved with other "
            f"analysis arguments than {self.state_key}; restoring its history and schedule and redrawing the "
            "analysis set with the new arguments."
        )
        self.load_state_dict(state)

    # ------------------------------------------------------------------ scheduling

    @property
    def every_n_epochs(self) -> int | None:
        """Epoch period of the evaluations (``None`` with ``every_n_train_steps``)."""
        return self.schedule.every_n_epochs

    @property
    def every_n_train_steps(self) -> int | None:
        """Step period of the evaluations (``None`` for an epoch schedule)."""
        return self.schedule.every_n_train_steps

    @property
    def max_overhead(self) -> float | None:
        """Budget of evaluation time as a fraction of training time (``None``: no budget)."""
        return self.schedule.max_overhead

    def _schedule_key(self) -> dict[str, Any]:
        """The schedule's part of ``state_key`` (unchanged for epoch schedules)."""
        if self.schedule.by_steps:
            return {"every_n_train_steps": self.every_n_train_steps}
        return {"every_n_epochs": self.every_n_epochs}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._projection is not None and not self._projection.epoch_checked and self._epoch_start is not None:
            end = self._last_batch_end if self._last_batch_end is not None else self._timer()
            check_against_epoch(self._projection, end - self._epoch_start, trainer.is_global_zero)
        if self._active(trainer) and self.schedule.due_at_epoch_end(trainer.current_epoch):
            self._run_scheduled(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._last_batch_end = self._timer()  # the epoch's training time excludes epoch-end hooks
        # After the optimizer step: trainer.global_step already counts it.
        step = trainer.global_step
        if self._active(trainer) and self.schedule.due_at_step(step):
            self.schedule.mark_step(step)
            self._run_scheduled(trainer, pl_module)

    @staticmethod
    def _active(trainer: pl.Trainer) -> bool:
        return not (trainer.sanity_checking or getattr(trainer, "fast_dev_run", False))

    def _run_scheduled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A due evaluation: ask the budget (one decision for all ranks), then evaluate."""
        run = self.schedule.within_budget()
        if self.schedule.max_overhead is not None and trainer.world_size > 1:
            run = bool(trainer.strategy.broadcast(run, src=0))  # rank 0's clock decides for all
        if not run:
            self.schedule.skip()
            self.missed.add(trainer.current_epoch, trainer.global_step, "budget")
            return
        self.schedule.begin()
        try:
            self._watched_evaluate(trainer, pl_module)
        finally:
            self.schedule.finish()

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One evaluation: compute, record, log (subclasses)."""
        raise NotImplementedError

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        """Add ``overhead``, append the history row (``epoch``, ``step``, values) and log the scalars."""
        values["overhead"] = self.schedule.overhead()
        epoch, step = self._now(trainer)
        self.history.append({"epoch": float(epoch), "step": float(step), **values})
        self._log_scalars(trainer, pl_module, values)

    def _schedule_state(self) -> dict[str, Any]:
        """The budget's counters and the due evaluations without a valid row (``"missed"``)."""
        return {**self.schedule.state_dict(), "missed": self.missed.state_dict()}

    def _load_schedule_state(self, state_dict: dict[str, Any]) -> None:
        schedule = state_dict.get("schedule", {})
        self.schedule.load_state_dict(schedule)
        self.missed.load_state_dict(schedule.get("missed"))

    # ------------------------------------------------------------------ helpers for subclasses

    def _analysis_data(self, trainer: pl.Trainer) -> list[Any]:
        """This process's analysis micro-batches: read once (seeded, isolated), then kept.

        Idempotent: the first call (fit start, or the first evaluation) reads the set
        (:meth:`AnalysisSet.materialize`); every later call returns the same batches.
        """
        seconds_before = self.analysis.read_seconds if self.analysis.materialized else None
        batches = self._materialize(trainer)
        if seconds_before is None:
            self.analysis.check_content()
        if seconds_before is None and self.dataloader is None:  # an explicit loader is the user's exact choice
            total = len(self.analysis.indices) if self.analysis.indices is not None else self.analysis.num_samples
            check_analysis_size(type(self).__name__, total, self.analysis_fraction, self.max_samples)
        if trainer.is_global_zero and seconds_before is None:
            where = "GPU" if batches and _on_cuda(batches[0]) else "host memory"
            progress_logger().info(
                f"{type(self).__name__}: analysis set read once: {self.analysis.num_samples} samples in "
                f"{len(batches)} micro-batches, {self.analysis.nbytes / 2**20:.1f} MiB per process, kept in "
                f"{where} ({self.analysis.read_seconds:.1f} s)"
            )
        return batches

    def _materialize(self, trainer: pl.Trainer) -> list[Any]:
        dataset, template, loader = self._analysis_source(trainer)
        return self.analysis.materialize(
            dataset,
            template,
            trainer.global_rank,
            trainer.world_size,
            explicit_loader=loader,
            device=trainer.strategy.root_device,
        )

    def _analysis_source(self, trainer: pl.Trainer) -> tuple[Any, DataLoader | None, DataLoader | None]:
        """``(dataset, collate template, explicit loader)`` the analysis set is read from."""
        if self.dataloader is not None:
            return None, None, self.dataloader
        if self.dataset is None and trainer.train_dataloader is None and trainer.state.fn == "fit":
            trainer.fit_loop.setup_data()  # called before on_train_start: load the train loader now, once
        template = _plain_dataloader(trainer.train_dataloader)
        dataset = self.dataset
        if dataset is None:
            dataset = template.dataset if template is not None else None
        elif template is not None and template.dataset is not dataset:
            template = None  # an explicit dataset is collated with the default collate_fn
        return dataset, template, None

    def _progress(self, trainer: pl.Trainer, total: int, unit: str) -> Any:
        """A progress bar over ``total`` units (rank zero, ``progress_bar=True``); yields ``advance(n)``."""
        enabled = self.progress_bar and trainer.is_global_zero
        return evaluation_bar(enabled, total, f"{type(self).__name__} epoch {trainer.current_epoch}", unit)

    @staticmethod
    def _counting(op: Any, advance: Any) -> Any:
        return CountingOperator(op, advance)

    def _report(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        """One INFO record on the ``lightning_hessian`` logger (rank zero): what ran, how long."""
        if not trainer.is_global_zero:
            return
        seconds = float(values.get("seconds", math.nan))
        if "num_hvps" in values:
            work, failed = f"{int(values['num_hvps'])} HVPs", values["num_hvps"] == 0
        elif "num_forward_passes" in values:
            count = getattr(self, "num_directions", None)
            work = f"{int(values['num_forward_passes'])} forward passes" + (f" ({count} directions)" if count else "")
            failed = values["num_forward_passes"] == 0
        else:
            work, failed = "evaluation", False
        reference = None
        if self._epoch_start is not None:
            end = self._last_batch_end if self._last_batch_end is not None else self._timer() - seconds
            reference = end - self._epoch_start
        epoch, step = self._now(trainer)
        message = summarize_evaluation(
            type(self).__name__,
            f"step {step}" if self.schedule.by_steps else f"epoch {epoch}",
            work,
            seconds,
            reference,
            failed,
        )
        progress_logger().info(message)

    def _loss_kwargs(self) -> dict[str, Any]:
        if self.batch_loss is not None:
            return {"batch_loss": self.batch_loss}
        return {"loss_fn": self.loss_fn or default_classification_loss}

    def _batch_weight_fn(self) -> Callable[[Any], float] | None:
        """``batch_size_fn``, or the valid-target count with the default loss (``None``: leading dim)."""
        if self.batch_size_fn is not None:
            return self.batch_size_fn
        if self.loss_fn is None and self.batch_loss is None:
            return valid_target_count
        return None

    @staticmethod
    def _first_micro_batch(data: Any) -> Any | None:
        """This process's first analysis micro-batch (``None`` for an empty shard under DDP)."""
        return next(iter(data), None)

    @staticmethod
    def _all_reduce(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def reduce_sum(tensor: Tensor) -> Tensor:
            return strategy.reduce(tensor.clone(), reduce_op="sum")

        return reduce_sum

    def _log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        self._report(trainer, values)
        if self._rerun_of is not None:  # re-run after a resume: to the loggers, at the missed step
            metrics = {f"{self.prefix}{name}": float(value) for name, value in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=int(self._rerun_of["step"]))
            return
        by_steps = self.schedule.by_steps
        # Step schedule: Lightning writes step metrics to loggers only every `log_every_n_steps`,
        # so the values go to the loggers directly, at this global step, and through
        # pl_module.log (logger=False) into trainer.callback_metrics.
        to_logger = bool(trainer.loggers) and not by_steps
        for name, value in values.items():
            # identical on every rank by construction: no sync needed
            pl_module.log(
                f"{self.prefix}{name}",
                float(value),
                on_step=by_steps,
                on_epoch=not by_steps,
                prog_bar=False,
                logger=to_logger,
                sync_dist=False,
            )
        if by_steps and trainer.loggers:
            metrics = {f"{self.prefix}{name}": float(value) for name, value in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], Any]:
        """The evaluation proper: metric values and the estimate object (subclasses)."""
        raise NotImplementedError

    def _nan_values(self, seconds: float) -> dict[str, float]:
        """Metric values of a failed evaluation (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ dry run (before training)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_dry_run(trainer, pl_module)
        self._fill_gaps(trainer, pl_module)  # after a resume: the interrupted evaluation, or a warning
        self.schedule.start()  # the budget's training clock starts after the dry run

    def _dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the analysis set and evaluate once on one micro-batch (subclasses)."""
        raise NotImplementedError

    def _run_dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The dry run, isolated from training: configuration errors raise before the first step.

        Runs at ``on_train_start``: after ``setup``/``on_fit_start`` and the train dataloader's
        construction, before the first training step. Numerical failures
        (:class:`~lightning_hessian.errors.HessianComputationError`, e.g. a NaN loss at
        initialisation) are not configuration errors: they warn. Anything else raises, with a
        note naming this callback; under DDP every process learns (one collective of one flag)
        whether any process failed, and all of them raise together.
        """
        failure: Exception | None = None
        with isolated_training_state(pl_module):
            try:
                self._dry_run(trainer, pl_module)
            except HessianComputationError as err:
                fault = data_fault(err, self.analysis.first_batch)
                blame = f" {fault[0].upper()}{fault[1:]}: {describe_batch(self.analysis.first_batch)}." if fault else ""
                rank_zero_warn(
                    f"{type(self).__name__}: the dry run before training hit a numerical failure "
                    f"({type(err).__name__}: {err}); evaluations will log NaN while it persists.{blame}"
                )
            except Exception as err:  # noqa: BLE001 - re-raised below, after the agreement
                failure = err
        if self._any_process_failed(trainer, failure is not None) and failure is None:
            failure = RuntimeError(
                f"{type(self).__name__}: the dry run failed on another process (its error is "
                "raised there); fix the configuration named in that message."
            )
        if failure is None:
            report_projection(self._projection, trainer.is_global_zero)
        if failure is not None:
            note = self._dry_run_note(failure)
            if hasattr(failure, "add_note"):  # Python >= 3.11
                failure.add_note(note)
            else:  # Python 3.10 has no add_note: keep the note where 3.11+ does, and show it
                vars(failure).setdefault("__notes__", []).append(note)
                rank_zero_warn(note)
            raise failure

    def _dry_run_note(self, failure: BaseException) -> str:
        """The data's fault (with the batch's shapes/dtypes), or the configuration's (naming the argument)."""
        where = f"Raised by {type(self).__name__}'s dry run before the first training step (one analysis micro-batch)"
        batch = self.analysis.first_batch
        fault = data_fault(failure, batch)
        if fault is not None:
            return (
                f"{where}: the data is at fault, not the callback's arguments: {fault}. First analysis "
                f"micro-batch: {describe_batch(batch)}."
            )
        return (
            f"{where}: the callback is misconfigured for this model/data; the message above names the "
            "argument to change."
        )

    # ------------------------------------------------------------------ guarded evaluation

    @staticmethod
    def _any_process_failed(trainer: pl.Trainer, failed: bool) -> bool:
        """Whether any process failed (one collective under DDP, joined by every process)."""
        if trainer.world_size <= 1:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(flag, reduce_op="sum")
        return float(total.reshape(-1)[0]) > 0

    def _guarded_compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str
    ) -> tuple[dict[str, float], Any]:
        """Run :meth:`_compute` isolated from training; any exception gives a warning and NaNs.

        With ``on_error="warn"`` (default) any exception raised by the evaluation (numerical
        failure, solver failure, a bug in a user's ``batch_loss``, out of memory, ...) is turned
        into a warning naming its type and message and NaN metrics for this evaluation; training
        continues. With ``on_error="raise"`` it propagates. Under DDP the core's collectives carry
        a failure flag (every process fails at the same product), and one more collective of one
        flag after the evaluation makes every process take the same branch even when the
        exception was raised outside the collectives on one process only.
        """
        start = self._timer()
        failure: Exception | None = None
        result: tuple[dict[str, float], Any] | None = None
        with isolated_training_state(pl_module):
            try:
                result = self._compute(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - see the docstring
                failure = err
        failed_anywhere = self._any_process_failed(trainer, failure is not None)
        if not failed_anywhere:
            assert result is not None
            return result
        if self.on_error == "raise":
            if failure is not None:
                raise failure
            raise RuntimeError(f"{type(self).__name__}: {what} failed on another process (on_error='raise').")
        self.missed.add(*self._now(trainer), "error")
        where = f"{type(self).__name__}: {what} failed at epoch {trainer.current_epoch}"
        if failure is not None:
            message = f"{where} ({type(failure).__name__}: {failure}); logging NaN and continuing training."
            if trainer.global_rank == 0:
                rank_zero_warn(message)
            else:  # the message exists on this process only: do not lose it
                warnings.warn(f"[rank {trainer.global_rank}] {message}", UserWarning, stacklevel=2)
        else:
            rank_zero_warn(f"{where} on another process; logging NaN and continuing training.")
        return self._nan_values(self._timer() - start), None

    @staticmethod
    def _timer() -> float:
        return time.perf_counter()

    @staticmethod
    def _nan() -> float:
        return math.nan
