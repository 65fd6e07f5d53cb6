"""Resumes that lose nothing: which due evaluations produced no (valid) row, kept in the checkpoint.

Every due evaluation that did not produce a valid history row is recorded
(:class:`MissedEvaluations`, saved in the callback's ``state_dict``) with its epoch, its global
step and why:

* ``"SIGTERM"`` / ``"SIGINT"``: stopped by a signal (no row). The record also keeps a fingerprint
  of the weights it was meant to analyse (float64 sum and sum of squares of the trainable
  parameters). After a resume the monitor (``resume_missed="rerun"``, the default) re-runs it
  right after the dry run, before the first training step, when the restored weights have that
  fingerprint, i.e. the checkpoint was written at the interruption (Lightning's SIGTERM path with
  ``OnExceptionCheckpoint``): the row is then the one the evaluation would have produced, labelled
  with the missed epoch/step and sent to the loggers at that step. Otherwise (other weights, or
  ``resume_missed="warn"``) one warning names the missing epochs/steps.
* ``"budget"``: skipped by ``max_overhead`` (no row); ``"error"``: failed (a NaN row). Re-running
  them would defeat the budget or repeat the failure: after a resume one warning names them.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hessian.callbacks._interrupt import EvaluationInterrupted, InterruptibleOperator, InterruptWatch

__all__ = ["RESUME_MODES", "InterruptibleEvaluations", "MissedEvaluations", "weights_fingerprint"]

RESUME_MODES = ("rerun", "warn")
INTERRUPTIONS = ("SIGTERM", "SIGINT")


def weights_fingerprint(module: torch.nn.Module) -> list[float]:
    """``[sum, sum of squares]`` of the trainable parameters in float64 (identical weights, identical values)."""
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                flat = p.detach().to(torch.float64)
                total += flat.sum().cpu()
                squares += flat.square().sum().cpu()
    return [float(total), float(squares)]


def describe(records: list[dict[str, Any]], by_steps: bool) -> str:
    """``"epoch 1 (SIGTERM), epoch 3 (budget)"``."""
    unit = "step" if by_steps else "epoch"
    return ", ".join(f"{unit} {int(r['step' if by_steps else 'epoch'])} ({r['reason']})" for r in records)


class MissedEvaluations:
    """The due evaluations without a valid row, and what to do about them after a resume."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.resumed = False

    def add(self, epoch: int, step: int, reason: str, fingerprint: list[float] | None = None) -> None:
        """Record a due evaluation that produced no valid row."""
        self.records.append({"epoch": int(epoch), "step": int(step), "reason": reason, "fingerprint": fingerprint})

    def interrupted(self) -> list[dict[str, Any]]:
        """The records of evaluations stopped by a signal."""
        return [r for r in self.records if r["reason"] in INTERRUPTIONS]

    def take_rerunnable(self, fingerprint: list[float]) -> dict[str, Any] | None:
        """The interrupted record whose weights are ``fingerprint`` (removed from the records), or ``None``."""
        for record in reversed(self.records):
            if record["reason"] in INTERRUPTIONS and record.get("fingerprint") == fingerprint:
                self.records.remove(record)
                return record
        return None

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.records]

    def load_state_dict(self, records: list[dict[str, Any]] | None) -> None:
        self.records = [dict(r) for r in records or []]
        self.resumed = True


class InterruptibleEvaluations:
    """What :class:`~lightning_hessian.callbacks._base.CurvatureCallback` adds for signals and resumes.

    A mixin: the host provides ``missed`` (:class:`MissedEvaluations`), ``resume_missed``,
    ``schedule``, ``_evaluate``, ``_all_reduce`` and ``_now``.
    """

    missed: MissedEvaluations
    resume_missed: str
    schedule: Any
    _watch: InterruptWatch | None = None
    _rerun_of: dict[str, Any] | None = None

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def _all_reduce(self, trainer: pl.Trainer) -> Any:
        raise NotImplementedError

    def _now(self, trainer: pl.Trainer) -> tuple[int, int]:
        """``(epoch, global step)`` of the running evaluation (those of the missed one when re-running it)."""
        if self._rerun_of is not None:
            return int(self._rerun_of["epoch"]), int(self._rerun_of["step"])
        return int(trainer.current_epoch), int(trainer.global_step)

    def _interruptible(self, op: Any) -> Any:
        """``op`` checked for signals before every product (unchanged outside a watched evaluation)."""
        return op if self._watch is None else InterruptibleOperator(op, self._watch)

    def _interrupt_check(self) -> Callable[[], None] | None:
        """A check to call before each product of a core routine (``None`` outside a watched evaluation)."""
        watch = self._watch
        if watch is None:
            return None

        def check() -> None:
            watch.check()
            watch.products += 1

        return check

    def _watched_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """:meth:`_evaluate` with SIGTERM/SIGINT deferred, checked between products and handed back."""
        watch = InterruptWatch(trainer, self._all_reduce(trainer))
        self._watch = watch
        try:
            with watch:
                try:
                    watch.check()
                    self._evaluate(trainer, pl_module)
                except EvaluationInterrupted as stop:
                    self._on_interrupted(trainer, pl_module, stop)
                    watch.deliver(stop.reason)
                    return
                watch.finish()
        finally:
            self._watch = None

    def _on_interrupted(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stop: EvaluationInterrupted) -> None:
        epoch, step = self._now(trainer)
        self.missed.add(epoch, step, stop.reason, weights_fingerprint(pl_module))
        then = (
            "it is re-run after a resume from a checkpoint written now (resume_missed='rerun')"
            if self.resume_missed == "rerun"
            else "a resume warns about it (resume_missed='warn')"
        )
        rank_zero_warn(
            f"{type(self).__name__}: the evaluation at epoch {epoch} (step {step}) was stopped by {stop.reason} "
            f"after {stop.products} products: training state restored, no row logged for it; {then}. "
            "Handing the signal back to Lightning."
        )

    def _fill_gaps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume: re-run the interrupted evaluation on the same weights, warn about other gaps."""
        if not self.missed.resumed:
            return
        self.missed.resumed = False
        if self.resume_missed == "rerun":
            record = self.missed.take_rerunnable(weights_fingerprint(pl_module))
            if record is not None:
                rank_zero_info(
                    f"{type(self).__name__}: re-running the evaluation of epoch {record['epoch']} (step "
                    f"{record['step']}) that {record['reason']} interrupted (same weights) before training resumes."
                )
                self._rerun_of = record
                self.schedule.begin()
                try:
                    self._watched_evaluate(trainer, pl_module)
                finally:
                    self._rerun_of = None
                    self.schedule.finish()
        fresh = [r for r in self.missed.records if not r.get("reported")]
        if not fresh:
            return
        for record in fresh:
            record["reported"] = True
        interrupted = [r for r in fresh if r["reason"] in INTERRUPTIONS]
        why = ""
        if interrupted:
            why = " Interrupted evaluations are not re-run: " + (
                "resume_missed='warn'."
                if self.resume_missed == "warn"
                else "the restored weights are not those they were meant to analyse (the checkpoint was "
                "not written at the interruption)."
            )
        rank_zero_warn(
            f"{type(self).__name__}: resumed with {len(fresh)} due evaluation(s) that have no valid history "
            f"row: {describe(fresh, self.schedule.by_steps)} (budget: skipped by max_overhead; error: a NaN "
            f"row).{why}"
        )


_ANALYSIS_KEY_FIELDS = frozenset({"analysis_fraction", "seed"})


def state_saved_with_other_analysis(
    qualname: str, state_key: str, states: dict[Any, Any]
) -> tuple[str, dict[str, Any]] | None:
    """The checkpointed state of this callback saved under another ``analysis_fraction``/``seed``.

    ``state_key`` is ``f"{qualname}{kwargs!r}"`` (Lightning's ``_generate_state_key``); a stored key
    whose kwargs differ from this one's in the analysis fields only is the same monitor resumed
    with changed analysis arguments. ``None`` when this key is present or no single such key is.
    """
    if state_key in states:
        return None
    try:
        mine = ast.literal_eval(state_key[len(qualname) :])
    except (ValueError, SyntaxError):
        return None
    found = []
    for key, state in states.items():
        if not isinstance(key, str) or not key.startswith(qualname + "{"):
            continue
        try:
            theirs = ast.literal_eval(key[len(qualname) :])
        except (ValueError, SyntaxError):
            continue
        if not isinstance(theirs, dict) or theirs.keys() != mine.keys():
            continue
        differing = {k for k in mine if mine[k] != theirs[k]}
        if differing and differing <= _ANALYSIS_KEY_FIELDS:
            found.append((key, state))
    return found[0] if len(found) == 1 else None
