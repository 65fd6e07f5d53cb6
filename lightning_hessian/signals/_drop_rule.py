r"""The sharp-drop rule's named steps, vectorised over sequences (numpy).

One function computes, at evaluation :math:`t`, the standardised sudden fall :math:`Z` of every
candidate split of the trace sequence (:func:`candidate_falls`); the online detector evaluates it
on one sequence, :func:`alarm_threshold` on thousands of simulated stationary ones to turn the
false-alarm rate into the threshold on :math:`Z`. Both therefore apply exactly the same rule.
See :class:`~lightning_hessian.TraceSharpDropDetector` for the rule in words and formulas.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_hessian._utils.stats import normal_quantile, student_t_quantile

__all__ = [
    "DropRule",
    "Falls",
    "alarm_threshold",
    "candidate_falls",
    "dof_from_interval",
    "first_flags",
    "locate_drop",
    "simulated_noise",
]

# Robust-scale constant: 1.4826 * MAD estimates the standard deviation of Gaussian data.
MAD_TO_SIGMA = 1.4826
# "Stays down": a post-fall evaluation may exceed the recovery bound by this many noise scales.
REBOUND_NOISE = 2.0
# The drop "begins" at the last evaluation before the half-way crossing whose trace is still
# within this fraction of the fall from the pre-drop level.
START_FRACTION = 0.25
# Monte Carlo calibration: sequences simulated (at least), and the generator's fixed seed.
CALIBRATION_RUNS = 2000
CALIBRATION_SEED = 20221128
# Degrees of freedom told apart from an interval's width; more count as a normal interval.
MAX_DOF = 200


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    valid = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {valid}, got {value}.")
    return value


def check_float(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    valid = f"a finite real number in {interval}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    value = float(value)
    bad = not math.isfinite(value) or value < low or value > high
    if bad or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"`{name}` must be {valid}, got {value!r}.")
    return value


@dataclass(frozen=True)
class DropRule:
    """The rule's structural parameters (see the detector's arguments of the same names)."""

    window: int
    confirm: int
    post_window: int
    baseline: int
    lookback: int
    min_history: int
    max_rebound: float
    min_relative_drop: float
    noise_multiplier: float | None = None
    stderr_multiplier: float | None = None

    def calibration_rule(self) -> DropRule:
        """The rule without its size gates (relative size, legacy multipliers): what the threshold protects."""
        return DropRule(
            self.window,
            self.confirm,
            self.post_window,
            self.baseline,
            self.lookback,
            self.min_history,
            self.max_rebound,
            0.0,
        )


@dataclass
class Falls:
    """Every candidate split at one evaluation, for a batch of sequences: arrays ``(batch, candidates)``."""

    z: np.ndarray  # standardised sudden fall, -inf where a gate fails
    fall: np.ndarray  # D = mean(pre) - mean(post)
    pre: np.ndarray  # pre-drop level (mean of the baseline window)
    post: np.ndarray  # post-drop level (mean of the post window)
    p: np.ndarray  # last evaluation of the pre window (candidates,)
    c: np.ndarray  # first evaluation of the post window (candidates,)


def pre_trend_and_noise(x: np.ndarray, p: int, lookback: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Theil–Sen slope and robust per-evaluation variance of :math:`x_{\max(0,p-K)}, \dots, x_p`.

    The slope is the median of the pairwise slopes :math:`(x_b - x_a)/(b - a)`; the variance is
    :math:`\tfrac12 (1.4826\,\mathrm{MAD}(d))^2` of the first differences :math:`d`, i.e. that of
    one evaluation if the differences are of independent evaluations around a smooth trend.
    """
    seg = x[:, max(0, p - lookback) : p + 1]
    m = seg.shape[1]
    i, j = np.triu_indices(m, 1)
    slope = np.median((seg[:, j] - seg[:, i]) / (j - i), axis=1)
    diffs = np.diff(seg, axis=1)
    mad = np.median(np.abs(diffs - np.median(diffs, axis=1, keepdims=True)), axis=1)
    return slope, 0.5 * (MAD_TO_SIGMA * mad) ** 2


def _candidates(rule: DropRule, t: int) -> list[tuple[int, int]]:
    """(p, c) pairs at evaluation ``t``: post window ``c..t``, fall between ``p`` and ``c``."""
    first_p = max(rule.min_history, rule.baseline) - 1
    pairs = []
    for n_post in range(rule.confirm + 1, rule.post_window + 1):
        c = t - n_post + 1
        for gap in range(rule.window):
            p = c - 1 - gap
            if p >= first_p:
                pairs.append((p, c))
    return pairs


def candidate_falls(
    rule: DropRule,
    x: np.ndarray,
    var: np.ndarray,
    t: int,
    pre_stats: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Falls | None:
    r"""The standardised sudden fall of every candidate split at evaluation ``t`` (``None``: no candidate).

    ``x``, ``var``: ``(batch, n)`` traces and squared standard errors (0 = unknown), ``n > t``.
    ``pre_stats``: cache of :func:`pre_trend_and_noise` per ``p`` (filled as needed).
    """
    pairs = _candidates(rule, t)
    if not pairs:
        return None
    pre_stats = {} if pre_stats is None else pre_stats
    cx = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x[:, : t + 1], axis=1)], axis=1)
    cv = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(var[:, : t + 1], axis=1)], axis=1)
    p = np.array([a for a, _ in pairs])
    c = np.array([b for _, b in pairs])
    b, n_post = rule.baseline, t - c + 1
    pre = (cx[:, p + 1] - cx[:, p + 1 - b]) / b
    post = (cx[:, t + 1 : t + 2] - cx[:, c]) / n_post
    pooled = (cv[:, p + 1] - cv[:, p + 1 - b] + cv[:, t + 1 : t + 2] - cv[:, c]) / (b + n_post)
    for q in set(p.tolist()) - set(pre_stats):
        pre_stats[q] = pre_trend_and_noise(x, q, rule.lookback)
    slope = np.stack([pre_stats[q][0] for q in p], axis=1)
    noise = np.stack([pre_stats[q][1] for q in p], axis=1)
    sigma = np.sqrt(np.maximum(pooled, noise))
    fall = pre - post
    span = (b - 1) / 2 + (c - p) + (n_post - 1) / 2  # between the centres of the two windows
    excess = fall - np.maximum(0.0, -slope) * span
    post_max = np.stack([x[:, ci : t + 1].max(axis=1) for ci in c], axis=1)
    ok = (pre > 0) & (excess > 0) & (excess >= rule.min_relative_drop * pre)
    ok &= post_max - REBOUND_NOISE * sigma <= pre - (1.0 - rule.max_rebound) * fall
    if rule.noise_multiplier is not None:  # legacy: multiple of one difference's robust scale
        ok &= excess >= rule.noise_multiplier * np.sqrt(2.0 * noise)
    if rule.stderr_multiplier is not None:  # legacy: multiple of two single estimates' errors
        ok &= excess >= rule.stderr_multiplier * np.sqrt(2.0 * pooled)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = excess / (sigma * np.sqrt(1.0 / b + 1.0 / n_post))
    z = np.where(ok, np.where(sigma > 0, z, math.inf), -math.inf)
    return Falls(z=z, fall=fall, pre=pre, post=post, p=p, c=c)


def simulated_noise(runs: int, horizon: int, dof: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Stationary sequences ``1000 + N(0, 1)`` and their reported squared standard errors.

    ``dof``: :math:`\chi^2_\nu/\nu` squared standard errors with :math:`\nu` = ``dof``; 0: exactly 1;
    ``None``: none reported (zeros).
    """
    rng = np.random.default_rng(seed)
    x = 1000.0 + rng.standard_normal((runs, horizon))
    if dof is None:
        return x, np.zeros((runs, horizon))
    if dof == 0:
        return x, np.ones((runs, horizon))
    return x, rng.chisquare(dof, (runs, horizon)) / dof


def largest_z(rule: DropRule, x: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Each sequence's largest :math:`Z` over all its evaluations and candidate splits (gates applied)."""
    best = np.full(x.shape[0], -math.inf)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(x.shape[1]):
        falls = candidate_falls(rule, x, var, t, cache)
        if falls is not None:
            best = np.maximum(best, falls.z.max(axis=1))
    return best


def first_flags(rule: DropRule, x: np.ndarray, var: np.ndarray, threshold: float) -> np.ndarray:
    """Index of each sequence's first flagged evaluation (-1: none): the detector's decision, vectorised."""
    first = np.full(x.shape[0], -1)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(x.shape[1]):
        falls = candidate_falls(rule, x, var, t, cache)
        if falls is not None:
            hit = (falls.z >= threshold).any(axis=1) & (first < 0)
            first[hit] = t
    return first


@functools.lru_cache(maxsize=128)
def alarm_threshold(rule: DropRule, false_alarm_rate: float, horizon: int, dof: int | None) -> float:
    r"""Threshold on :math:`Z`: a stationary run of ``horizon`` evaluations flags with probability ``false_alarm_rate``.

    Monte Carlo (fixed seed, so the threshold is a deterministic function of its arguments) over
    ``max(2000, 50 / false_alarm_rate)`` sequences :math:`x_i = \mu + \sigma\varepsilon_i`,
    :math:`\varepsilon_i \sim N(0, 1)` i.i.d., with reported squared standard errors
    :math:`\sigma^2\chi^2_\nu/\nu` (``dof`` :math:`=\nu`: the interval's degrees of freedom; 0: known
    exactly; ``None``: no standard error, the noise comes from the differences alone). The rule is
    applied without its size gates (which only remove flags), and the threshold is the
    :math:`1 - \alpha` quantile of each sequence's largest :math:`Z`. Cached per argument tuple.
    """
    runs = max(CALIBRATION_RUNS, math.ceil(50 / false_alarm_rate))
    x, var = simulated_noise(runs, horizon, dof, CALIBRATION_SEED)
    best = largest_z(rule.calibration_rule(), x, var)
    return float(np.quantile(best, 1.0 - false_alarm_rate, method="higher"))


@functools.lru_cache(maxsize=8)
def _t_quantiles(level: float) -> tuple[float, ...]:
    """Two-sided ``level`` Student-t quantiles for 1-``MAX_DOF`` degrees of freedom (decreasing)."""
    return tuple(student_t_quantile(0.5 + level / 2, dof) for dof in range(1, MAX_DOF + 1))


def dof_from_interval(stderr: float, half_width: float, level: float) -> int:
    """Degrees of freedom ``ν`` whose Student-t quantile is the interval's half-width over ``stderr``.

    0 when the ratio is (at most) the normal quantile or that of more than 200 degrees of freedom:
    a normal interval, the standard error taken as exact.
    """
    ratio = half_width / stderr
    quantiles = _t_quantiles(level)
    if ratio <= max(normal_quantile(0.5 + level / 2) * (1 + 1e-6), quantiles[-1]):
        return 0
    # the nearest quantile (they fall with the degrees of freedom)
    return 1 + min(range(MAX_DOF), key=lambda k: abs(quantiles[k] - ratio))


def locate_drop(
    x: list[float], epochs: list[int], p: int, c: int, pre_level: float, post_level: float
) -> tuple[int, int, float]:
    r"""(start epoch, middle epoch, interpolated middle) of a confirmed drop.

    With the half-way level :math:`h = (\bar x_{pre} + \bar x_{post})/2`: the last evaluation
    :math:`k^*` from the pre window up to ``c`` above :math:`h`, the first one :math:`j` after it at
    or below :math:`h`; the crossing epoch is interpolated linearly between :math:`e_{j-1}` and
    :math:`e_j` and rounded to the nearer. The start is the last evaluation before :math:`j`
    still within a quarter of the fall of the pre-drop level.
    """
    fall = pre_level - post_level
    half = 0.5 * (pre_level + post_level)
    window_start = max(0, p - 2)
    above = [k for k in range(window_start, c + 1) if x[k] > half]
    if not above:  # the pre level is a mean: its window may lie above half-way only further back
        above = [max(k for k in range(p + 1) if x[k] > half)] if any(v > half for v in x[: p + 1]) else [p]
    j = next((i for i in range(above[-1] + 1, len(x)) if x[i] <= half), c)
    start = next((k for k in range(j - 1, -1, -1) if x[k] >= pre_level - START_FRACTION * fall), p)
    denom = x[j - 1] - x[j]
    frac = (x[j - 1] - half) / denom if denom > 0 else 1.0
    frac = min(1.0, max(0.0, frac))
    middle_interp = epochs[j - 1] + frac * (epochs[j] - epochs[j - 1])
    middle = epochs[j] if frac >= 0.5 else epochs[j - 1]
    return epochs[start], middle, float(middle_interp)
