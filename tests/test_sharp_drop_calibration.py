"""Calibration of the sharp-drop alarm on generated sequences with known noise.

The detector's threshold comes from its ``false_alarm_rate``: a stationary sequence of ``horizon``
evaluations must flag with at most that probability. Checked here on fresh sequences (seeds other
than the calibration's), vectorised over 600 sequences with the rule's own batch function, which
is checked to take the class's decisions. Detection delay is measured on drops of 3 and 5 standard
errors injected into such sequences. The size gate is off (``min_relative_drop=0``): what is
calibrated is the noise test (the gate only removes flags).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_hessian import TraceSharpDropDetector
from lightning_hessian.signals._drop_rule import alarm_threshold, dof_from_interval, first_flags, simulated_noise

N_SEQUENCES = 600
HORIZON = 50


def _detector(**kwargs) -> TraceSharpDropDetector:
    return TraceSharpDropDetector(min_relative_drop=0.0, **kwargs)


def _flags(det: TraceSharpDropDetector, x: np.ndarray, var: np.ndarray, dof: int | None) -> np.ndarray:
    threshold = alarm_threshold(det.rule, det.false_alarm_rate, det.horizon, dof)
    return first_flags(det.rule, x, var, threshold)


def _inject(x: np.ndarray, size: float, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A linear fall by ``size`` over ``width`` evaluations starting after a random evaluation 19-34.

    Returns the onset (first evaluation below the old level) and the first evaluation at the new level.
    """
    onset = rng.integers(20, 35, x.shape[0])
    for r, a in enumerate(onset):
        for i in range(width):
            x[r, a + i] -= size * (i + 1) / width
        x[r, a + width :] -= size
    return onset, onset + width - 1


@pytest.mark.parametrize(("alpha", "dof"), [(0.05, 2), (0.01, 2), (0.2, 2), (0.05, 0), (0.05, 9), (0.05, None)])
def test_false_alarm_rate_within_its_bound(alpha: float, dof: int | None) -> None:
    """Stationary Gaussian noise, standard errors with ``dof`` degrees of freedom (0: exact; None: none)."""
    det = _detector(false_alarm_rate=alpha)
    x, var = simulated_noise(N_SEQUENCES, HORIZON, dof, seed=12345)
    rate = float((_flags(det, x, var, dof) >= 0).mean())
    slack = 3 * math.sqrt(alpha * (1 - alpha) / N_SEQUENCES)  # binomial, plus the calibration's own error
    assert rate <= alpha + slack, rate
    assert rate >= alpha / 3  # calibrated, not merely conservative


def test_false_alarm_rate_grows_with_the_run_length_as_stated() -> None:
    """Over 3 horizons a stationary run flags with probability at most ~3 alpha (a union bound)."""
    det = _detector(false_alarm_rate=0.02)
    x, var = simulated_noise(N_SEQUENCES, 3 * HORIZON, 2, seed=999)
    rate = float((_flags(det, x, var, 2) >= 0).mean())
    assert 0.02 <= rate <= 3 * 0.02 + 3 * math.sqrt(0.06 * 0.94 / N_SEQUENCES)


def test_batch_rule_takes_the_detectors_decisions() -> None:
    """``first_flags`` (used for calibration and these tests) equals feeding the class one by one."""
    det = _detector()
    x, var = simulated_noise(30, HORIZON, 2, seed=5)
    _inject(x[:15], 4.0, 2, np.random.default_rng(0))
    expected = _flags(det, x, var, 2)
    for r in range(x.shape[0]):
        one = _detector()
        flags = [
            t
            for t in range(HORIZON)
            if one.update(
                t,
                float(x[r, t]),
                math.sqrt(var[r, t]),
                interval=(x[r, t] - 4.302653 * math.sqrt(var[r, t]), x[r, t] + 4.302653 * math.sqrt(var[r, t])),
            )
        ]
        assert flags == ([] if expected[r] < 0 else [int(expected[r])])
    assert (expected[:15] >= 0).sum() >= 10  # the injected drops are mostly found


@pytest.mark.parametrize("width", [1, 2, 3])
def test_delay_on_drops_of_three_standard_errors(width: int) -> None:
    """Median delay (flag minus the first evaluation at the new level; a miss counts as infinite) <= 2."""
    det = _detector()
    x, var = simulated_noise(400, HORIZON, 2, seed=100 + width)
    onset, low = _inject(x, 3.0, width, np.random.default_rng(width))
    flags = _flags(det, x, var, 2)
    delay = np.where(flags >= onset, flags - low, 10**6)
    assert np.median(delay) <= 2
    assert (flags >= onset).mean() >= 0.75


@pytest.mark.parametrize("width", [1, 3])
def test_delay_on_drops_of_five_standard_errors(width: int) -> None:
    det = _detector()
    x, var = simulated_noise(400, HORIZON, 2, seed=200 + width)
    onset, low = _inject(x, 5.0, width, np.random.default_rng(width))
    flags = _flags(det, x, var, 2)
    assert (flags >= onset).mean() >= 0.9
    assert np.median(np.where(flags >= onset, flags - low, 10**6)) <= 2


def test_the_knob_trades_false_alarms_for_delay() -> None:
    thresholds = [alarm_threshold(_detector().rule, a, HORIZON, 2) for a in (0.01, 0.05, 0.2)]
    assert thresholds[0] > thresholds[1] > thresholds[2]
    x, var = simulated_noise(400, HORIZON, 2, seed=77)
    onset, _ = _inject(x, 3.0, 1, np.random.default_rng(7))
    found = [float((_flags(_detector(false_alarm_rate=a), x, var, 2) >= onset).mean()) for a in (0.01, 0.05, 0.2)]
    assert found[0] < found[1] < found[2]


def test_the_threshold_is_deterministic_and_cached() -> None:
    rule = _detector().rule
    first = alarm_threshold(rule, 0.05, HORIZON, 2)
    alarm_threshold.cache_clear()
    assert alarm_threshold(rule, 0.05, HORIZON, 2) == first


@pytest.mark.parametrize("dof", [1, 2, 4, 9, 29])
def test_degrees_of_freedom_from_a_student_t_interval(dof: int) -> None:
    from scipy import stats

    half = 0.7 * float(stats.t.ppf(0.975, dof))
    assert dof_from_interval(0.7, half, 0.95) == dof
    assert dof_from_interval(0.7, 0.7 * 1.959964, 0.95) == 0  # a normal interval
