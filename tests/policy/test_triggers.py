"""Table and property tests for the save triggers (pure: no clock, no files)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.errors import ConfigError
from ckptwise.policy import Decision, MetricStats, Request, TrainingState, Trigger
from policy_support import NOW, state, stats

Mode = Literal["min", "max"]


# --------------------------------------------------------------------------- every


@pytest.mark.parametrize(
    ("interval", "start", "step", "save"),
    [
        (10, 0, 0, False),  # never at step 0
        (1, 0, 0, False),
        (1, 0, 1, True),
        (10, 0, 5, False),
        (10, 0, 10, True),
        (10, 0, 11, False),
        (10, 0, 20, True),
        (10, 0, 1000, True),
        (10, 25, 10, False),  # none before start
        (10, 25, 20, False),
        (10, 25, 25, False),  # start itself is not a multiple
        (10, 25, 30, True),
        (10, 30, 30, True),  # start is inclusive
        (1000, 200, 1000, True),
        (1000, 2000, 1000, False),
        (1000, 2000, 2000, True),
        (1000, 2000, 2500, False),
        (1000, 2000, 3000, True),
        (7, 0, 49, True),
        (7, 0, 50, False),
    ],
)
def test_every(interval: int, start: int, step: int, save: bool) -> None:
    decision = cw.every(interval, start=start).decide(state(step))
    assert decision.save is save
    assert decision.reasons == ((f"every({interval})",) if save else ())


def test_every_ignores_metrics_and_final() -> None:
    trigger = cw.every(10)
    assert not trigger.decide(state(3, {"loss": 0.1}, final=True)).save
    assert trigger.decide(state(30, {"loss": 9.0})).save


# --------------------------------------------------------------------------- at_steps


@pytest.mark.parametrize(
    ("steps", "step", "save"),
    [
        ([0], 0, True),  # at_steps([0]) saves the untrained model
        ([0], 1, False),
        ([500, 1000], 500, True),
        ([500, 1000], 1000, True),
        ([500, 1000], 750, False),
        ([500, 1000], 1500, False),
        ((3, 3, 3), 3, True),  # duplicates are harmless
        (range(0, 100, 25), 75, True),
        (range(0, 100, 25), 100, False),
        ({7, 11}, 11, True),
    ],
)
def test_at_steps(steps: Sequence[int] | set[int], step: int, save: bool) -> None:
    decision = cw.at_steps(steps).decide(state(step))
    assert decision == (Decision.yes("at_steps") if save else Decision.no())


def test_at_steps_accepts_a_generator() -> None:
    trigger = cw.at_steps(s * 10 for s in range(1, 4))
    assert [trigger.decide(state(s)).save for s in (10, 15, 20, 30, 40)] == [
        True,
        False,
        True,
        True,
        False,
    ]


# --------------------------------------------------------------------------- on_improvement

IMPROVED = Decision.yes("on_improvement(loss)")
NOT_IMPROVED = Decision.no()


@pytest.mark.parametrize(
    ("mode", "min_delta", "metrics", "history", "expected"),
    [
        # the first value ever seen counts as an improvement
        ("min", 0.0, {"loss": 5.0}, None, IMPROVED),
        ("max", 0.0, {"loss": -5.0}, None, IMPROVED),
        ("min", 1.0, {"loss": 5.0}, None, IMPROVED),
        ("min", 0.0, {"loss": math.inf}, None, IMPROVED),
        # metric not reported at this step: no save, even with history
        ("min", 0.0, {}, None, NOT_IMPROVED),
        ("min", 0.0, {}, {"loss": stats((1, 9.0))}, NOT_IMPROVED),
        ("min", 0.0, {"acc": 0.1}, {"loss": stats((1, 9.0))}, NOT_IMPROVED),
        # NaN never improves, not even as the first value
        ("min", 0.0, {"loss": math.nan}, None, NOT_IMPROVED),
        ("max", 0.0, {"loss": math.nan}, None, NOT_IMPROVED),
        ("min", 0.0, {"loss": math.nan}, {"loss": stats((1, 9.0))}, NOT_IMPROVED),
        # min mode: strictly lower than the best so far
        ("min", 0.0, {"loss": 1.0}, {"loss": stats((1, 2.0))}, IMPROVED),
        ("min", 0.0, {"loss": 2.0}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        ("min", 0.0, {"loss": 3.0}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        # the best, not the last value, is the reference
        ("min", 0.0, {"loss": 1.5}, {"loss": stats((1, 1.0), (2, 3.0))}, NOT_IMPROVED),
        ("min", 0.0, {"loss": 0.5}, {"loss": stats((1, 1.0), (2, 3.0))}, IMPROVED),
        # max mode: strictly higher than the best so far
        ("max", 0.0, {"loss": 0.9}, {"loss": stats((1, 0.8))}, IMPROVED),
        ("max", 0.0, {"loss": 0.8}, {"loss": stats((1, 0.8))}, NOT_IMPROVED),
        ("max", 0.0, {"loss": 0.7}, {"loss": stats((1, 0.8))}, NOT_IMPROVED),
        ("max", 0.0, {"loss": 0.85}, {"loss": stats((1, 0.9), (2, 0.1))}, NOT_IMPROVED),
        # min_delta: must beat the best by more than min_delta
        ("min", 0.5, {"loss": 1.6}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        ("min", 0.5, {"loss": 1.5}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        ("min", 0.5, {"loss": 1.4}, {"loss": stats((1, 2.0))}, IMPROVED),
        ("max", 0.5, {"loss": 2.4}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        ("max", 0.5, {"loss": 2.5}, {"loss": stats((1, 2.0))}, NOT_IMPROVED),
        ("max", 0.5, {"loss": 2.6}, {"loss": stats((1, 2.0))}, IMPROVED),
        # NaN in the history is ignored: only finite values set the best
        ("min", 0.0, {"loss": 2.5}, {"loss": stats((1, 2.0), (2, math.nan))}, NOT_IMPROVED),
        ("min", 0.0, {"loss": 1.5}, {"loss": stats((1, 2.0), (2, math.nan))}, IMPROVED),
        # a history of NaN only: the first real value is an improvement
        ("min", 0.0, {"loss": 100.0}, {"loss": stats((1, math.nan))}, IMPROVED),
        ("max", 0.0, {"loss": -100.0}, {"loss": stats((1, math.nan), (2, math.nan))}, IMPROVED),
        # other metrics in the history do not matter
        ("min", 0.0, {"loss": 9.0}, {"acc": stats((1, 0.1))}, IMPROVED),
    ],
)
def test_on_improvement(
    mode: Mode,
    min_delta: float,
    metrics: Mapping[str, float],
    history: Mapping[str, MetricStats] | None,
    expected: Decision,
) -> None:
    trigger = cw.on_improvement("loss", mode=mode, min_delta=min_delta)
    assert trigger.decide(state(10, metrics, history)) == expected


def test_on_improvement_defaults_to_min() -> None:
    trigger = cw.on_improvement("loss")
    history = {"loss": stats((1, 2.0))}
    assert trigger.decide(state(2, {"loss": 1.0}, history)).save
    assert not trigger.decide(state(2, {"loss": 3.0}, history)).save


def test_on_improvement_over_a_run() -> None:
    """Feed a sequence through MetricStats the way the manager does, step by step."""
    trigger = cw.on_improvement("loss", mode="min", min_delta=0.05)
    values = [3.0, 2.0, 2.0, 1.97, math.nan, 1.9, 1.95, 1.0]
    expected = [True, True, False, False, False, True, False, True]
    history: dict[str, MetricStats] = {}
    got: list[bool] = []
    for step, value in enumerate(values, start=1):
        got.append(trigger.decide(state(step, {"loss": value}, history)).save)
        previous = history.get("loss")
        history["loss"] = (
            MetricStats.first(step, value) if previous is None else previous.updated(step, value)
        )
    assert got == expected


@pytest.mark.parametrize(
    ("mode", "best", "value"),
    [("min", -math.inf, 1.0), ("max", math.inf, 1.0)],
)
def test_on_improvement_infinite_best_is_not_beaten(mode: Mode, best: float, value: float) -> None:
    """An infinite best is a real value, not "nothing seen yet"."""
    history = {"loss": stats((1, 2.0), (2, best))}
    assert not cw.on_improvement("loss", mode=mode).decide(state(3, {"loss": value}, history)).save


# --------------------------------------------------------------------------- on_final / never


@pytest.mark.parametrize(
    ("step", "final", "save"),
    [(0, False, False), (0, True, True), (17, False, False), (17, True, True)],
)
def test_on_final(step: int, final: bool, save: bool) -> None:
    decision = cw.on_final().decide(state(step, final=final))
    assert decision == (Decision.yes("final") if save else Decision.no())


@pytest.mark.parametrize(
    "training_state",
    [
        state(0),
        state(1000),
        state(1000, {"loss": 0.0}),
        state(5, final=True),
        state(3, requests=[Request("signal", "SIGTERM"), Request("file", "SAVE_NOW")]),
    ],
)
def test_never(training_state: TrainingState) -> None:
    assert cw.never().decide(training_state) == Decision.no()


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize(
    ("training_state", "expected"),
    [
        (state(5), Decision.no()),
        (state(10), Decision(True, ("every(10)",))),
        (state(15), Decision(True, ("at_steps",))),
        (state(20, final=True), Decision(True, ("every(10)", "final"))),
        (state(15, final=True), Decision(True, ("at_steps", "final"))),
        (state(7, final=True), Decision(True, ("final",))),
        (
            state(30, {"loss": 1.0}, final=True),
            Decision(True, ("every(10)", "at_steps", "on_improvement(loss)", "final")),
        ),
    ],
)
def test_any_lists_every_reason(training_state: TrainingState, expected: Decision) -> None:
    trigger = cw.every(10) | cw.at_steps([15, 30]) | cw.on_improvement("loss") | cw.on_final()
    assert trigger.decide(training_state) == expected


@pytest.mark.parametrize(
    ("training_state", "expected"),
    [
        (state(10), Decision.no()),
        (state(10, {"loss": 1.0}), Decision(True, ("every(10)", "on_improvement(loss)"))),
        (state(11, {"loss": 1.0}), Decision.no()),
        (state(20, {"loss": 3.0}, {"loss": stats((10, 1.0))}), Decision.no()),
        (
            state(20, {"loss": 0.5}, {"loss": stats((10, 1.0))}),
            Decision(True, ("every(10)", "on_improvement(loss)")),
        ),
    ],
)
def test_all_requires_every_trigger(training_state: TrainingState, expected: Decision) -> None:
    trigger = cw.every(10) & cw.on_improvement("loss")
    assert trigger.decide(training_state) == expected


def test_or_flattens_nested_any() -> None:
    a, b, c, d = cw.every(10), cw.at_steps([3]), cw.on_final(), cw.never()
    left = (a | b) | c
    right = a | (b | c)
    both = (a | b) | (c | d)
    assert left.triggers == (a, b, c)
    assert right.triggers == (a, b, c)
    assert both.triggers == (a, b, c, d)
    assert left == right


def test_and_flattens_nested_all() -> None:
    a, b, c = cw.every(10), cw.at_steps([10]), cw.on_final()
    assert ((a & b) & c).triggers == (a, b, c)
    assert (a & (b & c)).triggers == (a, b, c)


def test_mixed_composition_keeps_structure() -> None:
    a, b, c = cw.every(10), cw.at_steps([10]), cw.on_final()
    any_of_all = (a & b) | c
    assert any_of_all.triggers == (a & b, c)
    all_of_any = (a | b) & c
    assert all_of_any.triggers == (a | b, c)
    # (every(10) & at_steps([10])) | on_final
    assert any_of_all.decide(state(10)) == Decision(True, ("every(10)", "at_steps"))
    assert any_of_all.decide(state(20)) == Decision.no()
    assert any_of_all.decide(state(20, final=True)) == Decision(True, ("final",))
    # (every(10) | at_steps([10])) & on_final
    assert all_of_any.decide(state(10)) == Decision.no()
    assert all_of_any.decide(state(20, final=True)) == Decision(True, ("every(10)", "final"))
    assert all_of_any.decide(state(10, final=True)) == Decision(
        True, ("every(10)", "at_steps", "final")
    )


def test_composites_are_triggers() -> None:
    assert isinstance(cw.every(10) | cw.never(), Trigger)
    assert isinstance(cw.every(10) & cw.never(), Trigger)
    assert isinstance(cw.on_improvement("loss"), Trigger)


def test_with_never_is_identity_for_or_and_absorbing_for_and() -> None:
    a = cw.every(10)
    for step in (0, 5, 10, 20):
        assert (a | cw.never()).decide(state(step)) == a.decide(state(step))
        assert not (a & cw.never()).decide(state(step)).save


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: cw.every(0), r"every\(interval\).*got 0"),
        (lambda: cw.every(-5), r"every\(interval\).*got -5"),
        (lambda: cw.every(1.5), r"every\(interval\).*got 1\.5"),  # type: ignore[arg-type]
        (lambda: cw.every(True), r"every\(interval\).*got True"),
        (lambda: cw.every("10"), r"every\(interval\).*got '10'"),  # type: ignore[arg-type]
        (lambda: cw.every(10, start=-1), r"every\(start=\).*got -1"),
        (lambda: cw.every(10, start=2.5), r"every\(start=\).*got 2\.5"),  # type: ignore[arg-type]
        (lambda: cw.at_steps([]), r"at_steps.*empty"),
        (lambda: cw.at_steps("12"), r"at_steps.*got '12'"),  # type: ignore[arg-type]
        (lambda: cw.at_steps(b"12"), r"at_steps.*got b'12'"),
        (lambda: cw.at_steps(12), r"at_steps.*got 12"),  # type: ignore[arg-type]
        (lambda: cw.at_steps([10, -1]), r"at_steps\(steps\).*got -1"),
        (lambda: cw.at_steps([10, 2.5]), r"at_steps\(steps\).*got 2\.5"),  # type: ignore[list-item]
        (lambda: cw.on_improvement("loss", mode="best"), r"mode.*got 'best'"),  # type: ignore[arg-type]
        (lambda: cw.on_improvement("", mode="min"), r"on_improvement.*metric.*got ''"),
        (lambda: cw.on_improvement(None), r"on_improvement.*metric.*got None"),  # type: ignore[arg-type]
        (lambda: cw.on_improvement("x", min_delta=-1), r"min_delta.*got -1"),
        (lambda: cw.on_improvement("x", min_delta=math.inf), r"min_delta.*got inf"),
        (lambda: cw.on_improvement("x", min_delta=math.nan), r"min_delta.*got nan"),
        (lambda: cw.every(10) | 5, r"save=.*got 5 \(int\)"),  # type: ignore[operator]
        (lambda: cw.every(10) & "x", r"save=.*got 'x' \(str\)"),  # type: ignore[operator]
        (lambda: (cw.every(10) | cw.never()) | None, r"save=.*got None"),  # type: ignore[operator]
    ],
)
def test_bad_arguments_raise_config_error(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        make()
    assert isinstance(info.value, ValueError)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"got 0"):
        cw.every(0)


# --------------------------------------------------------------------------- properties

metric_values = st.one_of(
    st.floats(min_value=-100.0, max_value=100.0),
    st.just(math.nan),
)


@st.composite
def training_states(draw: st.DrawFn) -> TrainingState:
    step = draw(st.integers(min_value=0, max_value=200))
    metrics = draw(st.dictionaries(st.sampled_from(["loss", "acc"]), metric_values, max_size=2))
    history: dict[str, MetricStats] = {}
    for name in draw(st.sets(st.sampled_from(["loss", "acc"]))):
        values = draw(st.lists(metric_values, min_size=1, max_size=5))
        history[name] = stats(*enumerate(values))
    return TrainingState(
        step=step, now=NOW, metrics=metrics, history=history, final=draw(st.booleans())
    )


@st.composite
def simple_triggers(draw: st.DrawFn) -> Trigger:
    kind = draw(st.sampled_from(["every", "at_steps", "improvement", "final", "never"]))
    if kind == "every":
        return cw.every(
            draw(st.integers(min_value=1, max_value=50)),
            start=draw(st.integers(min_value=0, max_value=100)),
        )
    if kind == "at_steps":
        return cw.at_steps(draw(st.sets(st.integers(0, 200), min_size=1, max_size=10)))
    if kind == "improvement":
        return cw.on_improvement(
            draw(st.sampled_from(["loss", "acc"])),
            mode=draw(st.sampled_from(["min", "max"])),
            min_delta=draw(st.floats(min_value=0.0, max_value=5.0)),
        )
    if kind == "final":
        return cw.on_final()
    return cw.never()


triggers = st.recursive(
    simple_triggers(),
    lambda children: (
        st.builds(lambda a, b: a | b, children, children)
        | st.builds(lambda a, b: a & b, children, children)
    ),
    max_leaves=6,
)


@given(trigger=triggers, training_state=training_states())
def test_decide_is_deterministic(trigger: Trigger, training_state: TrainingState) -> None:
    first = trigger.decide(training_state)
    assert trigger.decide(training_state) == first
    assert first.save is bool(first.reasons)


@given(a=triggers, b=triggers, training_state=training_states())
def test_or_and_match_boolean_logic(a: Trigger, b: Trigger, training_state: TrainingState) -> None:
    da, db = a.decide(training_state), b.decide(training_state)
    either = (a | b).decide(training_state)  # type: ignore[operator]
    both = (a & b).decide(training_state)  # type: ignore[operator]
    assert either.save is (da.save or db.save)
    assert both.save is (da.save and db.save)
    # reasons: every trigger that fired, in order
    assert either.reasons == da.reasons + db.reasons
    assert both.reasons == ((da.reasons + db.reasons) if both.save else ())


def test_composing_from_the_left_with_a_non_trigger_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="got 5"):
        5 | cw.every(10)  # type: ignore[operator]
    with pytest.raises(ConfigError, match="min_delta"):
        cw.on_improvement("x", min_delta="a")  # type: ignore[arg-type]
