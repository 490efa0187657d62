"""Table and property tests for the step schedules, ``on_improvement(patience=)`` and the
request triggers (``on_signal``, ``on_file``). Pure: no clock, no files, no signals."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.errors import ConfigError
from ckptwise.policy import Decision, MetricStats, Request, SaveMark, Trigger
from policy_support import NOW, reported, state


def fires(trigger: Trigger, steps: Iterable[int]) -> list[int]:
    """Every step of ``steps`` at which ``trigger`` saves (it only looks at the step)."""
    return [step for step in steps if trigger.decide(state(step)).save]


# --------------------------------------------------------------------------- schedule

GROWING_DENSITY = {0: 2000, 10_000: 1000, 50_000: 500}  # intervals shrink: saves get denser
SHRINKING_DENSITY = {0: 500, 10_000: 1000, 50_000: 2000}  # intervals grow: saves get sparser


@pytest.mark.parametrize(
    ("intervals", "step", "save", "interval"),
    [
        # {0: 2000, 10_000: 1000, 50_000: 500}
        (GROWING_DENSITY, 0, False, None),  # step 0 is never a save point
        (GROWING_DENSITY, 1000, False, None),
        (GROWING_DENSITY, 2000, True, 2000),
        (GROWING_DENSITY, 8000, True, 2000),
        (GROWING_DENSITY, 9000, False, None),
        (GROWING_DENSITY, 10_000, True, 1000),  # the threshold is a save point
        (GROWING_DENSITY, 10_500, False, None),
        (GROWING_DENSITY, 11_000, True, 1000),  # counted from the threshold
        (GROWING_DENSITY, 49_000, True, 1000),
        (GROWING_DENSITY, 49_500, False, None),
        (GROWING_DENSITY, 50_000, True, 500),
        (GROWING_DENSITY, 50_250, False, None),
        (GROWING_DENSITY, 50_500, True, 500),
        (GROWING_DENSITY, 1_000_000, True, 500),
        # {0: 500, 10_000: 1000, 50_000: 2000}
        (SHRINKING_DENSITY, 0, False, None),
        (SHRINKING_DENSITY, 500, True, 500),
        (SHRINKING_DENSITY, 9500, True, 500),
        (SHRINKING_DENSITY, 10_000, True, 1000),
        (SHRINKING_DENSITY, 10_500, False, None),  # 500 no longer applies
        (SHRINKING_DENSITY, 11_000, True, 1000),
        (SHRINKING_DENSITY, 50_000, True, 2000),
        (SHRINKING_DENSITY, 51_000, False, None),
        (SHRINKING_DENSITY, 52_000, True, 2000),
        # thresholds that are not multiples of the interval before them
        ({0: 3000, 10_000: 1000}, 9000, True, 3000),
        ({0: 3000, 10_000: 1000}, 10_000, True, 1000),
        ({0: 3000, 10_000: 1000}, 12_000, True, 1000),
        ({0: 3000, 10_000: 1000}, 12_500, False, None),
        ({0: 1000, 2500: 1000}, 2000, True, 1000),
        ({0: 1000, 2500: 1000}, 2500, True, 1000),
        ({0: 1000, 2500: 1000}, 3000, False, None),  # counted from 2500, not from 0
        ({0: 1000, 2500: 1000}, 3500, True, 1000),
        # no save before the first threshold when it is > 0
        ({100: 300}, 0, False, None),
        ({100: 300}, 99, False, None),
        ({100: 300}, 100, True, 300),
        ({100: 300}, 300, False, None),
        ({100: 300}, 400, True, 300),
        ({5000: 1000}, 1000, False, None),
        ({5000: 1000}, 4000, False, None),
        ({5000: 1000}, 5000, True, 1000),
        # the mapping's order does not matter
        ({50_000: 500, 0: 2000, 10_000: 1000}, 10_000, True, 1000),
        ({50_000: 500, 0: 2000, 10_000: 1000}, 50_500, True, 500),
        ({1: 1}, 1, True, 1),
        ({1: 1}, 2, True, 1),
    ],
)
def test_schedule(
    intervals: Mapping[int, int], step: int, save: bool, interval: int | None
) -> None:
    decision = cw.schedule(intervals).decide(state(step))
    assert decision == (Decision.yes(f"schedule({interval})") if save else Decision.no())


@pytest.mark.parametrize(
    ("intervals", "stop", "expected"),
    [
        (
            GROWING_DENSITY,
            52_000,
            [*range(2000, 10_000, 2000), *range(10_000, 50_000, 1000), *range(50_000, 52_001, 500)],
        ),
        (
            SHRINKING_DENSITY,
            56_000,
            [*range(500, 10_000, 500), *range(10_000, 50_000, 1000), *range(50_000, 56_001, 2000)],
        ),
        ({0: 3000, 10_000: 1000}, 13_000, [3000, 6000, 9000, 10_000, 11_000, 12_000, 13_000]),
        ({100: 300}, 1000, [100, 400, 700, 1000]),
        ({0: 7}, 30, [7, 14, 21, 28]),
        ({0: 10, 5: 10}, 30, [5, 15, 25]),  # the later threshold replaces the first at once
        ({0: 2, 3: 5, 4: 1}, 8, [2, 3, 4, 5, 6, 7, 8]),
    ],
)
def test_schedule_full_firing_list(
    intervals: Mapping[int, int], stop: int, expected: list[int]
) -> None:
    assert fires(cw.schedule(intervals), range(stop + 1)) == expected


@st.composite
def schedules(draw: st.DrawFn) -> dict[int, int]:
    thresholds = draw(st.sets(st.integers(min_value=0, max_value=300), min_size=1, max_size=5))
    return {t: draw(st.integers(min_value=1, max_value=60)) for t in thresholds}


@given(schedules())
def test_schedule_matches_a_segment_by_segment_construction(intervals: dict[int, int]) -> None:
    """Build the save points segment by segment (each threshold, then every interval until
    the next threshold) and compare with what the trigger decides at every step."""
    stop = 500
    thresholds = sorted(intervals)
    expected: set[int] = set()
    for i, start in enumerate(thresholds):
        end = thresholds[i + 1] if i + 1 < len(thresholds) else stop + 1
        expected.update(range(start, end, intervals[start]))
    expected.discard(0)
    assert fires(cw.schedule(intervals), range(stop + 1)) == sorted(expected)


# --------------------------------------------------------------------------- geometric


@pytest.mark.parametrize(
    ("first", "factor", "max_interval", "stop", "expected"),
    [
        (
            100,
            2.0,
            5000,
            20_000,
            [100, 200, 400, 800, 1600, 3200, 6400, 11_400, 16_400],
        ),
        (1, 3.0, 100, 400, [1, 3, 9, 27, 81, 181, 281, 381]),
        (5, 1.6, 20, 100, [5, 8, 13, 21, 34, 54, 74, 94]),
        (100, 2.0, 50, 300, [100, 150, 200, 250, 300]),  # gap capped from the start
        (1, 2.0, 1, 5, [1, 2, 3, 4, 5]),
        (10, 2, 1000, 100, [10, 20, 40, 80]),  # an int factor is fine
    ],
)
def test_geometric_full_firing_list(
    first: int, factor: float, max_interval: int, stop: int, expected: list[int]
) -> None:
    trigger = cw.geometric(first, factor, max_interval)
    assert fires(trigger, range(stop + 1)) == expected


def test_geometric_reason_and_defaults() -> None:
    trigger = cw.geometric()
    assert trigger.decide(state(100)) == Decision.yes("geometric(100)")
    assert trigger.decide(state(6400)) == Decision.yes("geometric(100)")
    assert trigger.decide(state(11_400)) == Decision.yes("geometric(100)")
    assert trigger.decide(state(0)) == Decision.no()
    assert trigger.decide(state(300)) == Decision.no()


def test_geometric_factor_close_to_one() -> None:
    """With factor 1.01 the product rounds back to the same step for a while; the ramp must
    still advance by at least one step and never stall or repeat."""
    trigger = cw.geometric(100, 1.01, 50)
    got = fires(trigger, range(20_001))
    assert got[0] == 100
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert all(1 <= gap <= 50 for gap in gaps)
    assert gaps == sorted(gaps)  # gaps never shrink
    assert gaps[:50] == [1] * 50  # 100, 101, ..., 150: 1% of the step rounds to one step
    assert gaps[-1] == 50
    tail = gaps.index(50)
    assert all(gap == 50 for gap in gaps[tail:])
    assert len(got) == len(set(got))


@given(
    first=st.integers(min_value=1, max_value=500),
    factor=st.floats(min_value=1.05, max_value=10.0),
    max_interval=st.integers(min_value=1, max_value=200),
)
def test_geometric_properties(first: int, factor: float, max_interval: int) -> None:
    # the gap reaches max_interval once step * (factor - 1) does (give or take rounding)
    stop = first + math.ceil(max_interval / (factor - 1)) + 3 * max_interval
    got = fires(cw.geometric(first, factor, max_interval), range(stop + 1))
    assert got[0] == first  # nothing before first, first itself saves
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert all(1 <= gap <= max_interval for gap in gaps)
    assert gaps[-1] == max_interval  # the ramp ended within the range
    tail = gaps.index(max_interval)
    assert all(gap == max_interval for gap in gaps[tail:])


# --------------------------------------------------------------------------- on_improvement(patience=)

REASON = "on_improvement(loss)"


def mark(count: int) -> dict[str, SaveMark]:
    """The trigger saved when ``loss`` had been reported ``count`` times (that save's report
    included, as the manager records it)."""
    return {REASON: SaveMark(step=count, time=NOW, counts={"loss": count})}


@pytest.mark.parametrize(
    ("patience", "reports_before", "mark_count", "save"),
    [
        # patience 3, saved at report 5: reports 6 and 7 are inside the window, 8 is not
        (3, 5, 5, False),  # report 6: one report since the save (the current one)
        (3, 6, 5, False),  # report 7: two
        (3, 7, 5, True),  # report 8: three, including the current one
        (3, 20, 5, True),
        # no mark yet: the first improvement saves whatever the patience
        (3, 5, None, True),
        (100, 5, None, True),
        # patience 2
        (2, 5, 5, False),
        (2, 6, 5, True),
        # patience 0 and 1 save every improvement, even the next report
        (0, 5, 5, True),
        (1, 5, 5, True),
        (0, 6, 5, True),
        (1, 6, 5, True),
    ],
)
def test_on_improvement_patience_table(
    patience: int, reports_before: int, mark_count: int | None, save: bool
) -> None:
    # a strictly decreasing history, and the current value beats all of it
    history = {"loss": reported(*(100.0 - i for i in range(reports_before)))}
    marks = None if mark_count is None else mark(mark_count)
    trigger = cw.on_improvement("loss", patience=patience)
    decision = trigger.decide(state(100, {"loss": -1.0}, history, marks=marks))
    assert decision == (Decision.yes(REASON) if save else Decision.no())


def test_on_improvement_patience_ignores_other_reasons_marks() -> None:
    history = {"loss": reported(3.0, 2.0)}
    marks = {"every(10)": SaveMark(step=2, time=NOW, counts={"loss": 2})}
    trigger = cw.on_improvement("loss", patience=3)
    assert trigger.decide(state(3, {"loss": 1.0}, history, marks=marks)).save


def test_on_improvement_patience_never_saves_without_improvement() -> None:
    history = {"loss": reported(1.0, 2.0, 3.0, 4.0, 5.0)}
    trigger = cw.on_improvement("loss", patience=3)
    assert not trigger.decide(state(10, {"loss": 1.5}, history, marks=mark(1))).save
    assert not trigger.decide(state(10, {"loss": 1.5}, history)).save


def run(trigger: Trigger, values: list[float]) -> list[int]:
    """Feed one report per step the way the manager does; return the reports (1-based) that
    saved. The marks record the report count after the save's own report."""
    history: dict[str, MetricStats] = {}
    marks: dict[str, SaveMark] = {}
    saved: list[int] = []
    for report, value in enumerate(values, start=1):
        decision = trigger.decide(state(report, {"loss": value}, history, marks=marks))
        previous = history.get("loss")
        history["loss"] = (
            MetricStats.first(report, value)
            if previous is None
            else previous.updated(report, value)
        )
        if decision.save:
            saved.append(report)
            counts = {k: v.count for k, v in history.items()}
            for reason in decision.reasons:
                marks[reason] = SaveMark(step=report, time=NOW, counts=counts)
    return saved


@pytest.mark.parametrize(
    ("patience", "values", "saved"),
    [
        # always improving
        (0, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0], [1, 2, 3, 4, 5, 6, 7]),
        (1, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0], [1, 2, 3, 4, 5, 6, 7]),
        (2, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0], [1, 3, 5, 7]),
        (3, [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [1, 4, 7, 10]),
        # an improvement inside the window is skipped; the next one after the window saves
        (3, [9.0, 8.0, 9.0, 9.0, 9.0, 7.0], [1, 6]),
        # the window has passed but nothing improved: wait for the next improvement
        (3, [5.0, 6.0, 6.0, 6.0, 6.0, 4.0, 3.0], [1, 6]),
        # NaN reports still count toward the window
        (3, [5.0, math.nan, math.nan, 4.0], [1, 4]),
    ],
)
def test_on_improvement_patience_over_a_run(
    patience: int, values: list[float], saved: list[int]
) -> None:
    assert run(cw.on_improvement("loss", patience=patience), values) == saved


# --------------------------------------------------------------------------- on_signal / on_file


def sig(name: str) -> Request:
    return Request("signal", name)


def file(name: str) -> Request:
    return Request("file", name)


def answers(reason: str, *requests: Request) -> Decision:
    """A decision to save for ``reason`` that answers ``requests``."""
    return Decision.yes(reason, requests=requests)


@pytest.mark.parametrize(
    ("signals", "requests", "expected"),
    [
        (("SIGTERM",), [], Decision.no()),
        (("SIGTERM",), [sig("SIGTERM")], answers("on_signal(SIGTERM)", sig("SIGTERM"))),
        (("SIGTERM",), [sig("SIGUSR1")], Decision.no()),
        (("SIGTERM",), [file("SIGTERM")], Decision.no()),  # the kind is part of the request
        (("SIGTERM",), [sig("sigterm")], Decision.no()),
        (
            ("SIGTERM", "SIGUSR1"),
            [sig("SIGUSR1")],
            answers("on_signal(SIGUSR1)", sig("SIGUSR1")),
        ),
        (("SIGTERM", "SIGUSR1"), [sig("SIGINT")], Decision.no()),
        # several at once: one reason, the first of the trigger's own list; it answers both
        (
            ("SIGTERM", "SIGUSR1"),
            [sig("SIGUSR1"), sig("SIGTERM")],
            answers("on_signal(SIGTERM)", sig("SIGTERM"), sig("SIGUSR1")),
        ),
        (
            ("SIGUSR1", "SIGTERM"),
            [sig("SIGUSR1"), sig("SIGTERM")],
            answers("on_signal(SIGUSR1)", sig("SIGTERM"), sig("SIGUSR1")),
        ),
        # a request of another trigger is not answered
        (
            ("SIGUSR2",),
            [sig("SIGUSR2"), file("SAVE_NOW")],
            answers("on_signal(SIGUSR2)", sig("SIGUSR2")),
        ),
    ],
)
def test_on_signal(signals: tuple[str, ...], requests: list[Request], expected: Decision) -> None:
    trigger = cw.on_signal(signals)
    assert trigger.decide(state(7, requests=requests)) == expected


def test_on_signal_defaults_and_single_name() -> None:
    default = cw.on_signal()
    assert default.signals == ("SIGTERM", "SIGUSR1")
    assert default.then == "exit"
    assert default.decide(state(1, requests=[sig("SIGUSR1")])) == answers(
        "on_signal(SIGUSR1)", sig("SIGUSR1")
    )
    single = cw.on_signal("SIGUSR2", then="continue")
    assert single.signals == ("SIGUSR2",)
    assert single.then == "continue"
    assert single.decide(state(1, requests=[sig("SIGUSR2")])).save


@pytest.mark.parametrize(
    ("name", "requests", "expected"),
    [
        ("SAVE_NOW", [], Decision.no()),
        ("SAVE_NOW", [file("SAVE_NOW")], answers("on_file(SAVE_NOW)", file("SAVE_NOW"))),
        ("SAVE_NOW", [file("save_now")], Decision.no()),
        ("SAVE_NOW", [sig("SAVE_NOW")], Decision.no()),
        ("SAVE_NOW", [file("OTHER")], Decision.no()),
        (
            "checkpoint-please",
            [file("checkpoint-please")],
            answers("on_file(checkpoint-please)", file("checkpoint-please")),
        ),
        ("checkpoint-please", [file("SAVE_NOW")], Decision.no()),
        (
            "SAVE_NOW",
            [sig("SIGTERM"), file("SAVE_NOW")],
            answers("on_file(SAVE_NOW)", file("SAVE_NOW")),
        ),
    ],
)
def test_on_file(name: str, requests: list[Request], expected: Decision) -> None:
    assert cw.on_file(name).decide(state(3, requests=requests)) == expected


def test_on_file_default_name() -> None:
    assert cw.on_file().decide(state(3, requests=[file("SAVE_NOW")])) == answers(
        "on_file(SAVE_NOW)", file("SAVE_NOW")
    )


def test_requests_compose_with_step_triggers() -> None:
    trigger = cw.every(10) | cw.on_signal(["SIGTERM"]) | cw.on_file()
    both = [sig("SIGTERM"), file("SAVE_NOW")]
    assert trigger.decide(state(7)) == Decision.no()
    assert trigger.decide(state(10)) == Decision.yes("every(10)")
    assert trigger.decide(state(10, requests=both)) == Decision(
        True,
        ("every(10)", "on_signal(SIGTERM)", "on_file(SAVE_NOW)"),
        frozenset(both),
    )


@pytest.mark.parametrize(
    ("step", "requests", "expected"),
    [
        (10, [], Decision.no()),  # every(10) alone does not answer anything
        (7, [sig("SIGTERM")], Decision.no()),  # nor does a signal off the grid
        (
            10,
            [sig("SIGTERM"), file("SAVE_NOW")],
            Decision(True, ("every(10)", "on_signal(SIGTERM)"), frozenset({sig("SIGTERM")})),
        ),
    ],
)
def test_all_of_answers_requests_only_when_it_saves(
    step: int, requests: list[Request], expected: Decision
) -> None:
    trigger = cw.every(10) & cw.on_signal(["SIGTERM"])
    assert trigger.decide(state(step, requests=requests)) == expected


def test_requests_of_a_trigger_that_did_not_fire_inside_all_of_are_not_answered() -> None:
    trigger = (cw.on_file() & cw.every(10)) | cw.on_signal(["SIGTERM"])
    decision = trigger.decide(state(7, requests=[sig("SIGTERM"), file("SAVE_NOW")]))
    assert decision == answers("on_signal(SIGTERM)", sig("SIGTERM"))


@pytest.mark.parametrize(
    ("text", "value"),
    [("signal:SIGTERM", sig("SIGTERM")), ("file:SAVE_NOW", file("SAVE_NOW"))],
)
def test_request_text(text: str, value: Request) -> None:
    assert str(value) == text


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: Request("socket", "x"), r"kind is 'signal' or 'file', got 'socket'"),  # type: ignore[arg-type]
        (lambda: Request("file", ""), r"names a signal .* or a file .*got ''"),
    ],
)
def test_bad_requests(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: cw.schedule({}), r"schedule.*got \{\}"),
        (lambda: cw.schedule([(0, 10)]), r"schedule.*got \[\(0, 10\)\]"),  # type: ignore[arg-type]
        (lambda: cw.schedule({0: 0}), r"schedule interval at step 0.*got 0"),
        (lambda: cw.schedule({0: 10, 500: -5}), r"schedule interval at step 500.*got -5"),
        (lambda: cw.schedule({0: 2.5}), r"schedule interval at step 0.*got 2\.5"),  # type: ignore[dict-item]
        (lambda: cw.schedule({-1: 5}), r"schedule threshold.*got -1"),
        (lambda: cw.schedule({True: 5}), r"schedule threshold.*got True"),
        (lambda: cw.geometric(factor=1.0), r"geometric\(factor\).*got 1\.0"),
        (lambda: cw.geometric(factor=0.5), r"geometric\(factor\).*got 0\.5"),
        (lambda: cw.geometric(factor=math.inf), r"geometric\(factor\).*got inf"),
        (lambda: cw.geometric(factor=math.nan), r"geometric\(factor\).*got nan"),
        (lambda: cw.geometric(factor=True), r"geometric\(factor\).*got True"),
        (lambda: cw.geometric(first=0), r"geometric\(first\).*got 0"),
        (lambda: cw.geometric(first=-3), r"geometric\(first\).*got -3"),
        (lambda: cw.geometric(max_interval=0), r"geometric\(max_interval\).*got 0"),
        (lambda: cw.on_signal(["SIGKILL"]), r"on_signal.*SIGKILL"),
        (lambda: cw.on_signal("SIGSTOP"), r"on_signal.*SIGSTOP"),
        (lambda: cw.on_signal(["NOTASIGNAL"]), r"on_signal.*'NOTASIGNAL'"),
        (lambda: cw.on_signal(["SIGTERM", "sigusr1"]), r"on_signal.*'sigusr1'"),
        (lambda: cw.on_signal([]), r"on_signal.*at least one signal"),
        (lambda: cw.on_signal(then="stop"), r"on_signal\(then=\).*got 'stop'"),  # type: ignore[arg-type]
        (lambda: cw.on_file("a/b"), r"on_file.*got 'a/b'"),
        (lambda: cw.on_file("a\\b"), r"on_file.*got 'a\\\\b'"),
        (lambda: cw.on_file(""), r"on_file.*got ''"),
        (lambda: cw.on_file(".hidden"), r"on_file.*got '\.hidden'"),
        (lambda: cw.on_improvement("x", patience=-1), r"on_improvement\(patience=\).*got -1"),
        (lambda: cw.on_improvement("x", patience=1.5), r"on_improvement\(patience=\).*got 1\.5"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_raise_config_error(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        make()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["NSIG", "SIG_IGN", "SIG_DFL", "SIG_BLOCK"])
def test_on_signal_rejects_int_constants_that_are_not_signals(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        cw.on_signal([name])


def test_on_signal_aliases_become_the_names_the_monitor_reports() -> None:
    assert cw.on_signal(["SIGIOT", "SIGABRT"]).signals == ("SIGABRT",)


def test_save_mark_time_is_not_consulted_by_patience() -> None:
    """Patience counts reports, not time: an old mark with a recent count still blocks."""
    history = {"loss": reported(3.0, 2.0)}
    marks = {REASON: SaveMark(step=1, time=NOW - timedelta(days=365), counts={"loss": 2})}
    trigger = cw.on_improvement("loss", patience=2)
    assert not trigger.decide(state(3, {"loss": 1.0}, history, marks=marks)).save
