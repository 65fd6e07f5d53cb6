"""Stopping an evaluation at a signal: SIGTERM (preemption) and SIGINT (Ctrl-C), between two products.

A cluster preempts a job with SIGTERM and kills it a grace period later (often 30-120 s); an
evaluation can last longer than that. While an evaluation runs, :class:`InterruptWatch` holds the
SIGTERM and SIGINT handlers: a signal is only *recorded* (no handler that runs a collective, as
Lightning's SIGTERM handler does under DDP, can then interleave with the evaluation's own
collectives, and no ``KeyboardInterrupt`` can land in the middle of a product). Before every
product (a Lanczos step's matrix product, a trace probe block, a group of volume directions)
:meth:`InterruptWatch.check` asks whether a signal arrived on any process (one collective of two
flags under DDP, so that every process takes the same decision at the same product) and, if so,
raises :class:`EvaluationInterrupted`. The callback catches it after the training state has been
restored (:func:`~lightning_hessian.callbacks.isolated_training_state`), records the missed
evaluation and hands the signal back to Lightning (:meth:`InterruptWatch.deliver`):

* SIGTERM: ``trainer.received_sigterm`` is set on every process, as Lightning's own handler
  does, and the other handlers of the chain Lightning composed (the user's earlier handler, the
  SLURM bypass) run on the processes that received the signal; Lightning then raises its
  ``SIGTERMException`` right after the callback hook returns, runs ``on_exception`` (e.g.
  ``OnExceptionCheckpoint`` writes a checkpoint) and exits. Without a Lightning handler (SIG_DFL)
  the signal is re-raised with the original handler back in place.
* SIGINT: ``KeyboardInterrupt`` is raised on every process from the callback hook: Lightning's
  graceful shutdown (``on_exception``, then exit). A second SIGINT during the same evaluation
  raises ``KeyboardInterrupt`` at once (the user insists; under DDP the other processes then
  wait in their collective until its timeout).

A signal that arrives after the last product of an evaluation is handed back the same way once the
evaluation's row is recorded (:meth:`InterruptWatch.finish`): nothing is lost. Handlers can only be
replaced from the main thread; elsewhere only ``trainer.received_sigterm`` is checked.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.operators.base import CurvatureOperator, WrappedOperator

__all__ = ["EvaluationInterrupted", "InterruptWatch", "InterruptibleOperator"]

SIGTERM_REASON = "SIGTERM"
SIGINT_REASON = "SIGINT"


class EvaluationInterrupted(BaseException):
    """Raised between two products when a stop was agreed by every process.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that no ``except Exception`` of the
    estimators or of the callback's error guard turns it into a NaN evaluation.

    Attributes:
        reason: ``"SIGTERM"`` or ``"SIGINT"`` (SIGTERM wins when both arrived).
        products: Products the evaluation had finished when it stopped.
    """

    def __init__(self, reason: str, products: int) -> None:
        super().__init__(f"evaluation interrupted by {reason} after {products} products")
        self.reason = reason
        self.products = products


def _is_lightning_notifier(handler: Any) -> bool:
    """Whether ``handler`` is Lightning's ``_SignalConnector._sigterm_notifier_fn`` (bound)."""
    return getattr(getattr(handler, "__func__", None), "__name__", "") == "_sigterm_notifier_fn"


class InterruptWatch:
    """Defer SIGTERM/SIGINT during one evaluation; stop it, on every process, at the next product.

    Use as a context manager around the evaluation; call :meth:`check` before each product.

    Args:
        trainer: The Lightning trainer (``received_sigterm``, ``world_size``, ``strategy``).
        reduce_sum: Sum of a tensor over processes (``None``: a single process).
    """

    def __init__(self, trainer: Any, reduce_sum: Callable[[Tensor], Tensor] | None) -> None:
        self.trainer = trainer
        self.reduce_sum = reduce_sum
        self.received: dict[int, FrameType | None] = {}
        self.products = 0
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers

    def __enter__(self) -> InterruptWatch:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN:
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the handlers found at entry back (idempotent)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt  # a second Ctrl-C: the user insists
        self.received[signum] = frame

    # ------------------------------------------------------------------ decisions

    def _local_flags(self) -> tuple[bool, bool]:
        sigterm = signal.SIGTERM in self.received or bool(getattr(self.trainer, "received_sigterm", False))
        return sigterm, signal.SIGINT in self.received

    def agreed_reason(self) -> str | None:
        """``"SIGTERM"``/``"SIGINT"`` when any process received one (a collective under DDP), else ``None``."""
        sigterm, sigint = self._local_flags()
        if self.reduce_sum is not None:
            device = self.trainer.strategy.root_device
            flags = torch.tensor([float(sigterm), float(sigint)], dtype=torch.float64, device=device)
            total = self.reduce_sum(flags).reshape(-1)
            sigterm, sigint = bool(total[0] > 0), bool(total[1] > 0)
        if sigterm:
            return SIGTERM_REASON
        return SIGINT_REASON if sigint else None

    def check(self) -> None:
        """Raise :class:`EvaluationInterrupted` if any process received a signal (before a product)."""
        reason = self.agreed_reason()
        if reason is not None:
            raise EvaluationInterrupted(reason, self.products)

    def finish(self) -> str | None:
        """After a completed evaluation: restore the handlers and hand back a late signal (all processes)."""
        reason = self.agreed_reason()
        self.restore()
        if reason is not None:
            self.deliver(reason)
        return reason

    def deliver(self, reason: str) -> None:
        """Hand the agreed signal back to Lightning (see the module docstring); restores the handlers first."""
        previous = dict(self._previous)
        self.restore()
        if reason == SIGTERM_REASON:
            self._deliver_sigterm(previous.get(signal.SIGTERM))
            return
        handler = previous.get(signal.SIGINT, signal.default_int_handler)
        if handler is signal.default_int_handler or handler is None:
            raise KeyboardInterrupt
        if signal.SIGINT in self.received and callable(handler):
            handler(signal.SIGINT, self.received[signal.SIGINT])

    def _deliver_sigterm(self, previous: Any) -> None:
        connector = getattr(self.trainer, "_signal_connector", None)
        received_here = signal.SIGTERM in self.received
        chain = getattr(previous, "signal_handlers", None)
        if connector is not None and chain is not None:  # Lightning's composed handler
            connector.received_sigterm = True
            if received_here:
                for handler in chain:
                    if callable(handler) and not _is_lightning_notifier(handler):
                        handler(signal.SIGTERM, self.received[signal.SIGTERM])
            return
        if connector is not None and getattr(self.trainer, "received_sigterm", False):
            return  # Lightning already knows (its handler ran before the evaluation)
        if connector is not None:
            connector.received_sigterm = True
        if received_here and previous is not None:
            if callable(previous):
                previous(signal.SIGTERM, self.received[signal.SIGTERM])
            elif previous == signal.SIG_DFL:
                warnings.warn(
                    "SIGTERM received during a curvature evaluation with no SIGTERM handler installed: "
                    "re-raising it now that the training state is restored.",
                    UserWarning,
                    stacklevel=2,
                )
                signal.raise_signal(signal.SIGTERM)


class InterruptibleOperator(WrappedOperator):
    """An operator that asks an :class:`InterruptWatch` before every product whether to stop.

    Same products and ``num_hvps`` as the wrapped operator; under DDP each check is one
    collective of two flags, joined by every process at the same product.
    """

    def __init__(self, op: CurvatureOperator, watch: InterruptWatch) -> None:
        self.op = op
        self.watch = watch

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.op, "dtype", torch.float64)

    def matmat(self, matrix: Tensor) -> Tensor:
        self.watch.check()
        out = self.op.matmat(matrix)
        self.watch.products += 1
        return out

    def matvec(self, vector: Tensor) -> Tensor:
        return self.matmat(vector.unsqueeze(1)).squeeze(1)
