"""When a curvature monitor evaluates: its epoch or step schedule and its cost budget.

Pure bookkeeping (no Lightning, no math): the callbacks ask :class:`EvaluationSchedule` whether an
evaluation is due at an epoch end or after an optimizer step, and whether the cost budget
``max_overhead`` allows it, and report back how long the evaluation took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EvaluationSchedule"]


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
    return value


class EvaluationSchedule:
    r"""Epoch- or step-based schedule of a monitor's evaluations, with an optional cost budget.

    **Schedule.** With ``every_n_train_steps=n`` an evaluation is due after the optimizer step that
    brings the global step to a multiple of ``n`` (steps ``n, 2n, ...``; once per global step, also
    under gradient accumulation); otherwise at the end of every ``every_n_epochs``-th training
    epoch (default 1). The two are mutually exclusive, as in Lightning's ``ModelCheckpoint``. Both
    depend only on counters Lightning restores on resume, so a resumed run keeps the schedule.

    **Cost budget** (``max_overhead``). Let :math:`C` be the cumulative time of the evaluations
    that ran, :math:`T` the cumulative wall-clock time of everything else since training started
    (training steps, validation, other callbacks: "training time"), and :math:`c` the duration of
    the last evaluation (the forecast of the next one). A due evaluation runs iff it is the first
    one or

    .. math:: C + c \le \text{max\_overhead} \cdot T,

    i.e. iff running it keeps the cumulative overhead :math:`C / T` within the budget when it costs
    what the last one cost. Otherwise it is skipped (and the monitor logs nothing for it); the next
    due evaluation runs as soon as training time has caught up, so no more evaluations are skipped
    than the budget needs. The ratio logged per evaluation (``overhead``) is its own time over the
    training time since the previous evaluation that ran (skipped intervals included).

    Args:
        every_n_epochs: Evaluate every this many epochs (``None``: 1, unless steps are given).
        every_n_train_steps: Evaluate every this many optimizer steps.
        max_overhead: Budget of cumulative evaluation time as a fraction of training time
            (e.g. ``0.5``), or ``None`` for no budget.
        clock: Monotonic clock in seconds (injectable for tests).

    Raises:
        ValueError: Both schedules given, or a non-positive value.
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        max_overhead: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        every_n_epochs = _positive_int_or_none("every_n_epochs", every_n_epochs)
        every_n_train_steps = _positive_int_or_none("every_n_train_steps", every_n_train_steps)
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                f"Pass at most one of `every_n_epochs` (got {every_n_epochs}) and `every_n_train_steps` "
                f"(got {every_n_train_steps}): the monitor evaluates either at epoch ends or after "
                "optimizer steps. Drop one of them."
            )
        if max_overhead is not None and (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, (int, float))
            or not math.isfinite(max_overhead)
            or max_overhead <= 0
        ):
            raise ValueError(
                f"`max_overhead` must be a positive finite float (e.g. 0.5: evaluations take at most half "
                f"as long as training) or None, got {max_overhead!r}."
            )
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_train_steps is not None else 1
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.clock = clock
        self.training_seconds = 0.0
        self.evaluation_seconds = 0.0
        self.last_cost: float | None = None
        self.num_evaluations = 0
        self.num_skipped = 0
        self._last_step: int | None = None
        self._mark: float | None = None
        self._pending_training = 0.0
        self._started_at: float | None = None

    # ------------------------------------------------------------------ schedule

    @property
    def by_steps(self) -> bool:
        """Whether evaluations follow optimizer steps (else epoch ends)."""
        return self.every_n_train_steps is not None

    @property
    def unit(self) -> str:
        """``"step"`` or ``"epoch"``: what the schedule counts."""
        return "step" if self.by_steps else "epoch"

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether an evaluation is due at the end of (0-based) ``epoch``."""
        return not self.by_steps and (epoch + 1) % self.every_n_epochs == 0  # type: ignore[operator]

    def due_at_step(self, global_step: int) -> bool:
        """Whether an evaluation is due now that ``global_step`` optimizer steps have been taken."""
        if not self.by_steps or global_step <= 0 or global_step == self._last_step:
            return False
        return global_step % self.every_n_train_steps == 0  # type: ignore[operator]

    def mark_step(self, global_step: int) -> None:
        """Record that the due point at ``global_step`` was handled (run or skipped)."""
        self._last_step = global_step

    # ------------------------------------------------------------------ budget

    def start(self) -> None:
        """Start the training clock (at the start of training, also after a resume)."""
        self._mark = self.clock()
        self._started_at = None

    def within_budget(self) -> bool:
        """Account the training time since the last mark; whether a due evaluation may run."""
        now = self.clock()
        if self._mark is not None:
            elapsed = max(0.0, now - self._mark)
            self.training_seconds += elapsed
            self._pending_training += elapsed
        self._mark = now
        if self.max_overhead is None or self.num_evaluations == 0 or self.last_cost is None:
            return True
        return self.evaluation_seconds + self.last_cost <= self.max_overhead * self.training_seconds

    def skip(self) -> None:
        """Record a due evaluation that the budget skipped."""
        self.num_skipped += 1

    def begin(self) -> None:
        """Start timing an evaluation."""
        self._started_at = self.clock()

    def overhead(self) -> float:
        """Time of the running evaluation so far over the training time it covers (NaN if none)."""
        if self._started_at is None or self._pending_training <= 0:
            return math.nan
        return (self.clock() - self._started_at) / self._pending_training

    def finish(self) -> float:
        """Stop timing the evaluation, add it to the budget; returns its duration in seconds."""
        now = self.clock()
        cost = max(0.0, now - self._started_at) if self._started_at is not None else 0.0
        self.evaluation_seconds += cost
        self.last_cost = cost
        self.num_evaluations += 1
        self._pending_training = 0.0
        self._started_at = None
        self._mark = now  # the evaluation is not training time
        return cost

    @property
    def cumulative_overhead(self) -> float:
        """Cumulative evaluation time over cumulative training time (NaN before any training)."""
        return self.evaluation_seconds / self.training_seconds if self.training_seconds > 0 else math.nan

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Budget counters and the last handled step (the schedule itself is configuration)."""
        return {
            "training_seconds": self.training_seconds,
            "evaluation_seconds": self.evaluation_seconds,
            "last_cost": self.last_cost,
            "num_evaluations": self.num_evaluations,
            "num_skipped": self.num_skipped,
            "last_step": self._last_step,
            "pending_training": self._pending_training,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters (missing keys keep their defaults)."""
        self.training_seconds = float(state.get("training_seconds", 0.0))
        self.evaluation_seconds = float(state.get("evaluation_seconds", 0.0))
        cost = state.get("last_cost")
        self.last_cost = None if cost is None else float(cost)
        self.num_evaluations = int(state.get("num_evaluations", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        step = state.get("last_step")
        self._last_step = None if step is None else int(step)
        self._pending_training = float(state.get("pending_training", 0.0))

    def __repr__(self) -> str:
        when = (
            f"every_n_train_steps={self.every_n_train_steps}"
            if self.by_steps
            else f"every_n_epochs={self.every_n_epochs}"
        )
        return f"{type(self).__name__}({when}, max_overhead={self.max_overhead})"
