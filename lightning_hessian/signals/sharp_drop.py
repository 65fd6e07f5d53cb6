"""Online detection of the Hessian trace's "sudden sharp drop", with a calibrated false-alarm rate.

Alabdulkareem, *Dynamics of the Hessian of the Loss during training* (NeurIPS 2022), §7.7
(Conjecture 3): "the sudden sharp decline in the trace of the Hessian during training signifies
that training has stopped". :class:`TraceSharpDropDetector` recognises a sudden, lasting fall of
the trace online, from one estimate (and its interval) per evaluation, as a sequential test whose
threshold is set from the false-alarm rate it may commit on a stationary sequence. Its rule is
in ``lightning_hessian.signals._drop_rule``; the measured operating characteristic and the
study of whether stopping on it pays are in ``docs/methods/sharp-drop-and-ood.md``. Pure Python
and numpy (no torch, no Lightning): a callback drives it, any process replays its
:meth:`~TraceSharpDropDetector.state_dict`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np

from lightning_hessian._utils.stats import normal_quantile
from lightning_hessian.signals._drop_rule import (
    DropRule,
    alarm_threshold,
    candidate_falls,
    check_float,
    check_int,
    dof_from_interval,
    locate_drop,
)

__all__ = ["TraceHistory", "TraceSharpDropDetector"]

_STATE_VERSION = 2
_RESULT_KEYS = (
    "flagged_at_epoch",
    "drop_start_epoch",
    "drop_middle_epoch",
    "drop_middle_epoch_interpolated",
    "drop_size",
    "pre_drop_level",
    "post_drop_level",
)


class TraceHistory(NamedTuple):
    """Every evaluation fed to :meth:`TraceSharpDropDetector.update`, in order, as given.

    Non-finite traces are kept here (they are only skipped by the detection rule).
    """

    epochs: tuple[int, ...]
    traces: tuple[float, ...]
    stderrs: tuple[float | None, ...]


class TraceSharpDropDetector:
    r"""Flags the sudden, lasting fall of the Hessian trace (Alabdulkareem 2022, §7.7).

    Feed one evaluation at a time with :meth:`update`; it returns ``True`` on exactly one
    evaluation, the one that confirms a drop; detection then stops and the result attributes stay
    set until :meth:`reset`. Evaluations whose trace is NaN/Inf are recorded in :attr:`history`
    and otherwise skipped; windows count finite *evaluations*, not epochs.

    **Rule.** At evaluation :math:`t`, for every split into a pre window
    :math:`x_{p-B+1..p}` (:math:`B` = ``baseline``), a fall over the ``gap`` :math:`c - 1 - p <`
    ``window`` evaluations in between, and a post window :math:`x_{c..t}` of
    :math:`m = t - c + 1` evaluations, ``confirm`` :math:`< m \le` ``post_window``:

    * fall :math:`D = \bar x_{pre} - \bar x_{post}` (window means); trend-corrected *sudden*
      excess :math:`E = D - \max(0, -s)\,\Delta`, :math:`s` the Theil–Sen slope over
      :math:`x_{p-K..p}` (:math:`K` = ``lookback``), :math:`\Delta` the distance between the
      windows' centres (a steady decline is not a drop);
    * per-evaluation noise :math:`\hat\sigma^2 = \max(\overline{s^2}, \tfrac12(1.4826\,
      \mathrm{MAD}(\Delta x))^2)`: the larger of the pooled squared standard errors over both
      windows and the robust variance of the recent first differences (the training's own
      epoch-to-epoch wobble, which fixed probes do not show in their standard error);
    * :math:`Z = E / (\hat\sigma\sqrt{1/B + 1/m})`.

    A drop is flagged when some split has :math:`Z \ge z_\alpha`, :math:`\bar x_{pre} > 0`,
    :math:`E \ge \rho\,\bar x_{pre}` (:math:`\rho` = ``min_relative_drop``) and stays down: no
    post evaluation above :math:`\bar x_{pre} - (1 - r)D + 2\hat\sigma` (:math:`r` =
    ``max_rebound``). The threshold :math:`z_\alpha` is set so that a *stationary* sequence of
    ``horizon`` evaluations with Gaussian noise of the reported size (standard errors with the
    interval's degrees of freedom) flags with probability ``false_alarm_rate``
    (:func:`~lightning_hessian.signals._drop_rule.alarm_threshold`, a seeded Monte Carlo of this
    very rule, cached); the size gate only removes flags. Over :math:`n` evaluations the false
    alarm probability grows to about ``false_alarm_rate`` :math:`\cdot n /` ``horizon``.

    **Reported** (``None`` before a flag): :attr:`drop_size` :math:`= D/\bar x_{pre}` of the
    flagged split with the largest fall; :attr:`pre_drop_level`, :attr:`post_drop_level`;
    :attr:`drop_middle_epoch` (the paper's vertical line: the epoch where the trace crosses
    half-way between the two levels, :attr:`drop_middle_epoch_interpolated` unrounded);
    :attr:`drop_start_epoch` (last epoch still within a quarter of the fall of the pre level);
    :attr:`flagged_at_epoch`; :attr:`drop_z` and :attr:`threshold` (:math:`Z`, :math:`z_\alpha`).

    **Defaults**: from the operating characteristic measured on real digits trace sequences
    (``benchmarks/sharp_drop_calibration.py``; docs page "Sharp drop").

    Args:
        false_alarm_rate: Probability that a stationary sequence of ``horizon`` evaluations raises
            a flag (in (0, 0.5]): the knob trading false alarms for detection delay.
        horizon: Run length (evaluations) the false-alarm rate refers to (int >= 10).
        min_relative_drop: Smallest sudden fall, as a fraction of the pre-drop level (in [0, 1)).
        window: Largest number of evaluations over which the fall may happen (int >= 1).
        confirm: Evaluations after the first low one needed before a flag (int >= 0; the flag
            comes at the earliest ``confirm`` evaluations after the fall).
        post_window: Largest post window (int > ``confirm``).
        baseline: Evaluations averaged for the pre-drop level (int >= 2).
        max_rebound: Largest fraction of the fall a post evaluation may recover, beyond its noise
            (in [0, 1)).
        lookback: First differences before the drop used for the trend and noise (int >= 2).
        min_history: Finite evaluations needed up to and including the drop start
            (int in [3, lookback + 1]).
        noise_multiplier: Optional extra gate (earlier versions' rule): :math:`E` at least this
            many robust scales of one first difference. ``None``: off.
        stderr_multiplier: Optional extra gate: :math:`E` at least this many combined standard
            errors of two single estimates. ``None``: off.

    Raises:
        ValueError: If an argument is outside its range; the message names it and the range.

    Example:
        >>> det = TraceSharpDropDetector()
        >>> series = [100, 103, 98, 101, 99, 102, 100, 97, 60, 31, 29, 32, 30, 31]
        >>> [epoch for epoch, x in enumerate(series) if det.update(epoch, x, stderr=2.0)]
        [10]
        >>> det.flagged, det.drop_start_epoch, det.drop_middle_epoch, round(det.drop_size, 2)
        (True, 7, 8, 0.6)
        >>> round(det.drop_z, 1), round(det.threshold, 2)  # Z and the threshold at 5 % per 50 evaluations
        (32.6, 3.12)
        >>> det.update(14, 30.0)  # already flagged: never True again
        False
    """

    def __init__(
        self,
        window: int = 3,
        min_relative_drop: float = 0.35,
        noise_multiplier: float | None = None,
        stderr_multiplier: float | None = None,
        confirm: int = 2,
        max_rebound: float = 0.3,
        lookback: int = 10,
        min_history: int = 6,
        *,
        false_alarm_rate: float = 0.05,
        horizon: int = 50,
        post_window: int = 6,
        baseline: int = 6,
    ) -> None:
        self.false_alarm_rate = check_float("false_alarm_rate", false_alarm_rate, 0.0, 0.5, True, False)
        self.horizon = check_int("horizon", horizon, 10)
        self.min_relative_drop = check_float("min_relative_drop", min_relative_drop, 0.0, 1.0, False, True)
        self.window = check_int("window", window, 1)
        self.confirm = check_int("confirm", confirm, 0)
        self.post_window = check_int("post_window", post_window, self.confirm + 1)
        self.baseline = check_int("baseline", baseline, 2)
        self.max_rebound = check_float("max_rebound", max_rebound, 0.0, 1.0, False, True)
        self.lookback = check_int("lookback", lookback, 2)
        self.min_history = check_int("min_history", min_history, 3, self.lookback + 1)
        self.noise_multiplier = _optional_multiplier("noise_multiplier", noise_multiplier)
        self.stderr_multiplier = _optional_multiplier("stderr_multiplier", stderr_multiplier)
        self.rule = DropRule(
            self.window,
            self.confirm,
            self.post_window,
            self.baseline,
            self.lookback,
            self.min_history,
            self.max_rebound,
            self.min_relative_drop,
            self.noise_multiplier,
            self.stderr_multiplier,
        )
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every evaluation and any flagged drop (the configuration is kept)."""
        self._epochs: list[int] = []
        self._traces: list[float] = []
        self._stderrs: list[float | None] = []
        self._dofs: list[int | None] = []
        # Finite evaluations only: what the rule sees (variance 0 = unknown).
        self._f_epochs: list[int] = []
        self._f_traces: list[float] = []
        self._f_vars: list[float] = []
        self._f_dofs: list[int | None] = []
        self.flagged: bool = False
        self.flagged_at_epoch: int | None = None
        self.drop_start_epoch: int | None = None
        self.drop_middle_epoch: int | None = None
        self.drop_middle_epoch_interpolated: float | None = None
        self.drop_size: float | None = None
        self.pre_drop_level: float | None = None
        self.post_drop_level: float | None = None
        self.drop_z: float | None = None
        self.threshold: float | None = None

    @property
    def history(self) -> TraceHistory:
        """All evaluations received, as given (NaN/Inf traces included, ``None`` stderrs kept)."""
        return TraceHistory(tuple(self._epochs), tuple(self._traces), tuple(self._stderrs))

    def state_dict(self) -> dict[str, Any]:
        """The detector's state as plain Python values (lists, floats, ints, bools, ``None``).

        The configuration is not included: it belongs to the constructor. Restoring the state
        into a detector built with the same arguments reproduces the uninterrupted run exactly.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "epochs": list(self._epochs),
            "traces": list(self._traces),
            "stderrs": list(self._stderrs),
            "dofs": list(self._dofs),
            "flagged": self.flagged,
            "drop_z": self.drop_z,
            "threshold": self.threshold,
        }
        for key in _RESULT_KEYS:
            state[key] = getattr(self, key)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (version-1 states: standard errors exact).

        Raises:
            ValueError: If ``state`` is malformed (missing keys, unequal lengths, epochs not
                strictly increasing, negative standard errors).
        """
        missing = {"epochs", "traces", "stderrs", "flagged", *_RESULT_KEYS} - set(state)
        if missing:
            raise ValueError(f"`state` lacks the keys {sorted(missing)}.")
        epochs, traces, stderrs = list(state["epochs"]), list(state["traces"]), list(state["stderrs"])
        dofs = list(state.get("dofs", [None if s is None else 0 for s in stderrs]))
        if not len(epochs) == len(traces) == len(stderrs) == len(dofs):
            raise ValueError(
                f"`state` has {len(epochs)} epochs, {len(traces)} traces, {len(stderrs)} stderrs and "
                f"{len(dofs)} dofs; they must be equally long."
            )
        flagged = bool(state["flagged"])
        results = {key: state[key] for key in _RESULT_KEYS}
        self.reset()
        for epoch, trace, stderr, dof in zip(epochs, traces, stderrs, dofs, strict=True):
            self._record(epoch, trace, stderr, dof)
        self.flagged = flagged
        for key, value in results.items():
            setattr(self, key, value)
        self.drop_z, self.threshold = state.get("drop_z"), state.get("threshold")

    # ------------------------------------------------------------------ update
    def _record(self, epoch: Any, trace: Any, stderr: Any, dof: int | None) -> bool:
        """Validate and append one evaluation; return whether its trace is finite."""
        try:
            epoch = operator.index(epoch)
        except TypeError:
            raise TypeError(f"`epoch` must be an int, got {type(epoch).__name__}.") from None
        if self._epochs and epoch <= self._epochs[-1]:
            raise ValueError(f"`epoch` must be strictly increasing: got {epoch} after {self._epochs[-1]}.")
        trace = float(trace)
        if stderr is not None:
            stderr = float(stderr)
            if stderr < 0:
                raise ValueError(f"`stderr` must be >= 0 (or None), got {stderr!r}.")
        known = stderr is not None and math.isfinite(stderr)
        self._epochs.append(epoch)
        self._traces.append(trace)
        self._stderrs.append(stderr)
        self._dofs.append(dof if known else None)
        if not math.isfinite(trace):
            return False
        self._f_epochs.append(epoch)
        self._f_traces.append(trace)
        self._f_vars.append(stderr * stderr if known else 0.0)
        self._f_dofs.append(dof if known else None)
        return True

    def update(
        self,
        epoch: int,
        trace: float,
        stderr: float | None = None,
        *,
        interval: tuple[float, float] | None = None,
        interval_level: float = 0.95,
    ) -> bool:
        """Record one evaluation; ``True`` exactly when it confirms the sharp drop.

        Args:
            epoch: The evaluation's epoch; strictly larger than the previous one (gaps allowed).
            trace: The trace estimate. NaN/Inf is recorded in :attr:`history` and otherwise
                ignored (returns ``False``).
            stderr: Standard error of ``trace`` (>= 0), or ``None`` if unknown; a NaN/Inf
                standard error is treated as unknown.
            interval: A two-sided confidence interval of ``trace`` at ``interval_level`` (e.g.
                :meth:`~lightning_hessian.SpectralDensity.trace_confidence_interval`). With
                ``stderr``, its width gives the degrees of freedom of the standard error (a
                Student-t interval from 3 probes is 4.30 standard errors wide: 2 degrees of
                freedom), which the threshold accounts for; alone, its half-width over the normal
                quantile is the standard error. An infinite interval means unknown.
            interval_level: Confidence level of ``interval``.

        Returns:
            ``True`` on the one evaluation that confirms a drop, ``False`` otherwise (also on
            every evaluation after it).

        Raises:
            ValueError: If ``epoch`` is not strictly increasing, ``stderr`` is negative or the
                interval is malformed.
            TypeError: If ``epoch`` is not an integer.
        """
        dof: int | None = 0
        if interval is not None:
            stderr, dof = _from_interval(stderr, interval, interval_level)
        finite = self._record(epoch, trace, stderr, dof)
        if self.flagged or not finite:
            return False
        return self._detect()

    def update_from_log(
        self, epoch: int, trace: float, stderr: float, ci_low: float = math.nan, ci_high: float = math.nan
    ) -> bool:
        """:meth:`update` from the monitor's logged values, exactly as ``HessianMonitor`` calls it online.

        The interval (95 %) is used when both ends are finite, the standard error when finite.
        """
        se = stderr if math.isfinite(stderr) else None
        if math.isfinite(ci_low) and math.isfinite(ci_high):
            return self.update(epoch, trace, se, interval=(ci_low, ci_high), interval_level=0.95)
        return self.update(epoch, trace, se)

    # ------------------------------------------------------------------ rule
    def _detect(self) -> bool:
        x = np.asarray([self._f_traces])
        t = x.shape[1] - 1
        falls = candidate_falls(self.rule, x, np.asarray([self._f_vars]), t)
        if falls is None:
            return False
        threshold = alarm_threshold(self.rule, self.false_alarm_rate, self.horizon, _noise_kind(self._f_dofs))
        passing = np.flatnonzero(falls.z[0] >= threshold)
        if passing.size == 0:
            return False
        # the largest fall among the qualifying splits (ties: the earliest)
        k = int(passing[np.argmax(falls.fall[0, passing])])
        p, c = int(falls.p[k]), int(falls.c[k])
        pre, post = float(falls.pre[0, k]), float(falls.post[0, k])
        start, middle, middle_interp = locate_drop(self._f_traces, self._f_epochs, p, c, pre, post)
        self.flagged = True
        self.flagged_at_epoch = self._f_epochs[t]
        self.drop_start_epoch, self.drop_middle_epoch = start, middle
        self.drop_middle_epoch_interpolated = middle_interp
        self.drop_size = (pre - post) / pre
        self.pre_drop_level, self.post_drop_level = pre, post
        self.drop_z, self.threshold = float(falls.z[0, k]), threshold
        return True

    def __repr__(self) -> str:
        return _describe(self)


def _noise_kind(dofs: list[int | None]) -> int | None:
    """The calibration's noise model: ``None`` (no standard errors), 0 (exact) or the fewest degrees of freedom."""
    known = [d for d in dofs if d is not None]
    if not known:
        return None
    finite = [d for d in known if d > 0]
    return min(finite) if finite else 0


def _describe(det: TraceSharpDropDetector) -> str:
    status = (
        f"flagged at epoch {det.flagged_at_epoch}: drop of {det.drop_size:.0%} starting at epoch "
        f"{det.drop_start_epoch}, middle {det.drop_middle_epoch}"
        if det.flagged
        else "not flagged"
    )
    return (
        f"{type(det).__name__}(false_alarm_rate={det.false_alarm_rate}, horizon={det.horizon}, "
        f"min_relative_drop={det.min_relative_drop}, window={det.window}, confirm={det.confirm}, "
        f"post_window={det.post_window}, baseline={det.baseline}, max_rebound={det.max_rebound}, "
        f"lookback={det.lookback}, min_history={det.min_history}; {len(det._epochs)} evaluations, {status})"
    )


def _optional_multiplier(name: str, value: Any) -> float | None:
    return None if value is None else check_float(name, value, 0.0, math.inf, False, True)


def _from_interval(
    stderr: float | None, interval: tuple[float, float], level: float
) -> tuple[float | None, int | None]:
    """(standard error, degrees of freedom) from an interval (and the standard error, if given)."""
    if not 0 < level < 1:
        raise ValueError(f"`interval_level` must be in (0, 1), got {level}.")
    low, high = float(interval[0]), float(interval[1])
    if high < low:
        raise ValueError(f"`interval` must be (low, high) with low <= high, got {interval!r}.")
    half = 0.5 * (high - low)
    if not math.isfinite(half):
        return stderr, 0
    if stderr is not None and math.isfinite(stderr) and stderr > 0 and half > 0:
        return stderr, dof_from_interval(stderr, half, level)
    return half / normal_quantile(0.5 + level / 2), 0
