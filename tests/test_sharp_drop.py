"""Tests of :class:`lightning_hessian.signals.sharp_drop.TraceSharpDropDetector` on synthetic trace series.

The generator mimics the trajectories of Alabdulkareem (2022) §7.7: the trace rises early in
training, plateaus (noisily), then falls suddenly by a large fraction over a few evaluations and
stays low. The negatives are what must not be mistaken for that. The calibration of the alarm
(false-alarm rate within its bound, detection delay) is tested in ``test_sharp_drop_calibration.py``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from lightning_hessian.signals.sharp_drop import TraceHistory, TraceSharpDropDetector

# ----------------------------------------------------------------------------- generator


def _rise(rng: np.random.Generator, level: float, n: int) -> np.ndarray:
    """A saturating rise from 20–60 % of ``level`` to ``level`` over ``n`` evaluations."""
    start = level * rng.uniform(0.2, 0.6)
    k = np.arange(n)
    return start + (level - start) * (1 - np.exp(-3.0 * k / max(n - 1, 1)))


def make_drop_series(
    rng: np.random.Generator,
    *,
    size: float,
    duration: int,
    noise: float,
    rise: int = 15,
    plateau: int = 15,
    post: int = 25,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Rise, noisy plateau, linear fall by ``size`` over ``duration`` evaluations, low plateau.

    Returns ``(traces, stderrs, start, middle)``: ``start`` is the index of the last evaluation
    at the pre-drop level (the fall happens after it), ``middle`` the (fractional) index where the
    clean series is half-way down.
    """
    level = rng.uniform(20, 500)
    low = level * (1 - size)
    fall = level - (level - low) * np.arange(1, duration + 1) / duration
    clean = np.concatenate([_rise(rng, level, rise), np.full(plateau, level), fall, np.full(post, low)])
    noisy = clean * (1 + noise * rng.standard_normal(clean.size))
    return noisy, noise * clean, rise + plateau - 1, rise + plateau - 1 + duration / 2


def make_plateau(rng: np.random.Generator, noise: float, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    level = rng.uniform(20, 500)
    clean = np.concatenate([_rise(rng, level, 15), np.full(n - 15, level)])
    return clean * (1 + noise * rng.standard_normal(n)), noise * clean


def make_geometric(
    rng: np.random.Generator, rate: float, prefix: str, noise: float = 0.05, n: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """``prefix`` "plateau" (10 flat evaluations), "rise" (a rise) or "none", then (1-rate)^k."""
    level = rng.uniform(20, 500)
    head = {"plateau": np.full(10, level), "rise": _rise(rng, level, 15), "none": np.zeros(0)}[prefix]
    clean = np.concatenate([head, level * (1 - rate) ** np.arange(1, n + 1)])
    return clean * (1 + noise * rng.standard_normal(clean.size)), noise * clean


def make_linear(
    rng: np.random.Generator, end: float, noise: float = 0.05, n: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    level = rng.uniform(20, 500)
    clean = np.concatenate([np.full(10, level), level * np.linspace(1, end, n + 1)[1:]])
    return clean * (1 + noise * rng.standard_normal(clean.size)), noise * clean


def feed(det: TraceSharpDropDetector, traces, stderrs=None, epochs=None) -> list[int]:
    """Feed a series; return the epochs on which ``update`` returned True."""
    epochs = range(len(traces)) if epochs is None else epochs
    stderrs = [None] * len(traces) if stderrs is None else stderrs
    return [
        int(e)
        for e, x, s in zip(epochs, traces, stderrs, strict=True)
        if det.update(int(e), float(x), None if s is None else float(s))
    ]


def plateau_then_drop(noise_seed: int = 0, drop_at: int = 20, levels=(100.0, 30.0), duration: int = 1, n: int = 45):
    """A plateau at ``levels[0]`` with 3 % noise, then a linear fall to ``levels[1]``."""
    rng = np.random.default_rng(noise_seed)
    hi, lo = levels
    clean = np.full(n, hi)
    for k in range(1, duration + 1):
        clean[drop_at + k] = hi - (hi - lo) * k / duration
    clean[drop_at + duration + 1 :] = lo
    return clean * (1 + 0.03 * rng.standard_normal(n))


# ----------------------------------------------------------------------------- real drops


@pytest.mark.parametrize("duration", [1, 2, 3])
@pytest.mark.parametrize("size", [0.5, 0.7, 0.85])
@pytest.mark.parametrize("seed", range(8))
def test_real_drop_found_at_right_epoch(seed: int, size: float, duration: int) -> None:
    rng = np.random.default_rng(1000 * seed + int(100 * size) + duration)
    noise = rng.uniform(0.02, 0.05)
    traces, stderrs, start, middle = make_drop_series(rng, size=size, duration=duration, noise=noise)
    det = TraceSharpDropDetector()
    flags = feed(det, traces, stderrs)
    assert len(flags) == 1, flags
    assert det.flagged is True
    assert abs(det.drop_start_epoch - start) <= 1
    assert abs(det.drop_middle_epoch - middle) <= 1
    assert abs(det.drop_middle_epoch_interpolated - middle) <= 1
    # The fall seen when the flag is raised: all of it, or (flagged mid-fall) at least the size gate.
    assert det.min_relative_drop <= det.drop_size <= size + 0.12
    # Confirmed `confirm` evaluations after the first low one at the earliest, within the post window.
    assert start + 1 + det.confirm <= flags[0] <= start + duration + det.post_window - 1
    assert det.flagged_at_epoch == flags[0]
    assert det.post_drop_level < det.pre_drop_level


@pytest.mark.parametrize("duration", [1, 2, 3])
def test_plateau_100_to_30(duration: int) -> None:
    traces = plateau_then_drop(duration=duration)
    det = TraceSharpDropDetector()
    flags = feed(det, traces, [3.0] * len(traces))
    # a 23-standard-error drop: flagged as soon as `confirm` evaluations follow a low one
    assert flags == [min(20 + duration, 22) + det.confirm]
    assert det.drop_start_epoch in (19, 20, 21)
    assert abs(det.drop_middle_epoch - (20 + duration / 2)) <= 1
    assert 0.55 <= det.drop_size <= 0.76  # over 3 evaluations: flagged before the fall ends
    assert det.pre_drop_level == pytest.approx(100, rel=0.06)
    assert det.post_drop_level == pytest.approx(det.pre_drop_level * (1 - det.drop_size))


@pytest.mark.parametrize(
    ("step", "flag", "post", "middle", "interpolated"),
    [
        # 75 > 100 - 0.7 * 80 + 0 = 44 (noise-free): a post window may not start at 21; the one
        # starting at 22 is confirmed at 24; half-way 60 is crossed 15/55 of the way from 21 to 22.
        (75.0, 24, 20.0, 21, 21 + 15 / 55),
        # 40 <= 100 - 0.7 * 73.3: the window 21-23 qualifies (post level 26.7), flagged at 23;
        # half-way 63.3 is crossed 36.7/60 of the way from 20 to 21, rounded up.
        (40.0, 23, 80 / 3, 21, 20 + (100 - 190 / 3) / 60),
    ],
)
def test_exact_reporting_rule(step: float, flag: int, post: float, middle: int, interpolated: float) -> None:
    """Noise-free series: every reported quantity follows the documented formulas exactly."""
    traces = [100.0] * 21 + [step] + [20.0] * 12
    det = TraceSharpDropDetector()
    assert feed(det, traces) == [flag]  # first low evaluation + confirm=2 evaluations
    assert det.pre_drop_level == 100.0
    assert det.post_drop_level == pytest.approx(post)
    assert det.drop_size == pytest.approx(1 - post / 100)
    assert det.drop_z == math.inf  # no noise at all: any fall is infinitely many noise scales
    assert det.drop_start_epoch == 20  # last epoch within D/4 = 20 of the pre-drop level
    assert det.drop_middle_epoch == middle
    assert det.drop_middle_epoch_interpolated == pytest.approx(interpolated)


def test_drop_right_after_rise_without_plateau() -> None:
    """The paper's typical shape: the trace rises, then falls suddenly from (near) its peak."""
    rng = np.random.default_rng(3)
    traces, stderrs, start, middle = make_drop_series(rng, size=0.6, duration=2, noise=0.03, rise=20, plateau=0)
    det = TraceSharpDropDetector()
    assert len(feed(det, traces, stderrs)) == 1
    assert abs(det.drop_start_epoch - start) <= 1
    assert abs(det.drop_middle_epoch - middle) <= 1


def test_true_returned_once_and_attributes_kept() -> None:
    traces = np.concatenate([plateau_then_drop(), plateau_then_drop(noise_seed=1)])
    det = TraceSharpDropDetector()
    flags = feed(det, traces)
    assert len(flags) == 1  # the second drop (at index 65) is not reported again
    result = (det.drop_start_epoch, det.drop_middle_epoch, det.drop_size, det.flagged_at_epoch)
    assert result[0] in (19, 20, 21)
    assert det.update(len(traces), 1.0) is False
    assert (det.drop_start_epoch, det.drop_middle_epoch, det.drop_size, det.flagged_at_epoch) == result
    assert det.history.epochs[-1] == len(traces)  # still recorded after the flag


def test_attributes_none_before_flag() -> None:
    det = TraceSharpDropDetector()
    feed(det, plateau_then_drop()[:22])  # the fall happened but is not confirmed yet
    assert det.flagged is False
    for name in (
        "drop_start_epoch",
        "drop_middle_epoch",
        "drop_middle_epoch_interpolated",
        "drop_size",
        "flagged_at_epoch",
        "pre_drop_level",
        "post_drop_level",
    ):
        assert getattr(det, name) is None, name


# ----------------------------------------------------------------------------- negatives


@pytest.mark.parametrize("noise", [0.02, 0.05, 0.1, 0.15])
@pytest.mark.parametrize("seed", range(10))
def test_noisy_plateau_not_flagged(seed: int, noise: float) -> None:
    traces, stderrs = make_plateau(np.random.default_rng(seed), noise)
    det = TraceSharpDropDetector()
    assert feed(det, traces, stderrs) == []
    assert det.flagged is False and det.drop_start_epoch is None


@pytest.mark.parametrize("prefix", ["plateau", "rise", "none"])
@pytest.mark.parametrize("rate", [0.01, 0.02, 0.03, 0.05])
@pytest.mark.parametrize("seed", range(6))
def test_slow_geometric_decline_not_flagged(seed: int, rate: float, prefix: str) -> None:
    traces, stderrs = make_geometric(np.random.default_rng(seed), rate, prefix)
    assert (1 - rate) ** 50 < 0.8  # the series does lose a lot in total
    assert feed(TraceSharpDropDetector(), traces, stderrs) == []


@pytest.mark.parametrize("end", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("seed", range(6))
def test_linear_decline_not_flagged(seed: int, end: float) -> None:
    traces, stderrs = make_linear(np.random.default_rng(seed), end)
    assert feed(TraceSharpDropDetector(), traces, stderrs) == []


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_noise_free_declines_not_flagged(noise: float) -> None:
    """Exact arithmetic: a steady decline must not pass by a rounding error."""
    rng = np.random.default_rng(0)
    linear = np.linspace(100.0, 1.0, 60) * (1 + noise * rng.standard_normal(60))
    geometric = 100.0 * 0.95 ** np.arange(60) * (1 + noise * rng.standard_normal(60))
    assert feed(TraceSharpDropDetector(), linear) == []
    assert feed(TraceSharpDropDetector(), geometric) == []


@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("seed", range(5))
def test_short_dip_that_rebounds_not_flagged(seed: int, length: int) -> None:
    traces = 100 * (1 + 0.03 * np.random.default_rng(seed).standard_normal(50))
    dipped = traces.copy()
    dipped[25 : 25 + length] *= 0.3
    assert feed(TraceSharpDropDetector(), dipped) == []
    # Contrast: the same fall that stays down is a drop.
    kept = traces.copy()
    kept[25:] *= 0.3
    assert len(feed(TraceSharpDropDetector(), kept)) == 1


def test_drop_within_its_standard_errors_not_flagged() -> None:
    traces = plateau_then_drop(levels=(100.0, 60.0))  # a clean-looking 40 % drop
    huge = [30.0] * len(traces)  # Z <= 40 / (30 * sqrt(1/6 + 1/3)) = 1.9, below any threshold
    assert feed(TraceSharpDropDetector(), traces, huge) == []
    # Contrast: the same series with small errors is flagged; the legacy gate can still block it.
    assert len(feed(TraceSharpDropDetector(), traces, [2.0] * len(traces))) == 1
    assert feed(TraceSharpDropDetector(stderr_multiplier=20.0), traces, [2.0] * len(traces)) == []


def test_drop_smaller_than_noise_not_flagged() -> None:
    """A 40 % step hidden in 15 %-noise, no standard errors: the differences alone cannot tell it."""
    rng = np.random.default_rng(7)
    clean = np.concatenate([np.full(30, 100.0), np.full(30, 60.0)])
    traces = clean * (1 + 0.15 * rng.standard_normal(60))
    assert feed(TraceSharpDropDetector(), traces) == []
    # Contrast: with the true standard errors (15) the threshold is the exact-noise one, and it passes.
    assert len(feed(TraceSharpDropDetector(), traces, [15.0] * 60)) == 1


def test_small_relative_drop_not_flagged() -> None:
    traces = plateau_then_drop(levels=(100.0, 75.0))  # 25 % < min_relative_drop
    assert feed(TraceSharpDropDetector(), traces) == []
    assert len(feed(TraceSharpDropDetector(min_relative_drop=0.15), traces)) == 1


def test_non_positive_level_not_flagged() -> None:
    traces = plateau_then_drop(levels=(-30.0, -100.0))
    assert feed(TraceSharpDropDetector(), traces) == []


def test_drop_before_min_history_not_flagged() -> None:
    traces = [100.0, 101.0, 99.0, 30.0, 31.0, 29.0, 30.0, 30.5, 29.5]
    assert feed(TraceSharpDropDetector(), traces) == []
    assert feed(TraceSharpDropDetector(min_history=3, baseline=2), traces) == [5]


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_epochs_ignored_on_plateau(bad: float) -> None:
    traces, stderrs = make_plateau(np.random.default_rng(0), 0.05)
    traces[[20, 40, 41, 42, 70]] = bad
    det = TraceSharpDropDetector()
    assert feed(det, traces, stderrs) == []
    assert not math.isfinite(det.history.traces[40])
    assert len(det.history.epochs) == len(traces)


@pytest.mark.parametrize("positions", [[5], [21], [21, 22], [10, 23, 30]])
def test_non_finite_epochs_ignored_in_drop(positions: list[int]) -> None:
    """NaN anywhere (before, inside or after the fall) neither triggers nor hides the drop."""
    clean = plateau_then_drop(duration=2)
    traces = clean.copy()
    traces[positions] = math.nan
    reference = TraceSharpDropDetector()
    feed(reference, clean)
    det = TraceSharpDropDetector()
    flags = feed(det, traces)
    assert len(flags) == 1
    assert not math.isnan(traces[flags[0]])
    assert det.drop_start_epoch in (19, 20, 21)
    assert abs(det.drop_middle_epoch - 21) <= 1
    assert det.drop_size == pytest.approx(reference.drop_size, abs=0.05)


def test_non_finite_update_returns_false_and_is_recorded() -> None:
    det = TraceSharpDropDetector()
    assert det.update(0, math.nan, 1.0) is False
    assert det.update(1, 5.0, math.nan) is False  # NaN stderr: treated as unknown
    assert det.history.epochs == (0, 1)
    assert math.isnan(det.history.traces[0])
    assert det.history.traces[1] == 5.0
    with pytest.raises(ValueError, match="strictly increasing"):
        det.update(1, 5.0)  # the NaN epoch counts for the ordering too


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_stderr_treated_as_unknown(bad: float) -> None:
    traces = plateau_then_drop()
    det = TraceSharpDropDetector()
    flags = feed(det, traces, [bad] * len(traces))
    reference = TraceSharpDropDetector()
    assert flags == feed(reference, traces)  # as if no stderr had been given
    assert len(flags) == 1
    assert det.drop_size == reference.drop_size
    assert not math.isfinite(det.history.stderrs[0])  # recorded as given


# ----------------------------------------------------------------------------- irregular epochs


@pytest.mark.parametrize("every", [2, 5])
def test_every_n_epochs(every: int) -> None:
    traces = plateau_then_drop(duration=2)
    epochs = [every * i for i in range(len(traces))]
    det = TraceSharpDropDetector()
    flags = feed(det, traces, epochs=epochs)
    reference = TraceSharpDropDetector()
    ref_flags = feed(reference, traces)
    # Windows are in evaluations: the same decisions, on the coarser clock.
    assert flags == [every * f for f in ref_flags]
    assert det.drop_start_epoch == every * reference.drop_start_epoch
    assert det.drop_middle_epoch == every * reference.drop_middle_epoch
    assert det.drop_size == reference.drop_size
    assert det.drop_middle_epoch in epochs
    assert abs(det.drop_middle_epoch - every * 21) <= every  # within one evaluation


def test_irregular_gaps() -> None:
    traces = plateau_then_drop(duration=1)
    epochs = np.cumsum(np.random.default_rng(2).integers(1, 4, len(traces))).tolist()
    det = TraceSharpDropDetector()
    flags = feed(det, traces, epochs=epochs)
    assert len(flags) == 1 and flags[0] in epochs
    assert det.drop_start_epoch in epochs[19:22]
    assert det.drop_middle_epoch in epochs[20:22]
    assert det.history.epochs == tuple(epochs)


# ----------------------------------------------------------------------------- state


def _is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or type(value) in (int, float, bool, str)


def _results(det: TraceSharpDropDetector) -> tuple:
    return (
        det.flagged,
        det.flagged_at_epoch,
        det.drop_start_epoch,
        det.drop_middle_epoch,
        det.drop_middle_epoch_interpolated,
        det.drop_size,
        det.pre_drop_level,
        det.post_drop_level,
    )


@pytest.mark.parametrize("split", [0, 3, 15, 21, 22, 23, 24, 30, 44])
@pytest.mark.parametrize("via", ["deepcopy", "json"])
def test_state_dict_round_trip_mid_run(split: int, via: str) -> None:
    traces = plateau_then_drop(duration=2)
    traces[[10, 22]] = math.nan
    stderrs = [None if i % 7 == 0 else 2.0 for i in range(len(traces))]
    full = TraceSharpDropDetector()
    full_returns = [full.update(i, float(x), s) for i, (x, s) in enumerate(zip(traces, stderrs, strict=True))]
    assert sum(full_returns) == 1

    first = TraceSharpDropDetector()
    returns = [first.update(i, float(traces[i]), stderrs[i]) for i in range(split)]
    state = first.state_dict()
    assert _is_plain(state)
    state = copy.deepcopy(state) if via == "deepcopy" else json.loads(json.dumps(state))
    resumed = TraceSharpDropDetector()
    resumed.load_state_dict(state)
    assert _results(resumed) == _results(first)
    returns += [resumed.update(i, float(traces[i]), stderrs[i]) for i in range(split, len(traces))]
    assert returns == full_returns
    assert _results(resumed) == _results(full)
    np.testing.assert_array_equal(resumed.history.traces, full.history.traces)
    assert resumed.history.stderrs == full.history.stderrs
    assert resumed.history.epochs == full.history.epochs


def test_load_state_dict_rejects_malformed_state() -> None:
    det = TraceSharpDropDetector()
    feed(det, [1.0, 2.0, 3.0])
    state = det.state_dict()
    with pytest.raises(ValueError, match="lacks the keys"):
        TraceSharpDropDetector().load_state_dict({k: v for k, v in state.items() if k != "traces"})
    with pytest.raises(ValueError, match="equally long"):
        TraceSharpDropDetector().load_state_dict({**state, "stderrs": [None]})
    with pytest.raises(ValueError, match="strictly increasing"):
        TraceSharpDropDetector().load_state_dict({**state, "epochs": [0, 2, 1]})


def test_reset() -> None:
    traces = plateau_then_drop()
    det = TraceSharpDropDetector()
    first = feed(det, traces)
    assert det.flagged
    det.reset()
    assert det.flagged is False and det.drop_size is None and det.drop_start_epoch is None
    assert det.history == TraceHistory((), (), ())
    assert feed(det, traces) == first  # behaves like a fresh detector


def test_history() -> None:
    det = TraceSharpDropDetector()
    det.update(3, 1.5, 0.1)
    det.update(7, 2, None)
    history = det.history
    assert isinstance(history, TraceHistory)
    assert history.epochs == (3, 7)
    assert history.traces == (1.5, 2.0)
    assert history.stderrs == (0.1, None)
    epochs, _traces, _stderrs = history
    assert epochs == (3, 7)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("window", 0, "int >= 1"),
        ("window", 2.0, "int >= 1"),
        ("window", True, "int >= 1"),
        ("min_relative_drop", -0.1, r"\[0, 1\)"),
        ("min_relative_drop", 1.0, r"\[0, 1\)"),
        ("min_relative_drop", math.nan, r"\[0, 1\)"),
        ("min_relative_drop", "0.5", r"\[0, 1\)"),
        ("noise_multiplier", -1.0, r"\[0, inf\)"),
        ("noise_multiplier", math.inf, r"\[0, inf\)"),
        ("stderr_multiplier", -0.1, r"\[0, inf\)"),
        ("stderr_multiplier", "2", r"\[0, inf\)"),
        ("confirm", -1, "int >= 0"),
        ("confirm", 1.5, "int >= 0"),
        ("post_window", 2, "int >= 3"),
        ("baseline", 1, "int >= 2"),
        ("false_alarm_rate", 0.0, r"\(0, 0.5\]"),
        ("false_alarm_rate", 0.6, r"\(0, 0.5\]"),
        ("horizon", 5, "int >= 10"),
        ("max_rebound", 1.0, r"\[0, 1\)"),
        ("max_rebound", -0.1, r"\[0, 1\)"),
        ("lookback", 1, "int >= 2"),
        ("min_history", 2, r"int in \[3, 11\]"),
        ("min_history", 12, r"int in \[3, 11\]"),
    ],
)
def test_invalid_constructor_arguments(name: str, value, valid: str) -> None:
    with pytest.raises(ValueError, match=rf"`{name}` must be .*{valid}"):
        TraceSharpDropDetector(**{name: value})


def test_valid_edge_arguments_accepted() -> None:
    det = TraceSharpDropDetector(
        window=1,
        min_relative_drop=0.99,
        noise_multiplier=0,
        stderr_multiplier=0,
        confirm=0,
        max_rebound=0,
        lookback=2,
        min_history=3,
        false_alarm_rate=0.5,
        horizon=10,
        post_window=1,
        baseline=2,
    )
    assert (det.window, det.confirm, det.lookback, det.min_history, det.post_window) == (1, 0, 2, 3, 1)
    assert isinstance(det.noise_multiplier, float)


@pytest.mark.parametrize("second", [5, 4])
def test_non_increasing_epoch_rejected(second: int) -> None:
    det = TraceSharpDropDetector()
    det.update(5, 1.0)
    with pytest.raises(ValueError, match="`epoch` must be strictly increasing"):
        det.update(second, 1.0)
    assert det.history.epochs == (5,)  # the rejected evaluation was not recorded


def test_negative_stderr_rejected() -> None:
    det = TraceSharpDropDetector()
    with pytest.raises(ValueError, match="`stderr` must be >= 0"):
        det.update(0, 1.0, -0.5)
    assert det.history.epochs == ()


def test_non_integer_epoch_rejected() -> None:
    with pytest.raises(TypeError, match="`epoch` must be an int"):
        TraceSharpDropDetector().update(1.5, 1.0)
    assert TraceSharpDropDetector().update(np.int64(3), 1.0) is False  # numpy ints are fine


def test_interval_alone_gives_the_stderr_by_its_half_width_over_the_normal_quantile():
    series = [10.0] * 8 + [9.0, 6.0, 3.0] + [3.0] * 4
    by_stderr = TraceSharpDropDetector()
    by_interval = TraceSharpDropDetector()
    for epoch, x in enumerate(series):
        a = by_stderr.update(epoch, x, stderr=0.5)
        b = by_interval.update(epoch, x, interval=(x - 0.5 * 1.959964, x + 0.5 * 1.959964))
        assert a == b
    assert by_stderr.flagged and by_interval.flagged
    assert by_interval.history.stderrs[-1] == pytest.approx(0.5, rel=1e-6)
    assert by_interval.threshold == by_stderr.threshold  # both: a known (normal) standard error
    # an infinite interval is "unknown", a reversed one is an error
    unknown = TraceSharpDropDetector()
    unknown.update(0, 1.0, interval=(float("-inf"), float("inf")))
    assert unknown.history.stderrs[-1] is None
    with pytest.raises(ValueError, match="interval"):
        unknown.update(1, 1.0, interval=(2.0, 1.0))


def test_interval_with_stderr_gives_its_degrees_of_freedom_to_the_threshold():
    """A 3-probe Student-t interval (4.30 standard errors) means 2 degrees of freedom: a higher threshold."""
    series = [10.0] * 8 + [9.0, 6.0, 3.0] + [3.0] * 4
    exact, few = TraceSharpDropDetector(), TraceSharpDropDetector()
    for epoch, x in enumerate(series):
        exact.update(epoch, x, 0.5)
        few.update(epoch, x, 0.5, interval=(x - 0.5 * 4.302653, x + 0.5 * 4.302653))
    assert exact.flagged and few.flagged
    assert few.history.stderrs[-1] == 0.5  # the stderr itself is kept
    assert few.threshold > exact.threshold
    assert few.state_dict()["dofs"][-1] == 2
    # update_from_log is what the monitor calls: the same decisions
    logged = TraceSharpDropDetector()
    for epoch, x in enumerate(series):
        logged.update_from_log(epoch, x, 0.5, x - 0.5 * 4.302653, x + 0.5 * 4.302653)
    assert logged.state_dict() == few.state_dict()
