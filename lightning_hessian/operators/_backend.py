"""Which HVP path computes a product of ``k`` vectors: chosen by measurement, per width ``k``.

:class:`HessianOperator` has two exact HVP paths with different cost profiles: vmapped
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``; amortises well over many vectors
and on GPUs) and double backward (``torch.autograd.grad(create_graph=True)``; a lower fixed cost
per call, one backward pass per vector). Which is faster depends on the model, the device, the
batch and the number of vectors, so ``backend="auto"`` times both on the first micro-batch of the
first product of each width it meets (two or three alternating rounds, the minimum per path)
and keeps the faster for that width (the measured products are real products of that batch: the
winner's result is used; the other timed calls are the measurement's whole cost).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar, cast

import torch

from lightning_hessian.errors import HessianComputationError

__all__ = ["BACKENDS", "Backend", "BackendSelector", "HVPPath", "check_backend"]

Backend = Literal["auto", "func", "autograd", "finite_difference"]
BACKENDS = ("auto", "func", "autograd", "finite_difference")
HVPPath = Literal["func", "autograd"]
_PATHS = ("func", "autograd")
# Both paths are timed in _MIN_ROUNDS alternating rounds (minimum per path; the first call of a
# path may pay one-off costs: allocator growth, lazy initialisation), and in up to _MAX_ROUNDS
# while their times are within _RETIME_RATIO of each other.
_MIN_ROUNDS = 2
_MAX_ROUNDS = 3
_RETIME_RATIO = 1.3

logger = logging.getLogger("lightning_hessian")
T = TypeVar("T")


def check_backend(backend: object) -> str:
    """``backend`` if it names an HVP backend, else a ``ValueError`` naming the options."""
    if backend not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}{hint}.")
    return str(backend)


class BackendSelector:
    """The HVP path per product width: forced, by a fixed rule, or by measurement.

    Args:
        requested: ``"auto"`` (measure; fall back to double backward where forward-mode AD
            fails), ``"func"`` or ``"autograd"`` (forced).
        func_min_vectors: With ``"auto"``, skip the measurement and use the fixed rule "double
            backward below this many vectors, forward-over-reverse from it on" (``None``:
            measure).
        choices: Choices measured earlier (``{width: path}``, e.g. another operator's
            :attr:`choices`), reused without timing.
        device: Device of the products (CUDA is synchronised before reading the clock).
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        requested: Backend = "auto",
        func_min_vectors: int | None = None,
        choices: Mapping[int, str] | None = None,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if check_backend(requested) == "finite_difference":
            raise ValueError("BackendSelector chooses between the AD paths; finite differences are not measured.")
        if func_min_vectors is not None and (
            isinstance(func_min_vectors, bool) or not isinstance(func_min_vectors, int) or func_min_vectors < 1
        ):
            raise ValueError(f"`func_min_vectors` must be a positive integer or None, got {func_min_vectors!r}.")
        self.requested: Backend = requested
        self.func_min_vectors = func_min_vectors
        self.choices: dict[int, HVPPath] = {}
        for width, path in (choices or {}).items():
            if path not in _PATHS or isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(
                    f"`backend_choices` must map widths (int >= 1) to 'func'/'autograd', got {width!r}: {path!r}."
                )
            self.choices[width] = path  # type: ignore[assignment]
        self.timings: dict[int, dict[str, float]] = {}
        self.func_failed = False
        self.last: HVPPath | None = None
        self.device = device
        self.clock = clock
        self._fallback_warned = False

    def path_for(self, width: int) -> HVPPath | None:
        """The path products of ``width`` vectors use, or ``None`` while still to be measured."""
        if self.requested != "auto":
            return cast(HVPPath, self.requested)
        if self.func_failed:
            return "autograd"
        if width in self.choices:
            return self.choices[width]
        if self.func_min_vectors is not None:
            return "autograd" if width < self.func_min_vectors else "func"
        return None

    def run(self, width: int, func: Callable[[], T], autograd: Callable[[], T]) -> T:
        """One micro-batch product of ``width`` vectors by the chosen path (measuring if undecided)."""
        path = self.path_for(width)
        if path == "autograd":
            self.last = "autograd"
            return autograd()
        if path == "func" and self.requested == "func":
            self.last = "func"
            return func()
        if path == "func":  # chosen under "auto": a later batch may still fail forward-mode AD
            return self._func_or_fallback(func, autograd)
        return self._measure(width, func, autograd)

    # ------------------------------------------------------------------ internals

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        self._sync()
        start = self.clock()
        result = fn()
        self._sync()
        return result, self.clock() - start

    def _func_or_fallback(self, func: Callable[[], T], autograd: Callable[[], T]) -> T:
        try:
            result = func()
        except (RuntimeError, NotImplementedError) as err:
            if isinstance(err, HessianComputationError):
                raise
            return self._fall_back(err, autograd)
        self.last = "func"
        return result

    def _fall_back(self, err: BaseException, autograd: Callable[[], T]) -> T:
        try:
            result = autograd()
        except Exception:  # noqa: BLE001 - the forward-mode error is the one to report
            raise err from None
        self.func_failed = True
        self.last = "autograd"
        if not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn(
                "Forward-over-reverse HVP (torch.func) failed for this model "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); falling back to "
                "double backward. Pass backend='autograd' to silence this warning.",
                RuntimeWarning,
                stacklevel=6,
            )
        return result

    def _measure(self, width: int, func: Callable[[], T], autograd: Callable[[], T]) -> T:
        try:
            func_result, func_s = self._timed(func)
        except (RuntimeError, NotImplementedError) as err:
            if isinstance(err, HessianComputationError):
                raise
            return self._fall_back(err, autograd)
        autograd_result, autograd_s = self._timed(autograd)
        # Minimum over rounds: robust to one-off costs of a path's first call and to preemption
        # on a busy machine. A third round only when the paths are close.
        for round_ in range(1, _MAX_ROUNDS):
            if round_ >= _MIN_ROUNDS and max(func_s, autograd_s) > _RETIME_RATIO * min(func_s, autograd_s):
                break
            func_result, again_f = self._timed(func)
            autograd_result, again_a = self._timed(autograd)
            func_s, autograd_s = min(func_s, again_f), min(autograd_s, again_a)
        path: HVPPath = "func" if func_s <= autograd_s else "autograd"
        self.choices[width] = path
        self.timings[width] = {"func": func_s, "autograd": autograd_s}
        self.last = path
        logger.info(
            "HessianOperator: products of %d vector%s use %s (first micro-batch: forward-over-reverse "
            "%.3g s, double backward %.3g s).",
            width,
            "" if width == 1 else "s",
            "forward-over-reverse (func)" if path == "func" else "double backward (autograd)",
            func_s,
            autograd_s,
        )
        return func_result if path == "func" else autograd_result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(requested={self.requested!r}, choices={self.choices})"
