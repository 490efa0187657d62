"""Table and property tests for the retention policies and :func:`plan_retention`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptwise as cw
from ckptwise.errors import ConfigError
from ckptwise.policy import RetentionContext, RetentionPlan, RetentionPolicy, plan_retention
from ckptwise.records import CheckpointInfo
from policy_support import NOW, keep_any

Mode = Literal["min", "max"]


def ckpt(step: int, **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(
        step=step, time=NOW - timedelta(hours=1) + timedelta(seconds=step), metrics=metrics
    )


def ckpts(*steps: int) -> list[CheckpointInfo]:
    return [ckpt(s) for s in steps]


def select(
    policy: RetentionPolicy, checkpoints: Sequence[CheckpointInfo]
) -> dict[int, tuple[str, ...]]:
    return dict(policy.select(RetentionContext(checkpoints=checkpoints, now=NOW)))


# --------------------------------------------------------------------------- keep_last


@pytest.mark.parametrize(
    ("n", "steps", "kept"),
    [
        (1, [], []),
        (3, [], []),
        (1, [10], [10]),
        (3, [10], [10]),
        (1, [10, 20, 30], [30]),
        (2, [10, 20, 30], [20, 30]),
        (3, [10, 20, 30], [10, 20, 30]),
        (5, [10, 20, 30], [10, 20, 30]),
        (2, [30, 10, 20], [20, 30]),  # input order does not matter
        (2, [0, 1000, 5, 999], [999, 1000]),
    ],
)
def test_keep_last(n: int, steps: list[int], kept: list[int]) -> None:
    assert select(cw.keep_last(n), ckpts(*steps)) == dict.fromkeys(kept, (f"last {n}",))


# --------------------------------------------------------------------------- keep_best


@pytest.mark.parametrize(
    ("n", "mode", "checkpoints", "kept"),
    [
        (1, "min", [], []),
        (1, "min", [ckpt(10, loss=3.0), ckpt(20, loss=1.0), ckpt(30, loss=2.0)], [20]),
        (2, "min", [ckpt(10, loss=3.0), ckpt(20, loss=1.0), ckpt(30, loss=2.0)], [20, 30]),
        (5, "min", [ckpt(10, loss=3.0), ckpt(20, loss=1.0), ckpt(30, loss=2.0)], [10, 20, 30]),
        (1, "max", [ckpt(10, loss=3.0), ckpt(20, loss=1.0), ckpt(30, loss=2.0)], [10]),
        (2, "max", [ckpt(10, loss=3.0), ckpt(20, loss=1.0), ckpt(30, loss=2.0)], [10, 30]),
        # negative values and infinities are ordinary values
        (1, "min", [ckpt(10, loss=-1.0), ckpt(20, loss=-5.0)], [20]),
        (1, "max", [ckpt(10, loss=-1.0), ckpt(20, loss=-5.0)], [10]),
        (1, "min", [ckpt(10, loss=math.inf), ckpt(20, loss=1e300)], [20]),
        (1, "max", [ckpt(10, loss=math.inf), ckpt(20, loss=1e300)], [10]),
        # checkpoints without the metric are ignored
        (2, "min", [ckpt(10), ckpt(20, acc=0.1), ckpt(30, loss=9.0)], [30]),
        (1, "min", [ckpt(10), ckpt(20, acc=0.1)], []),
        # NaN is ignored, in both modes
        (1, "min", [ckpt(10, loss=math.nan), ckpt(20, loss=5.0)], [20]),
        (1, "max", [ckpt(10, loss=math.nan), ckpt(20, loss=5.0)], [20]),
        (3, "min", [ckpt(10, loss=math.nan), ckpt(20, loss=5.0)], [20]),
        (1, "min", [ckpt(10, loss=math.nan), ckpt(20, loss=math.nan)], []),
        # ties: the earlier step wins, whatever the input order
        (1, "min", [ckpt(10, loss=1.0), ckpt(20, loss=1.0)], [10]),
        (1, "min", [ckpt(20, loss=1.0), ckpt(10, loss=1.0)], [10]),
        (1, "max", [ckpt(30, loss=1.0), ckpt(20, loss=1.0), ckpt(10, loss=0.0)], [20]),
        (2, "min", [ckpt(40, loss=1.0), ckpt(30, loss=1.0), ckpt(20, loss=1.0)], [20, 30]),
        (1, "min", [ckpt(20, loss=0.0), ckpt(10, loss=-0.0)], [10]),
    ],
)
def test_keep_best(n: int, mode: Mode, checkpoints: list[CheckpointInfo], kept: list[int]) -> None:
    assert select(cw.keep_best(n, "loss", mode), checkpoints) == dict.fromkeys(
        kept, (f"best {n} loss",)
    )


def test_keep_best_defaults_to_min() -> None:
    checkpoints = [ckpt(10, loss=3.0), ckpt(20, loss=1.0)]
    assert select(cw.keep_best(1, "loss"), checkpoints) == {20: ("best 1 loss",)}


# --------------------------------------------------------------------------- keep_every


@pytest.mark.parametrize(
    ("interval", "steps", "kept"),
    [
        (10, [], []),
        (10, [0, 5, 9], []),  # window 0 is never kept
        (10, [0, 10, 20], [10, 20]),
        (10, [3, 6, 9, 12, 15, 18, 21, 24], [12, 21]),  # first at/after each multiple
        (10, [24, 21, 18, 15, 12, 9, 6, 3], [12, 21]),  # input order does not matter
        (10, [15, 11, 19], [11]),
        (10, [10, 35, 70], [10, 35, 70]),  # gaps: windows without a checkpoint keep nothing
        (10_000, [3000 * k for k in range(1, 12)], [12000, 21000, 30000]),
        (1, [0, 1, 2, 3], [1, 2, 3]),
        (5, [4, 5, 6, 9, 10], [5, 10]),
    ],
)
def test_keep_every(interval: int, steps: list[int], kept: list[int]) -> None:
    assert select(cw.keep_every(interval), ckpts(*steps)) == dict.fromkeys(
        kept, (f"every {interval}",)
    )


def test_keep_every_kept_checkpoint_stays_kept_as_saves_arrive() -> None:
    policy = cw.keep_every(10_000)
    steps: list[int] = []
    kept_after: list[set[int]] = []  # what is kept after each save, every 3000 steps
    for step in range(3000, 60_001, 3000):
        steps.append(step)
        kept_after.append(set(select(policy, ckpts(*steps))))
    assert kept_after[2] == set()  # 3000, 6000, 9000: no window of 10 000 reached yet
    assert kept_after[3] == {12_000}
    assert kept_after[-1] == {12_000, 21_000, 30_000, 42_000, 51_000, 60_000}
    for before, after in itertools.pairwise(kept_after):
        assert before <= after


# --------------------------------------------------------------------------- keep_all


@pytest.mark.parametrize("steps", [[], [0], [5, 1, 3], list(range(0, 100, 7))])
def test_keep_all(steps: list[int]) -> None:
    assert select(cw.keep_all(), ckpts(*steps)) == dict.fromkeys(steps, ("all",))


# --------------------------------------------------------------------------- keep_within


def aged(step: int, age: timedelta) -> CheckpointInfo:
    """A checkpoint saved ``age`` before ``NOW``."""
    return CheckpointInfo(step=step, time=NOW - age)


HOUR = timedelta(hours=1)
US = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("age", "checkpoints", "kept"),
    [
        (HOUR, [], []),
        (HOUR, [aged(10, timedelta(0))], [10]),  # saved right now
        (HOUR, [aged(10, HOUR - US)], [10]),
        (HOUR, [aged(10, HOUR)], []),  # exactly `age` old: not strictly newer
        (HOUR, [aged(10, HOUR + US)], []),
        (
            HOUR,
            [aged(10, 3 * HOUR), aged(20, 2 * HOUR), aged(30, HOUR), aged(40, HOUR / 2)],
            [40],
        ),
        (
            3 * HOUR,
            [aged(10, 3 * HOUR), aged(20, 2 * HOUR), aged(30, HOUR), aged(40, HOUR / 2)],
            [20, 30, 40],
        ),
        (
            timedelta(days=30),
            [aged(10, 3 * HOUR), aged(20, 2 * HOUR), aged(30, HOUR), aged(40, HOUR / 2)],
            [10, 20, 30, 40],
        ),
        # age is judged by time, not by step: a high step saved long ago is not kept
        (HOUR, [aged(10, timedelta(minutes=5)), aged(500, timedelta(days=2))], [10]),
        # a checkpoint stamped in the future (clock skew) is newer than anything
        (HOUR, [aged(10, -timedelta(minutes=5))], [10]),
        # input order does not matter
        (2 * HOUR, [aged(40, HOUR / 2), aged(10, 3 * HOUR), aged(30, HOUR)], [30, 40]),
    ],
)
def test_keep_within(age: timedelta, checkpoints: list[CheckpointInfo], kept: list[int]) -> None:
    assert select(cw.keep_within(age), checkpoints) == dict.fromkeys(kept, (f"within {age}",))


def test_keep_within_reason() -> None:
    policy = cw.keep_within(timedelta(hours=6))
    assert select(policy, [aged(1, HOUR)]) == {1: ("within 6:00:00",)}


# --------------------------------------------------------------------------- keep_budget

SIZES = {"a": 100, "b": 10, "c": 10, "d": 10, "e": 50, "big": 1000, "empty": 0}


def blob(step: int, *objects: str) -> CheckpointInfo:
    """A checkpoint referencing ``objects`` (sizes from ``SIZES``)."""
    return CheckpointInfo(
        step=step, time=NOW - timedelta(seconds=1000 - step), objects=frozenset(objects)
    )


# three checkpoints sharing a 100-byte backbone "a", each with a 10-byte head of its own
SHARED = [blob(10, "a", "d"), blob(20, "a", "c"), blob(30, "a", "b")]


@pytest.mark.parametrize(
    ("max_bytes", "checkpoints", "kept"),
    [
        (1000, [], []),
        # "a" is paid for once: 110, then +10, then +10
        (109, SHARED, []),  # the newest alone does not fit
        (110, SHARED, [30]),
        (119, SHARED, [30]),
        (120, SHARED, [20, 30]),  # an exact fit is kept
        (129, SHARED, [20, 30]),
        (130, SHARED, [10, 20, 30]),
        (10**9, SHARED, [10, 20, 30]),
        # newest first whatever the input order
        (120, [SHARED[2], SHARED[0], SHARED[1]], [20, 30]),
        (120, [SHARED[0], SHARED[2], SHARED[1]], [20, 30]),
        # the walk stops at the first checkpoint that overflows: 10 would fit, but is
        # older than 20, which does not
        (100, [blob(10, "b"), blob(20, "big"), blob(30, "e")], [30]),
        (1060, [blob(10, "b"), blob(20, "big"), blob(30, "e")], [10, 20, 30]),
        (1059, [blob(10, "b"), blob(20, "big"), blob(30, "e")], [20, 30]),
        # one object referenced by every checkpoint counts once
        (100, [blob(10, "a"), blob(20, "a"), blob(30, "a")], [10, 20, 30]),
        (99, [blob(10, "a"), blob(20, "a"), blob(30, "a")], []),
        # an object shared with an older checkpoint is already paid for when it is reached
        (110, [blob(10, "a"), blob(20, "b"), blob(30, "a")], [10, 20, 30]),
        (109, [blob(10, "a"), blob(20, "b"), blob(30, "a")], [30]),
        # several objects of one checkpoint add up
        (1119, [blob(10, "a", "b", "c", "big")], []),
        (1120, [blob(10, "a", "b", "c", "big")], [10]),
        # checkpoints without objects or with zero-byte objects cost nothing
        (1, [blob(10), blob(20, "empty"), blob(30)], [10, 20, 30]),
        (1, [blob(10, "b"), blob(20, "empty"), blob(30)], [20, 30]),
    ],
)
def test_keep_budget(max_bytes: int, checkpoints: list[CheckpointInfo], kept: list[int]) -> None:
    context = RetentionContext(checkpoints=checkpoints, now=NOW, object_bytes=SIZES)
    assert dict(cw.keep_budget(max_bytes).select(context)) == dict.fromkeys(
        kept, (f"budget {max_bytes}",)
    )


def test_keep_budget_counts_from_the_newest_step_not_the_newest_time() -> None:
    # step 30 was stamped earlier than step 10; the walk goes by step
    checkpoints = [
        CheckpointInfo(step=10, time=NOW, objects=frozenset({"e"})),
        CheckpointInfo(step=30, time=NOW - HOUR, objects=frozenset({"a"})),
    ]
    context = RetentionContext(checkpoints=checkpoints, now=NOW, object_bytes=SIZES)
    assert dict(cw.keep_budget(100).select(context)) == {30: ("budget 100",)}


@pytest.mark.parametrize(
    ("pinned", "resumed_from", "keep", "delete"),
    [
        # the newest (30) does not fit in 100 bytes on its own, but is always kept
        ((), None, {30: ("newest",)}, (10, 20)),
        ([10], None, {10: ("pinned",), 30: ("newest",)}, (20,)),
        ((), 20, {20: ("resumed from",), 30: ("newest",)}, (10,)),
    ],
)
def test_plan_keeps_protected_checkpoints_past_the_budget(
    pinned: Iterable[int],
    resumed_from: int | None,
    keep: dict[int, tuple[str, ...]],
    delete: tuple[int, ...],
) -> None:
    result = plan(
        cw.keep_budget(100),
        SHARED,
        pinned=pinned,
        resumed_from=resumed_from,
        object_bytes=SIZES,
    )
    assert result.keep == keep
    assert result.delete == delete


def test_plan_passes_object_bytes_to_the_policy() -> None:
    result = plan(cw.keep_budget(120) | cw.keep_last(1), SHARED, object_bytes=SIZES)
    assert result.keep == {20: ("budget 120",), 30: ("budget 120", "last 1", "newest")}
    assert result.delete == (10,)


@given(
    sizes=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 500)),
    object_sets=st.lists(st.sets(st.sampled_from("abcdefgh"), max_size=4), max_size=12),
    max_bytes=st.integers(min_value=1, max_value=3000),
)
def test_keep_budget_keeps_the_longest_newest_first_run_that_fits(
    sizes: dict[str, int], object_sets: list[set[str]], max_bytes: int
) -> None:
    checkpoints = [
        CheckpointInfo(step=10 * i, time=NOW, objects=frozenset(objs))
        for i, objs in enumerate(object_sets)
    ]
    context = RetentionContext(checkpoints=checkpoints[::-1], now=NOW, object_bytes=sizes)
    kept = sorted(cw.keep_budget(max_bytes).select(context))

    def physical(steps: Iterable[int]) -> int:
        objects: set[str] = set()
        for c in checkpoints:
            if c.step in steps:
                objects |= c.objects
        return sum(sizes.get(o, 0) for o in objects)

    newest_first = sorted((c.step for c in checkpoints), reverse=True)
    assert kept == sorted(newest_first[: len(kept)])  # a run from the newest, no gaps
    assert physical(kept) <= max_bytes
    if len(kept) < len(newest_first):  # one more would overflow
        assert physical([*kept, newest_first[len(kept)]]) > max_bytes


# --------------------------------------------------------------------------- union


def test_union_merges_reasons() -> None:
    policy = cw.keep_last(2) | cw.keep_best(1, "loss") | cw.keep_every(100)
    checkpoints = [
        ckpt(50, loss=0.5),
        ckpt(100, loss=2.0),
        ckpt(150, loss=0.1),
        ckpt(200, loss=3.0),
        ckpt(250, loss=0.2),
    ]
    assert select(policy, checkpoints) == {
        100: ("every 100",),
        150: ("best 1 loss",),
        200: ("last 2", "every 100"),
        250: ("last 2",),
    }


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (cw.keep_last(1) | cw.keep_last(1), {30: ("last 1",)}),  # duplicate reasons merge
        (cw.keep_last(1) | cw.keep_all(), {10: ("all",), 20: ("all",), 30: ("last 1", "all")}),
        (cw.keep_all() | cw.keep_last(1), {10: ("all",), 20: ("all",), 30: ("all", "last 1")}),
        (cw.keep_every(20) | cw.keep_last(2), {20: ("every 20", "last 2"), 30: ("last 2",)}),
    ],
)
def test_union_table(policy: RetentionPolicy, expected: Mapping[int, tuple[str, ...]]) -> None:
    assert select(policy, ckpts(10, 20, 30)) == expected


def test_union_flattens() -> None:
    a, b, c, d = cw.keep_last(1), cw.keep_all(), cw.keep_every(5), cw.keep_best(1, "x")
    assert ((a | b) | c).policies == (a, b, c)
    assert (a | (b | c)).policies == (a, b, c)
    assert ((a | b) | (c | d)).policies == (a, b, c, d)
    assert isinstance(a | b, RetentionPolicy)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: cw.keep_last(0), r"keep_last\(n\).*got 0"),
        (lambda: cw.keep_last(-1), r"keep_last\(n\).*got -1"),
        (lambda: cw.keep_last(2.0), r"keep_last\(n\).*got 2\.0"),  # type: ignore[arg-type]
        (lambda: cw.keep_last(False), r"keep_last\(n\).*got False"),
        (lambda: cw.keep_best(0, "x"), r"keep_best\(n\).*got 0"),
        (lambda: cw.keep_best(1, ""), r"keep_best.*metric.*got ''"),
        (lambda: cw.keep_best(1, "x", mode="best"), r"mode.*got 'best'"),  # type: ignore[arg-type]
        (lambda: cw.keep_every(0), r"keep_every\(interval\).*got 0"),
        (lambda: cw.keep_every(-10), r"keep_every\(interval\).*got -10"),
        (lambda: cw.keep_within(timedelta(0)), r"keep_within\(age\).*got"),
        (lambda: cw.keep_within(-timedelta(hours=1)), r"keep_within\(age\).*got"),
        (lambda: cw.keep_within(3600), r"keep_within\(age\).*timedelta.*got 3600"),  # type: ignore[arg-type]
        (lambda: cw.keep_budget(0), r"keep_budget\(max_bytes\).*got 0"),
        (lambda: cw.keep_budget(-1), r"keep_budget\(max_bytes\).*got -1"),
        (lambda: cw.keep_budget(1.5e9), r"keep_budget\(max_bytes\).*got 1500000000\.0"),  # type: ignore[arg-type]
        (lambda: cw.keep_last(2) | "x", r"keep=.*got 'x'"),  # type: ignore[operator]
        (lambda: cw.keep_last(2) | 3, r"keep=.*got 3"),  # type: ignore[operator]
        (lambda: (cw.keep_last(2) | cw.keep_all()) | None, r"keep=.*got None"),  # type: ignore[operator]
        (lambda: cw.keep_last(2) | cw.every(10), r"keep=.*got Every"),  # type: ignore[operator]
    ],
)
def test_bad_arguments_raise_config_error(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        make()
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- plan_retention


def plan(
    policy: RetentionPolicy,
    checkpoints: Sequence[CheckpointInfo],
    *,
    pinned: Iterable[int] = (),
    resumed_from: int | None = None,
    object_bytes: Mapping[str, int] | None = None,
) -> RetentionPlan:
    return plan_retention(
        policy,
        checkpoints,
        now=NOW,
        pinned=pinned,
        resumed_from=resumed_from,
        object_bytes=object_bytes,
    )


def test_plan_empty() -> None:
    result = plan(cw.keep_last(1), [], pinned=[5], resumed_from=5)
    assert result == RetentionPlan(keep={}, delete=())


def test_plan_newest_always_kept() -> None:
    # keep_best keeps only step 10, but the newest checkpoint (30) survives too
    checkpoints = [ckpt(10, loss=0.1), ckpt(20, loss=0.5), ckpt(30, loss=0.9)]
    result = plan(cw.keep_best(1, "loss"), checkpoints)
    assert result.keep == {10: ("best 1 loss",), 30: ("newest",)}
    assert result.delete == (20,)


def test_plan_newest_reason_is_merged() -> None:
    result = plan(cw.keep_last(1), ckpts(10, 20, 30))
    assert result.keep == {30: ("last 1", "newest")}
    assert result.delete == (10, 20)


@pytest.mark.parametrize(
    ("pinned", "resumed_from", "keep", "delete"),
    [
        ((), None, {50: ("last 1", "newest")}, (10, 20, 30, 40)),
        ([20], None, {20: ("pinned",), 50: ("last 1", "newest")}, (10, 30, 40)),
        ([20, 40], None, {20: ("pinned",), 40: ("pinned",), 50: ("last 1", "newest")}, (10, 30)),
        # pins of steps that are not committed are ignored
        ([25, 999], None, {50: ("last 1", "newest")}, (10, 20, 30, 40)),
        ((), 30, {30: ("resumed from",), 50: ("last 1", "newest")}, (10, 20, 40)),
        ((), 35, {50: ("last 1", "newest")}, (10, 20, 30, 40)),
        ((), 50, {50: ("last 1", "newest", "resumed from")}, (10, 20, 30, 40)),
        (
            [10, 50],
            10,
            {10: ("pinned", "resumed from"), 50: ("last 1", "newest", "pinned")},
            (20, 30, 40),
        ),
        (iter([30]), None, {30: ("pinned",), 50: ("last 1", "newest")}, (10, 20, 40)),
    ],
)
def test_plan_pinned_and_resumed(
    pinned: Iterable[int],
    resumed_from: int | None,
    keep: dict[int, tuple[str, ...]],
    delete: tuple[int, ...],
) -> None:
    result = plan(
        cw.keep_last(1), ckpts(40, 10, 50, 30, 20), pinned=pinned, resumed_from=resumed_from
    )
    assert result.keep == keep
    assert list(result.keep) == sorted(keep)
    assert result.delete == delete


def test_plan_delete_sorted_and_disjoint() -> None:
    checkpoints = ckpts(70, 10, 60, 30, 0, 50, 20, 40)
    result = plan(cw.keep_every(30) | cw.keep_last(2), checkpoints, pinned=[10])
    assert list(result.keep) == [10, 30, 60, 70]
    assert result.delete == (0, 20, 40, 50)
    assert set(result.keep).isdisjoint(result.delete)
    assert set(result.keep) | set(result.delete) == {c.step for c in checkpoints}


def test_plan_keep_all_deletes_nothing() -> None:
    result = plan(cw.keep_all(), ckpts(3, 1, 2))
    assert result.delete == ()
    assert result.keep == {1: ("all",), 2: ("all",), 3: ("all", "newest")}


def test_plan_ignores_policy_steps_that_are_not_committed() -> None:
    @dataclass(frozen=True)
    class Phantom:
        def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
            return {999: ("phantom",), 10: ("phantom",)}

    result = plan(Phantom(), ckpts(10, 20))
    assert result.keep == {10: ("phantom",), 20: ("newest",)}
    assert result.delete == ()


# --------------------------------------------------------------------------- properties

METRICS = ("loss", "acc")
OBJECTS = tuple(f"o{i}" for i in range(8))

metric_values = st.one_of(
    st.floats(allow_nan=False),  # includes +-inf
    st.just(math.nan),
)


@st.composite
def checkpoint_lists(draw: st.DrawFn) -> list[CheckpointInfo]:
    steps = draw(st.lists(st.integers(min_value=0, max_value=500), unique=True, max_size=25))
    return [
        CheckpointInfo(
            step=step,
            time=NOW - timedelta(seconds=draw(st.integers(min_value=-60, max_value=900))),
            metrics=draw(st.dictionaries(st.sampled_from(METRICS), metric_values)),
            objects=frozenset(draw(st.sets(st.sampled_from(OBJECTS), max_size=4))),
        )
        for step in steps
    ]


@dataclass(frozen=True)
class BestSpec:
    n: int
    metric: str
    mode: Mode


@st.composite
def simple_policies(draw: st.DrawFn) -> tuple[RetentionPolicy, BestSpec | None]:
    kind = draw(st.sampled_from(["last", "best", "every", "all", "within", "budget"]))
    if kind == "last":
        return cw.keep_last(draw(st.integers(min_value=1, max_value=6))), None
    if kind == "best":
        spec = BestSpec(
            n=draw(st.integers(min_value=1, max_value=4)),
            metric=draw(st.sampled_from(METRICS)),
            mode=draw(st.sampled_from(["min", "max"])),
        )
        return cw.keep_best(spec.n, spec.metric, spec.mode), spec
    if kind == "every":
        return cw.keep_every(draw(st.integers(min_value=1, max_value=200))), None
    if kind == "within":
        return cw.keep_within(timedelta(seconds=draw(st.integers(1, 900)))), None
    if kind == "budget":
        return cw.keep_budget(draw(st.integers(min_value=1, max_value=4000))), None
    return cw.keep_all(), None


@st.composite
def policies(draw: st.DrawFn) -> tuple[RetentionPolicy, list[BestSpec]]:
    parts = draw(st.lists(simple_policies(), min_size=1, max_size=4))
    policy = keep_any(*(p for p, _ in parts))
    return policy, [spec for _, spec in parts if spec is not None]


Scenario = tuple[
    list[CheckpointInfo], RetentionPolicy, list[BestSpec], set[int], int | None, dict[str, int]
]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    checkpoints = draw(checkpoint_lists())
    policy, best_specs = draw(policies())
    steps = [c.step for c in checkpoints]
    committed_pins = draw(st.sets(st.sampled_from(steps))) if steps else set()
    stray_pins = draw(st.sets(st.integers(min_value=0, max_value=600), max_size=3))
    resume_choices: list[st.SearchStrategy[int | None]] = [
        st.none(),
        st.integers(min_value=0, max_value=600),
    ]
    if steps:
        resume_choices.append(st.sampled_from(steps))
    resumed_from = draw(st.one_of(resume_choices))
    # sizes of the objects; some may be missing
    object_bytes = draw(st.dictionaries(st.sampled_from(OBJECTS), st.integers(0, 1000)))
    return checkpoints, policy, best_specs, committed_pins | stray_pins, resumed_from, object_bytes


def best_step(checkpoints: Sequence[CheckpointInfo], spec: BestSpec) -> int | None:
    """The single best checkpoint by ``spec`` (ties to the earlier step), computed naively."""
    best: tuple[float, int] | None = None
    for c in checkpoints:
        value = c.metrics.get(spec.metric)
        if value is None or math.isnan(value):
            continue
        better = (
            best is None
            or (value < best[0] if spec.mode == "min" else value > best[0])
            or (value == best[0] and c.step < best[1])
        )
        if better:
            best = (value, c.step)
    return None if best is None else best[1]


@given(scenarios())
def test_plan_never_deletes_protected_checkpoints(
    scenario: Scenario,
) -> None:
    checkpoints, policy, best_specs, pinned, resumed_from, sizes = scenario
    result = plan(policy, checkpoints, pinned=pinned, resumed_from=resumed_from, object_bytes=sizes)
    deleted = set(result.delete)
    committed = {c.step for c in checkpoints}

    if committed:
        assert max(committed) not in deleted
        assert "newest" in result.keep[max(committed)]
    for step in pinned & committed:
        assert step not in deleted
        assert "pinned" in result.keep[step]
    if resumed_from is not None and resumed_from in committed:
        assert resumed_from not in deleted
        assert "resumed from" in result.keep[resumed_from]
    for spec in best_specs:
        best = best_step(checkpoints, spec)
        if best is not None:
            assert best not in deleted
            assert f"best {spec.n} {spec.metric}" in result.keep[best]


@given(scenarios())
def test_plan_partitions_committed_steps(
    scenario: Scenario,
) -> None:
    checkpoints, policy, _, pinned, resumed_from, sizes = scenario
    result = plan(policy, checkpoints, pinned=pinned, resumed_from=resumed_from, object_bytes=sizes)
    committed = {c.step for c in checkpoints}
    assert set(result.keep) | set(result.delete) == committed
    assert set(result.keep).isdisjoint(result.delete)
    assert list(result.delete) == sorted(set(result.delete))
    assert list(result.keep) == sorted(result.keep)
    assert all(result.keep[step] for step in result.keep)  # every kept step has a reason
    # whatever the policy selects is kept, with the policy's reasons first
    context = RetentionContext(checkpoints=checkpoints, now=NOW, object_bytes=sizes)
    for step, reasons in policy.select(context).items():
        assert result.keep[step][: len(reasons)] == tuple(reasons)


@given(scenarios(), st.data())
def test_plan_is_deterministic_and_order_independent(
    scenario: Scenario,
    data: st.DataObject,
) -> None:
    checkpoints, policy, _, pinned, resumed_from, sizes = scenario
    first = plan(policy, checkpoints, pinned=pinned, resumed_from=resumed_from, object_bytes=sizes)
    second = plan(policy, checkpoints, pinned=pinned, resumed_from=resumed_from, object_bytes=sizes)
    assert first == second
    assert list(first.keep.items()) == list(second.keep.items())

    shuffled = data.draw(st.permutations(checkpoints), label="shuffled checkpoints")
    reordered = plan(
        policy,
        shuffled,
        pinned=sorted(pinned, reverse=True),
        resumed_from=resumed_from,
        object_bytes=dict(reversed(sizes.items())),
    )
    assert reordered == first
    assert list(reordered.keep.items()) == list(first.keep.items())
