"""Online detection of the Hessian trace's "sudden sharp drop" (:doc:`/methods/sharp-drop-and-ood`).

Alabdulkareem, *Dynamics of the Hessian of the Loss during training* (NeurIPS 2022), §7.7
(Conjecture 3, figure 6) reports that in many
runs the trace of the Hessian, after rising during early training, falls suddenly and by a large
amount (often more than half) within a few epochs, and that the epoch where the trace is
*mid-drop* coincides with the epoch where validation accuracy peaks and plateaus.
:class:`TraceSharpDropDetector` recognises that event online from one trace estimate per
evaluation. It is pure Python (no torch, no Lightning), so a callback can drive it and any
process can replay it from its :meth:`~TraceSharpDropDetector.state_dict`.
"""

from __future__ import annotations

import math
import numbers
import operator
import statistics
from typing import Any, NamedTuple

from lightning_hessian._utils.stats import normal_quantile

__all__ = ["TraceHistory", "TraceSharpDropDetector"]

# Robust-scale constant: 1.4826 * MAD estimates the standard deviation of Gaussian data.
_MAD_TO_SIGMA = 1.4826
# Number of evaluations (ending at the candidate drop start) whose median is the pre-drop level.
_PRE_LEVEL_POINTS = 3
# The drop "begins" at the last evaluation before the half-way crossing whose trace is still
# within this fraction of the drop from the pre-drop level.
_START_FRACTION = 0.25
_STATE_VERSION = 1


class TraceHistory(NamedTuple):
    """Every evaluation fed to :meth:`TraceSharpDropDetector.update`, in order, as given.

    Non-finite traces are kept here (they are only skipped by the detection rule).
    """

    epochs: tuple[int, ...]
    traces: tuple[float, ...]
    stderrs: tuple[float | None, ...]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    valid = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {valid}, got {value}.")
    return value


def _check_float(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    valid = f"a finite real number in {interval}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    value = float(value)
    if (
        not math.isfinite(value)
        or value < low
        or value > high
        or (low_open and value == low)
        or (high_open and value == high)
    ):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    return value


def _theil_sen_slope(values: list[float]) -> float:
    """Median of the pairwise slopes ``(v_j - v_i) / (j - i)``, ``i < j`` (per evaluation)."""
    n = len(values)
    return statistics.median((values[j] - values[i]) / (j - i) for i in range(n) for j in range(i + 1, n))


class TraceSharpDropDetector:
    r"""Flags the sudden, large, lasting fall of the Hessian trace (paper §7.7, :doc:`/methods/sharp-drop-and-ood`).

    Feed one evaluation at a time with :meth:`update`; it returns ``True`` on exactly one
    evaluation: the one that *confirms* a drop (``confirm`` evaluations after the fall ended).
    Detection then stops; the result attributes stay set until :meth:`reset`.

    **Rule.** Let :math:`x_0, x_1, \dots, x_t` be the *finite* trace estimates received so far
    (evaluations whose trace is NaN/Inf are recorded in :attr:`history` but skipped entirely:
    they neither count towards any window nor trigger, and they never raise), :math:`s_i` their
    standard errors (unknown, ``None`` or non-finite, counts as 0), :math:`W` = ``window``,
    :math:`C` = ``confirm``, :math:`K` = ``lookback``. At evaluation :math:`t` the candidate end
    of the fall is :math:`q = t - C`, and for every candidate start :math:`p` with
    :math:`q - W \le p \le q - 1` and :math:`p + 1 \ge` ``min_history``:

    * pre-drop level :math:`\bar x_{pre} = \operatorname{median}(x_{p-2}, x_{p-1}, x_p)`,
      post-drop level :math:`\bar x_{post} = \operatorname{median}(x_q, \dots, x_t)`,
      fall :math:`D = \bar x_{pre} - \bar x_{post}`;
    * recent epoch-to-epoch variation, from the first differences
      :math:`d_i = x_i - x_{i-1}`, :math:`\max(1, p-K+1) \le i \le p`: robust scale
      :math:`\sigma_d = 1.4826\,\operatorname{median}_i|d_i - \operatorname{median}(d)|` (MAD);
    * pre-drop trend per evaluation: the Theil–Sen slope
      :math:`m = \operatorname{median}_{a<b}\,(x_b - x_a)/(b - a)` over
      :math:`x_{\max(0,p-K)}, \dots, x_p` (robust, and far less noisy than the median of
      single differences);
    * the part of the fall a pre-existing *decline* explains,
      :math:`\tau = \max(0, -m)\,\big((q - p) + 1 + C/2\big)` (the trend carried over the steps
      between the centres of the two level windows), and the *sudden* excess
      :math:`E = D - \tau`;
    * combined standard error :math:`\sigma_E = \sqrt{\tilde s_{pre}^2 + \tilde s_{post}^2}`,
      :math:`\tilde s` the median standard error over each level window (that of one
      estimate, deliberately not divided by the window size: conservative).

    A drop is confirmed when, for some :math:`p`, all of

    1. :math:`\bar x_{pre} > 0` (a relative drop needs a positive level);
    2. :math:`E \ge \rho_{min}\,\bar x_{pre}` with :math:`\rho_{min}` = ``min_relative_drop``;
    3. :math:`E \ge k_{noise}\,\sigma_d` with :math:`k_{noise}` = ``noise_multiplier``;
    4. :math:`E \ge k_{se}\,\sigma_E` with :math:`k_{se}` = ``stderr_multiplier``;
    5. it stays down: :math:`\max(x_q, \dots, x_t) \le \bar x_{pre} - (1 - r)\,D` with
       :math:`r` = ``max_rebound`` (no evaluation after the fall recovers more than a fraction
       :math:`r` of it),

    hold; among the :math:`p` that qualify the largest :math:`D` wins (ties: earliest). A
    one-epoch noise dip fails 5 (and usually 2, since the post level is a median); a noisy
    plateau fails 2 and 3; a slow steady decline (geometric or linear) fails 2, because its fall
    is spread evenly over time and the trend term :math:`\tau` removes it; a drop no larger than
    its estimates' errors fails 4.

    **Reported quantities** (all ``None`` before a drop is flagged):

    * :attr:`drop_size` :math:`= D / \bar x_{pre}`: the *total* fall as a fraction of the
      pre-drop level (0.7 means the trace lost 70 %); :attr:`pre_drop_level` and
      :attr:`post_drop_level` are :math:`\bar x_{pre}` and :math:`\bar x_{post}`.
    * :attr:`drop_middle_epoch`: the paper's vertical line. With the half-way level
      :math:`h = (\bar x_{pre} + \bar x_{post})/2`, let :math:`k^*` be the last evaluation in
      :math:`[p-2, q]` with :math:`x_{k^*} > h` and :math:`j` the first after it with
      :math:`x_j \le h` (the final downward crossing, so a noise dip before the fall is not
      taken for it); linear interpolation between :math:`x_{j-1} > h` and :math:`x_j` gives
      the crossing epoch :math:`e_{j-1} + f\,(e_j - e_{j-1})`,
      :math:`f = (x_{j-1} - h)/(x_{j-1} - x_j)` (:attr:`drop_middle_epoch_interpolated`), which
      is rounded to the nearest evaluated epoch (:math:`e_j` if :math:`f \ge 1/2`, else
      :math:`e_{j-1}`).
    * :attr:`drop_start_epoch`: the epoch the drop began, i.e. the last evaluated epoch before
      the half-way crossing whose trace is still within 25 % of the fall from the pre-drop level
      (:math:`x_k \ge \bar x_{pre} - D/4`); the trace falls *after* this epoch.
    * :attr:`flagged_at_epoch`: the epoch of the confirming evaluation (:math:`e_t`).

    Windows are counted in (finite) *evaluations*, not epochs, so a callback that evaluates every
    ``n`` epochs gets the same behaviour on a coarser clock; epochs are only recorded as given
    and used for reporting.

    **Defaults and why.** Chosen on the synthetic generator in ``tests/test_sharp_drop.py``
    (a rise to the peak level, a noisy plateau of 0–30 epochs, a fall of 40–85 % over 1–3
    evaluations, a noisy low plateau; multiplicative noise 2–8 %, matching standard errors).
    On 300 such series the defaults flag 99.7 %, all with start and middle within one epoch of
    the truth, 4.9 evaluations after the start on average, with :attr:`drop_size` within 0.04 of
    the truth in 95 % of them. They flag none of 300 noisy plateaus (noise up to 15 %), geometric
    declines of 3 and 5 %/epoch over 50 epochs (after a plateau or a rise, 5 % noise), linear
    declines to 2–10 % of the level, one- and two-epoch dips of 60 %:

    * ``window=3``: the paper's drops take "a few epochs"; 3 evaluations catch falls spread over
      up to 3 evaluations (50 % falls over 4 are still found, 97 %) while a slow decline cannot
      accumulate much within them. A longer fall may still be flagged, with start and middle
      placed on its steepest ``window``-long part.
    * ``confirm=3``: the post level is a median of 4 evaluations, robust to one outlier, and a
      one- or two-epoch dip fails the stays-down test; the flag comes a few evaluations after
      the fall (the paper's use is retrospective, so latency is cheap).
    * ``min_relative_drop=0.35``: the paper's drops are large (often > 50 %). The rule spans
      :math:`W + 1 + C/2 = 5.5` steps, over which a 5 %/epoch decline loses about 25 %, more
      with noise, and the trend estimate lags at the onset of a decline: with 0.3, 4–7 % of
      the 5 %/epoch declines above were flagged; with 0.35 none (1.3 % at 8 % noise), at the
      cost of some 40 % drops (81–92 % found at 6 % noise; 50 % drops: 98.5–100 %). Declines of
      7 %/epoch are partly flagged (10–24 %): over a few epochs they are drops; ``window=2`` or
      a larger ``min_relative_drop`` excludes them.
    * ``noise_multiplier=3.0`` and ``stderr_multiplier=3.0``: "clearly more than" the noise, at
      the usual 3-sigma level. The scales are those of a single difference / single estimate,
      conservative for a difference of medians: a 50 % drop is found in 100 / 91 / 62 % of
      series with 4 / 8 / 12 % noise (2.0 finds 86 % at 12 % but raises false alarms on
      heavy-tailed Student-t(3) plateaus of 15 % scale from 1.3 % to 2.7 %).
    * ``max_rebound=0.3``: after the fall the trace must stay in its lower 30 %. Against 0.5,
      this stops a window that ends on the first step of a multi-step fall from passing, so the
      reported size is unbiased (95th percentile of its error 0.037 instead of 0.055, worst
      0.08 instead of 0.14) and 7 %/epoch declines pass less often, for about 0.5 evaluation
      of extra latency and a few percent fewer 40 % drops at 8 % noise.
    * ``lookback=10``, ``min_history=5``: 10 differences give a usable MAD and Theil–Sen slope
      while following the rise/plateau phases; a drop can be found once 5 evaluations precede
      its start.

    Args:
        window: Largest number of evaluations :math:`q - p` over which the fall may happen
            (int >= 1).
        min_relative_drop: Smallest sudden fall, as a fraction of the pre-drop level
            (in (0, 1)).
        noise_multiplier: Multiple of the robust epoch-to-epoch scale the sudden fall must
            exceed (>= 0; 0 disables this test).
        stderr_multiplier: Multiple of the combined standard error the sudden fall must exceed
            (>= 0; 0 disables this test).
        confirm: Evaluations after the end of the fall that must stay down before the drop is
            confirmed (int >= 1).
        max_rebound: Largest fraction of the fall any post-fall evaluation may recover
            (in [0, 1)).
        lookback: Largest number of first differences before the drop used for the trend and
            noise scale (int >= 2).
        min_history: Finite evaluations needed up to and including the drop start
            (int in [3, lookback + 1]).

    Raises:
        ValueError: If an argument is outside its range; the message names it and the range.

    Example:
        >>> det = TraceSharpDropDetector()
        >>> series = [100, 103, 98, 101, 99, 102, 100, 97, 60, 31, 29, 32, 30, 31]
        >>> [epoch for epoch, x in enumerate(series) if det.update(epoch, x, stderr=2.0)]
        [12]
        >>> det.flagged, det.drop_start_epoch, det.drop_middle_epoch, round(det.drop_size, 2)
        (True, 7, 8, 0.69)
        >>> det.flagged_at_epoch  # the fall ended at epoch 9, confirmed by epochs 10-12
        12
        >>> det.update(14, 30.0)  # already flagged: never True again
        False
    """

    def __init__(
        self,
        window: int = 3,
        min_relative_drop: float = 0.35,
        noise_multiplier: float = 3.0,
        stderr_multiplier: float = 3.0,
        confirm: int = 3,
        max_rebound: float = 0.3,
        lookback: int = 10,
        min_history: int = 5,
    ) -> None:
        self.window = _check_int("window", window, 1)
        self.min_relative_drop = _check_float("min_relative_drop", min_relative_drop, 0.0, 1.0, True, True)
        self.noise_multiplier = _check_float("noise_multiplier", noise_multiplier, 0.0, math.inf, False, True)
        self.stderr_multiplier = _check_float("stderr_multiplier", stderr_multiplier, 0.0, math.inf, False, True)
        self.confirm = _check_int("confirm", confirm, 1)
        self.max_rebound = _check_float("max_rebound", max_rebound, 0.0, 1.0, False, True)
        self.lookback = _check_int("lookback", lookback, 2)
        self.min_history = _check_int("min_history", min_history, 3, self.lookback + 1)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every evaluation and any flagged drop (the configuration is kept)."""
        self._epochs: list[int] = []
        self._traces: list[float] = []
        self._stderrs: list[float | None] = []
        # Finite evaluations only: what the rule sees.
        self._f_epochs: list[int] = []
        self._f_traces: list[float] = []
        self._f_stderrs: list[float] = []
        self.flagged: bool = False
        self.flagged_at_epoch: int | None = None
        self.drop_start_epoch: int | None = None
        self.drop_middle_epoch: int | None = None
        self.drop_middle_epoch_interpolated: float | None = None
        self.drop_size: float | None = None
        self.pre_drop_level: float | None = None
        self.post_drop_level: float | None = None

    @property
    def history(self) -> TraceHistory:
        """All evaluations received, as given (NaN/Inf traces included, ``None`` stderrs kept)."""
        return TraceHistory(tuple(self._epochs), tuple(self._traces), tuple(self._stderrs))

    _RESULT_KEYS = (
        "flagged_at_epoch",
        "drop_start_epoch",
        "drop_middle_epoch",
        "drop_middle_epoch_interpolated",
        "drop_size",
        "pre_drop_level",
        "post_drop_level",
    )

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
            "flagged": self.flagged,
        }
        for key in self._RESULT_KEYS:
            state[key] = getattr(self, key)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Raises:
            ValueError: If ``state`` is malformed (missing keys, unequal lengths, epochs not
                strictly increasing, negative standard errors).
        """
        missing = {"epochs", "traces", "stderrs", "flagged", *self._RESULT_KEYS} - set(state)
        if missing:
            raise ValueError(f"`state` lacks the keys {sorted(missing)}.")
        epochs, traces, stderrs = list(state["epochs"]), list(state["traces"]), list(state["stderrs"])
        if not len(epochs) == len(traces) == len(stderrs):
            raise ValueError(
                f"`state` has {len(epochs)} epochs, {len(traces)} traces and {len(stderrs)} stderrs; "
                "they must be equally long."
            )
        flagged = bool(state["flagged"])
        results = {key: state[key] for key in self._RESULT_KEYS}
        self.reset()
        for epoch, trace, stderr in zip(epochs, traces, stderrs, strict=True):
            self._record(epoch, trace, stderr)
        self.flagged = flagged
        for key, value in results.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ update
    def _record(self, epoch: Any, trace: Any, stderr: Any) -> bool:
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
        self._epochs.append(epoch)
        self._traces.append(trace)
        self._stderrs.append(stderr)
        if not math.isfinite(trace):
            return False
        self._f_epochs.append(epoch)
        self._f_traces.append(trace)
        self._f_stderrs.append(stderr if stderr is not None and math.isfinite(stderr) else 0.0)
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
            interval: A two-sided confidence interval of ``trace`` at ``interval_level``
                (e.g. :meth:`~lightning_hessian.SpectralDensity.trace_confidence_interval`).
                When given it replaces ``stderr``: the uncertainty used is its half-width over
                the normal quantile of ``interval_level`` (1.96 at 0.95), so a Student-t
                interval from few probes (4.30 standard errors wide with 3 runs) widens the
                standard-error test accordingly; an infinite interval means unknown.
            interval_level: Confidence level of ``interval``.

        Returns:
            ``True`` on the one evaluation that confirms a drop, ``False`` otherwise (also on
            every evaluation after it).

        Raises:
            ValueError: If ``epoch`` is not strictly increasing or ``stderr`` is negative.
            TypeError: If ``epoch`` is not an integer.
        """
        if interval is not None:
            if not 0 < interval_level < 1:
                raise ValueError(f"`interval_level` must be in (0, 1), got {interval_level}.")
            low, high = float(interval[0]), float(interval[1])
            if high < low:
                raise ValueError(f"`interval` must be (low, high) with low <= high, got {interval!r}.")
            half = 0.5 * (high - low)
            stderr = half / normal_quantile(0.5 + interval_level / 2) if math.isfinite(half) else None
        finite = self._record(epoch, trace, stderr)
        if self.flagged or not finite:
            return False
        found = self._detect()
        if found is None:
            return False
        self._set_result(*found)
        return True

    # ------------------------------------------------------------------ rule
    def _detect(self) -> tuple[int, int, float, float] | None:
        x, se = self._f_traces, self._f_stderrs
        t = len(x) - 1
        q = t - self.confirm
        post = x[q:]
        if q < 1 or len(post) != self.confirm + 1:
            return None
        post_level = statistics.median(post)
        post_max = max(post)
        post_se = statistics.median(se[q:])
        best: tuple[int, int, float, float] | None = None
        best_fall = -math.inf
        for p in range(max(q - self.window, self.min_history - 1), q):
            pre_level = statistics.median(x[p - _PRE_LEVEL_POINTS + 1 : p + 1])
            if not pre_level > 0:
                continue
            fall = pre_level - post_level
            if fall <= 0 or post_max > pre_level - (1.0 - self.max_rebound) * fall:
                continue
            first = max(0, p - self.lookback)
            diffs = [x[i] - x[i - 1] for i in range(first + 1, p + 1)]
            mid = statistics.median(diffs)
            scale = _MAD_TO_SIGMA * statistics.median([abs(d - mid) for d in diffs])
            trend = _theil_sen_slope(x[first : p + 1])
            span = (q - p) + (_PRE_LEVEL_POINTS - 1) / 2 + self.confirm / 2
            excess = fall - max(0.0, -trend) * span
            pre_se = statistics.median(se[p - _PRE_LEVEL_POINTS + 1 : p + 1])
            combined_se = math.hypot(pre_se, post_se)
            if (
                excess >= self.min_relative_drop * pre_level
                and excess >= self.noise_multiplier * scale
                and excess >= self.stderr_multiplier * combined_se
                and fall > best_fall
            ):
                best, best_fall = (p, q, pre_level, post_level), fall
        return best

    def _set_result(self, p: int, q: int, pre_level: float, post_level: float) -> None:
        x, e = self._f_traces, self._f_epochs
        t = len(x) - 1
        fall = pre_level - post_level
        half = 0.5 * (pre_level + post_level)
        # The half-way crossing: the last evaluation from the pre-level window up to q still above
        # half-way (one exists: the pre-level median is above it), then the first one after it at
        # or below half-way (one exists: the post-level median is below it).
        above = max(k for k in range(p - _PRE_LEVEL_POINTS + 1, q + 1) if x[k] > half)
        j = next(i for i in range(above + 1, t + 1) if x[i] <= half)
        # The start: the last evaluation before the crossing still near the pre-drop level.
        start = next((k for k in range(j - 1, -1, -1) if x[k] >= pre_level - _START_FRACTION * fall), p)
        frac = (x[j - 1] - half) / (x[j - 1] - x[j])
        middle_interp = e[j - 1] + frac * (e[j] - e[j - 1])
        middle = e[j] if frac >= 0.5 else e[j - 1]
        self.flagged = True
        self.flagged_at_epoch = e[t]
        self.drop_start_epoch = e[start]
        self.drop_middle_epoch = middle
        self.drop_middle_epoch_interpolated = float(middle_interp)
        self.drop_size = fall / pre_level
        self.pre_drop_level = pre_level
        self.post_drop_level = post_level

    def __repr__(self) -> str:
        status = (
            f"flagged at epoch {self.flagged_at_epoch}: drop of {self.drop_size:.0%} starting at epoch "
            f"{self.drop_start_epoch}, middle {self.drop_middle_epoch}"
            if self.flagged
            else "not flagged"
        )
        return (
            f"{type(self).__name__}(window={self.window}, min_relative_drop={self.min_relative_drop}, "
            f"noise_multiplier={self.noise_multiplier}, stderr_multiplier={self.stderr_multiplier}, "
            f"confirm={self.confirm}, max_rebound={self.max_rebound}, lookback={self.lookback}, "
            f"min_history={self.min_history}; {len(self._epochs)} evaluations, {status})"
        )
