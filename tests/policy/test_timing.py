"""Table and property tests for the wall-clock triggers and :func:`daly_interval`.

Every state is built by hand from fixed UTC datetimes; nothing reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.errors import ConfigError
from ckptwise.policy import Decision, TrainingState, daly_interval

START = datetime(2025, 1, 2, 3, 0, 0, tzinfo=UTC)
SAVED = START + timedelta(hours=2)  # when the last save started, where there was one

S = timedelta(seconds=1)
MIN = timedelta(minutes=1)
US = timedelta(microseconds=1)


def state(
    now: datetime,
    *,
    last_save: datetime | None = None,
    run_start: datetime | None = START,
    costs: tuple[timedelta, ...] = (),
) -> TrainingState:
    return TrainingState(
        step=1000,
        now=now,
        last_save_step=None if last_save is None else 900,
        last_save_time=last_save,
        run_start=run_start,
        save_costs=costs,
    )


# --------------------------------------------------------------------------- every_duration


@pytest.mark.parametrize(
    ("now", "last_save", "run_start", "save"),
    [
        # before any save: counted from the run's start
        (START, None, START, False),
        (START + 29 * MIN, None, START, False),
        (START + 30 * MIN - US, None, START, False),
        (START + 30 * MIN, None, START, True),
        (START + 5 * 30 * MIN, None, START, True),
        # after a save: counted from when that save started, not from the run's start
        (SAVED, SAVED, START, False),
        (SAVED + 29 * MIN + 59 * S, SAVED, START, False),
        (SAVED + 30 * MIN, SAVED, START, True),
        (SAVED + 3 * timedelta(hours=1), SAVED, START, True),
        # a save but no run start (e.g. a restored run): the save is the reference
        (SAVED + 30 * MIN, SAVED, None, True),
        (SAVED + 10 * MIN, SAVED, None, False),
        # neither: there is nothing to count from, so it never fires
        (START, None, None, False),
        (START + timedelta(days=365), None, None, False),
        # a clock that went backwards does not fire
        (SAVED - timedelta(hours=1), SAVED, START, False),
    ],
)
def test_every_duration(
    now: datetime, last_save: datetime | None, run_start: datetime | None, save: bool
) -> None:
    trigger = cw.every_duration(timedelta(minutes=30))
    decision = trigger.decide(state(now, last_save=last_save, run_start=run_start))
    assert decision == (Decision.yes("every_duration(30m)") if save else Decision.no())


@pytest.mark.parametrize(
    ("interval", "label"),
    [
        (timedelta(minutes=30), "every_duration(30m)"),
        (timedelta(hours=2), "every_duration(2h)"),
        (timedelta(minutes=120), "every_duration(2h)"),
        (timedelta(days=1), "every_duration(1d)"),
        (timedelta(seconds=90), "every_duration(90s)"),
        (timedelta(seconds=1.5), "every_duration(1.5s)"),
    ],
)
def test_every_duration_reason(interval: timedelta, label: str) -> None:
    decision = cw.every_duration(interval).decide(state(START + interval))
    assert decision == Decision.yes(label)


def test_every_duration_does_not_look_at_costs() -> None:
    trigger = cw.every_duration(timedelta(minutes=30))
    costs = (timedelta(hours=10),)
    assert trigger.decide(state(SAVED + 30 * MIN, last_save=SAVED, costs=costs)).save


# --------------------------------------------------------------------------- overhead_budget


@pytest.mark.parametrize(
    ("now", "last_save", "run_start", "save"),
    [
        # no measured cost: fires once first_after (10 min by default) has passed
        (START + 9 * MIN, None, START, False),
        (START + 10 * MIN - US, None, START, False),
        (START + 10 * MIN, None, START, True),
        (START + timedelta(hours=5), None, START, True),
        # nothing to count from
        (START + timedelta(hours=5), None, None, False),
    ],
)
def test_overhead_budget_before_any_measured_save(
    now: datetime, last_save: datetime | None, run_start: datetime | None, save: bool
) -> None:
    decision = cw.overhead_budget(0.05).decide(state(now, last_save=last_save, run_start=run_start))
    assert decision == (Decision.yes("overhead_budget(0.05)") if save else Decision.no())


@pytest.mark.parametrize(
    ("first_after", "elapsed", "save"),
    [
        (timedelta(0), timedelta(0), True),
        (timedelta(minutes=1), 59 * S, False),
        (timedelta(minutes=1), 60 * S, True),
        (timedelta(hours=1), 59 * MIN, False),
        (timedelta(hours=1), 60 * MIN, True),
    ],
)
def test_overhead_budget_first_after(
    first_after: timedelta, elapsed: timedelta, save: bool
) -> None:
    trigger = cw.overhead_budget(0.02, first_after=first_after)
    assert trigger.decide(state(START + elapsed)).save is save


@pytest.mark.parametrize(
    ("costs", "fraction", "elapsed", "save"),
    [
        # cost 10 s at 5%: the next save starts 200 s after the last one started
        ((10 * S,), 0.05, 199 * S, False),
        ((10 * S,), 0.05, 200 * S - US, False),
        ((10 * S,), 0.05, 200 * S, True),
        ((10 * S,), 0.05, 1000 * S, True),
        # at 1%: 1000 s
        ((10 * S,), 0.01, 999 * S, False),
        ((10 * S,), 0.01, 1000 * S, True),
        # the median of the last three costs
        ((10 * S, 10 * S, 100 * S), 0.05, 199 * S, False),  # median 10 s -> 200 s
        ((10 * S, 10 * S, 100 * S), 0.05, 200 * S, True),
        ((10 * S, 100 * S, 100 * S), 0.05, 200 * S, False),  # median 100 s -> 2000 s
        ((10 * S, 100 * S, 100 * S), 0.05, 1999 * S, False),
        ((10 * S, 100 * S, 100 * S), 0.05, 2000 * S, True),
        ((100 * S, 10 * S, 10 * S), 0.05, 200 * S, True),  # order within the window is irrelevant
        # only the last three count: an old slow save is forgotten
        ((1000 * S, 10 * S, 10 * S, 10 * S), 0.05, 200 * S, True),
        ((1000 * S, 1000 * S, 10 * S, 10 * S), 0.05, 200 * S, True),
        ((10 * S, 10 * S, 1000 * S, 1000 * S), 0.05, 200 * S, False),
        # two costs: the median is their mean
        ((10 * S, 20 * S), 0.05, 299 * S, False),
        ((10 * S, 20 * S), 0.05, 300 * S, True),
        # a measured cost replaces first_after
        ((1 * S,), 0.5, 2 * S, True),
    ],
)
def test_overhead_budget_follows_measured_costs(
    costs: tuple[timedelta, ...], fraction: float, elapsed: timedelta, save: bool
) -> None:
    trigger = cw.overhead_budget(fraction)
    decision = trigger.decide(state(SAVED + elapsed, last_save=SAVED, costs=costs))
    assert decision == (Decision.yes(f"overhead_budget({fraction:g})") if save else Decision.no())


def test_overhead_budget_counts_from_the_last_save_not_the_run_start() -> None:
    trigger = cw.overhead_budget(0.05)
    costs = (10 * S,)
    # long since the run started, but only 100 s since the last save started
    assert not trigger.decide(state(SAVED + 100 * S, last_save=SAVED, costs=costs)).save


@pytest.mark.parametrize("fraction", [0.001, 0.02, 0.05, 0.1, 0.25, 0.5, 0.9])
def test_overhead_budget_interval_is_cost_over_fraction(fraction: float) -> None:
    trigger = cw.overhead_budget(fraction)
    cost = timedelta(seconds=12)
    assert trigger.interval(cost) == cost / fraction


# --------------------------------------------------------------------------- optimal_interval

DAY = timedelta(hours=24)


@pytest.mark.parametrize(
    ("cost", "mtbf"),
    [
        (timedelta(minutes=5), DAY),
        (timedelta(seconds=30), timedelta(hours=4)),
        (timedelta(seconds=2), timedelta(days=7)),
        (timedelta(minutes=10), timedelta(minutes=5)),  # C >= 2M: the interval is M
    ],
)
def test_optimal_interval_fires_at_daly_plus_cost(cost: timedelta, mtbf: timedelta) -> None:
    trigger = cw.optimal_interval(mtbf)
    due = daly_interval(cost, mtbf) + cost
    label = f"optimal_interval({_label(mtbf)})"
    costs = (cost,)
    assert trigger.decide(state(SAVED + due - US, last_save=SAVED, costs=costs)) == Decision.no()
    assert trigger.decide(state(SAVED + due, last_save=SAVED, costs=costs)) == Decision.yes(label)
    assert trigger.decide(state(SAVED + 2 * due, last_save=SAVED, costs=costs)).save


def _label(mtbf: timedelta) -> str:
    return {DAY: "1d", timedelta(hours=4): "4h", timedelta(days=7): "7d"}.get(mtbf, "5m")


def test_optimal_interval_known_value() -> None:
    """M = 24 h, C = 5 min: Daly gives ~116.7 min of compute, so saves start ~121.7 min
    apart."""
    trigger = cw.optimal_interval(DAY)
    costs = (timedelta(minutes=5),)
    assert not trigger.decide(state(SAVED + 121 * MIN, last_save=SAVED, costs=costs)).save
    assert trigger.decide(state(SAVED + 122 * MIN, last_save=SAVED, costs=costs)).save


def test_optimal_interval_uses_the_median_cost() -> None:
    trigger = cw.optimal_interval(DAY)
    costs = (timedelta(hours=1), timedelta(minutes=5), timedelta(minutes=5))
    due = daly_interval(timedelta(minutes=5), DAY) + timedelta(minutes=5)
    assert not trigger.decide(state(SAVED + due - US, last_save=SAVED, costs=costs)).save
    assert trigger.decide(state(SAVED + due, last_save=SAVED, costs=costs)).save


@pytest.mark.parametrize(
    ("first_after", "elapsed", "save"),
    [
        (timedelta(minutes=10), 10 * MIN - US, False),
        (timedelta(minutes=10), 10 * MIN, True),
        (timedelta(minutes=3), 3 * MIN, True),
        (timedelta(0), timedelta(0), True),
    ],
)
def test_optimal_interval_before_any_measured_save(
    first_after: timedelta, elapsed: timedelta, save: bool
) -> None:
    trigger = cw.optimal_interval(DAY, first_after=first_after)
    assert trigger.decide(state(START + elapsed)).save is save
    assert not trigger.decide(state(START + elapsed, run_start=None)).save


# --------------------------------------------------------------------------- daly_interval


def daly(c: float, m: float) -> float:
    """Daly (2006), eq. 37: the higher-order estimate of the optimum compute interval."""
    if c >= 2 * m:
        return m
    return math.sqrt(2 * c * m) * (1 + math.sqrt(c / (2 * m)) / 3 + c / (18 * m)) - c


def test_daly_interval_known_value() -> None:
    got = daly_interval(timedelta(minutes=5), timedelta(hours=24))
    assert abs(got.total_seconds() / 60 - 116.7) <= 0.5
    # Young's first-order value for the same inputs is sqrt(2CM) = 120 min
    assert got < timedelta(minutes=120)


@pytest.mark.parametrize(
    ("cost_s", "mtbf_s"),
    [
        (300.0, 86_400.0),
        (1.0, 3600.0),
        (60.0, 3600.0),
        (600.0, 7 * 86_400.0),
        (1000.0, 1000.0),  # C = M < 2M: still the formula
        (0.001, 1e9),
    ],
)
def test_daly_interval_matches_the_formula(cost_s: float, mtbf_s: float) -> None:
    got = daly_interval(timedelta(seconds=cost_s), timedelta(seconds=mtbf_s))
    assert got.total_seconds() == pytest.approx(daly(cost_s, mtbf_s), abs=1e-6)


@pytest.mark.parametrize(
    ("cost", "mtbf"),
    [
        (timedelta(hours=2), timedelta(hours=1)),  # C = 2M exactly
        (timedelta(hours=3), timedelta(hours=1)),
        (timedelta(days=10), timedelta(minutes=1)),
    ],
)
def test_daly_interval_is_mtbf_when_cost_is_at_least_twice_mtbf(
    cost: timedelta, mtbf: timedelta
) -> None:
    assert daly_interval(cost, mtbf) == mtbf


def test_daly_interval_zero_cost_is_zero() -> None:
    assert daly_interval(timedelta(0), DAY) == timedelta(0)


@given(
    cost_s=st.floats(min_value=0.01, max_value=3600.0),
    ratio=st.floats(min_value=100.0, max_value=1e6),
)
def test_daly_interval_between_young_bounds(cost_s: float, ratio: float) -> None:
    """For C much smaller than M, Daly's optimum lies between sqrt(2CM) - C and a little
    above Young's sqrt(2CM)."""
    cost = timedelta(seconds=cost_s)
    mtbf = timedelta(seconds=cost_s * ratio)
    c, m = cost.total_seconds(), mtbf.total_seconds()  # as rounded to microseconds
    young = math.sqrt(2 * c * m)
    got = daly_interval(cost, mtbf).total_seconds()
    assert young - c - 1e-6 <= got <= young * 1.1 + 1e-6


@given(
    small=st.floats(min_value=0.01, max_value=100.0),
    factor=st.floats(min_value=1.0, max_value=10.0),
    mtbf_h=st.floats(min_value=1.0, max_value=1000.0),
)
def test_daly_interval_grows_with_cost_while_cost_is_small(
    small: float, factor: float, mtbf_h: float
) -> None:
    mtbf = timedelta(hours=mtbf_h)
    low = daly_interval(timedelta(seconds=small), mtbf)
    high = daly_interval(timedelta(seconds=small * factor), mtbf)
    assert low <= high + US


# --------------------------------------------------------------------------- properties


@st.composite
def timing_states(draw: st.DrawFn) -> TrainingState:
    start = START + timedelta(seconds=draw(st.integers(0, 10**6)))
    saved = draw(st.one_of(st.none(), st.integers(0, 10**6)))
    last_save = None if saved is None else start + timedelta(seconds=saved)
    ref = last_save if last_save is not None else start
    now = ref + timedelta(seconds=draw(st.integers(0, 10**5)))
    costs = tuple(
        timedelta(seconds=c)
        for c in draw(st.lists(st.integers(min_value=0, max_value=3600), max_size=8))
    )
    return state(now, last_save=last_save, run_start=start, costs=costs)


@given(training_state=timing_states(), fraction=st.floats(min_value=0.001, max_value=0.99))
def test_overhead_budget_fires_exactly_when_elapsed_reaches_the_interval(
    training_state: TrainingState, fraction: float
) -> None:
    trigger = cw.overhead_budget(fraction)
    elapsed = training_state.since_last_save()
    assert elapsed is not None
    recent = [c.total_seconds() for c in training_state.save_costs[-3:]]
    if recent:
        recent.sort()
        mid = len(recent) // 2
        median = recent[mid] if len(recent) % 2 else (recent[mid - 1] + recent[mid]) / 2
        due = timedelta(seconds=median) / fraction
    else:
        due = timedelta(minutes=10)
    assert trigger.decide(training_state).save is (elapsed >= due)


@given(training_state=timing_states(), minutes=st.integers(min_value=1, max_value=600))
def test_every_duration_fires_exactly_when_elapsed_reaches_the_interval(
    training_state: TrainingState, minutes: int
) -> None:
    elapsed = training_state.since_last_save()
    assert elapsed is not None
    trigger = cw.every_duration(timedelta(minutes=minutes))
    assert trigger.decide(training_state).save is (elapsed >= timedelta(minutes=minutes))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: cw.overhead_budget(0), r"overhead_budget\(fraction\).*got 0"),
        (lambda: cw.overhead_budget(1.5), r"overhead_budget\(fraction\).*got 1\.5"),
        (lambda: cw.overhead_budget(1.0), r"overhead_budget\(fraction\).*got 1\.0"),
        (lambda: cw.overhead_budget(-0.1), r"overhead_budget\(fraction\).*got -0\.1"),
        (lambda: cw.overhead_budget(math.nan), r"overhead_budget\(fraction\).*got nan"),
        (lambda: cw.overhead_budget(True), r"overhead_budget\(fraction\).*got True"),
        (lambda: cw.overhead_budget("0.05"), r"overhead_budget\(fraction\).*got '0\.05'"),  # type: ignore[arg-type]
        (
            lambda: cw.overhead_budget(0.05, first_after=timedelta(seconds=-1)),
            r"overhead_budget\(first_after=\).*got",
        ),
        (
            lambda: cw.overhead_budget(0.05, first_after=600),  # type: ignore[arg-type]
            r"overhead_budget\(first_after=\).*got 600",
        ),
        (lambda: cw.every_duration(5), r"every_duration\(interval\).*timedelta.*got 5"),  # type: ignore[arg-type]
        (lambda: cw.every_duration(timedelta(0)), r"every_duration\(interval\).*got"),
        (lambda: cw.every_duration(-MIN), r"every_duration\(interval\).*got"),
        (lambda: cw.optimal_interval(timedelta(0)), r"optimal_interval\(mtbf=\).*got"),
        (lambda: cw.optimal_interval(-DAY), r"optimal_interval\(mtbf=\).*got"),
        (lambda: cw.optimal_interval(3600), r"optimal_interval\(mtbf=\).*got 3600"),  # type: ignore[arg-type]
        (
            lambda: cw.optimal_interval(DAY, first_after=-MIN),
            r"optimal_interval\(first_after=\).*got",
        ),
    ],
)
def test_bad_arguments_raise_config_error(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        make()
    assert isinstance(info.value, ValueError)


def test_timing_triggers_compose() -> None:
    trigger = cw.every(1000) | cw.every_duration(timedelta(minutes=30)) | cw.overhead_budget(0.05)
    decision = trigger.decide(state(START + 30 * MIN))
    assert decision == Decision(
        True, ("every(1000)", "every_duration(30m)", "overhead_budget(0.05)")
    )
