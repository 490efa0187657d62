"""simulate(): the real policies replayed on a simulated clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

import ckptwise as cw
from ckptwise.policy import daly_interval
from ckptwise.simulate import simulate

GB = 10**9


def test_trainer_like_schedule_saves_keeps_and_counts_bytes() -> None:
    """MiniCPM-V's `--save_steps 1000 --save_total_limit 10` over 10 000 steps, 22 GB each."""
    result = simulate(
        cw.every(1000),
        cw.keep_last(10),
        steps=10_000,
        checkpoint_bytes=22 * GB,
        save_cost=timedelta(minutes=2),
    )
    assert [s for s, _ in result.saves] == list(range(1000, 10_001, 1000))
    assert sorted(result.kept) == list(range(1000, 10_001, 1000))
    assert result.bytes_written == 220 * GB
    assert result.peak_bytes == 220 * GB
    assert result.deletions == []
    assert result.save_seconds == 10 * 120


def test_retention_bounds_what_is_on_disk() -> None:
    result = simulate(cw.every(1000), cw.keep_last(2), steps=10_000, checkpoint_bytes=22 * GB)
    assert sorted(result.kept) == [9000, 10_000]
    assert result.bytes_written == 220 * GB
    assert result.peak_bytes == 3 * 22 * GB  # a new one commits before an old one goes
    assert result.timeline[-1] == (10_000, 44 * GB)
    assert [gone for _, gone in result.deletions] == list(range(1000, 9000, 1000))


def test_improvement_saves_follow_the_metric_trace() -> None:
    trace = {
        100: {"eval_loss": 1.0},
        200: {"eval_loss": 0.8},
        300: {"eval_loss": 0.9},
        400: {"eval_loss": 0.7},
    }
    result = simulate(
        cw.on_improvement("eval_loss"), cw.keep_best(1, "eval_loss"), steps=400, metrics=trace
    )
    assert [s for s, _ in result.saves] == [100, 200, 400]
    assert list(result.kept) == [400]


@pytest.mark.parametrize("fraction", [0.05, 0.02])
def test_overhead_budget_holds_when_saves_get_twice_as_slow(fraction: float) -> None:
    steps = 40_000

    def cost(step: int) -> timedelta:
        return timedelta(seconds=10 if step <= steps // 2 else 20)

    result = simulate(
        cw.overhead_budget(fraction, first_after=timedelta(seconds=100)),
        steps=steps,
        step_time=timedelta(seconds=1),
        save_cost=cost,
    )
    half = steps // 2 + sum(10 for s, _ in result.saves if s <= steps // 2)
    first = result.overhead_between(0, half)
    second = result.overhead_between(half, result.wall_seconds)
    assert fraction * 0.8 <= first <= fraction * 1.2, first
    assert fraction * 0.8 <= second <= fraction * 1.2, second
    gaps = [b - a for (a, _), (b, _) in zip(result.saves, result.saves[1:], strict=False)]
    assert min(gaps[-5:]) > 1.8 * max(gaps[2:7])  # the interval doubled with the cost


def test_optimal_interval_in_a_simulated_run() -> None:
    mtbf, cost = timedelta(hours=24), timedelta(minutes=5)
    result = simulate(
        cw.optimal_interval(mtbf, first_after=timedelta(minutes=5)),
        steps=24 * 3600,
        step_time=timedelta(seconds=1),
        save_cost=cost,
    )
    gaps = [b - a for (a, _), (b, _) in zip(result.saves, result.saves[1:], strict=False)]
    expected = daly_interval(cost, mtbf).total_seconds()  # compute seconds between saves
    assert abs(expected / 60 - 116.7) < 0.5
    assert all(abs(g - expected) <= 1 for g in gaps)


def test_expected_loss_is_about_half_an_interval() -> None:
    result = simulate(
        cw.every(100), steps=100_000, step_time=timedelta(seconds=1), save_cost=timedelta(0)
    )
    assert result.expected_loss_seconds == pytest.approx(50, rel=0.01)
    assert result.expected_loss_steps == pytest.approx(50, rel=0.01)
    never = simulate(cw.never(), steps=1000, step_time=timedelta(seconds=1))
    assert never.expected_loss_seconds == pytest.approx(500)


def test_lost_steps_count_training_steps_not_save_time() -> None:
    """Saves of 30 s after steps 5, 10 and 12 of 1 s each: the steps done since the newest
    committed checkpoint, averaged over the 102 s, come to 387 step-seconds (worked by hand:
    12.5 + 150 while step 5 trains and saves, 12.5 + 150 for step 10, 2 + 60 for step 12)."""
    result = simulate(
        cw.every(5) | cw.on_final(),
        steps=12,
        step_time=timedelta(seconds=1),
        save_cost=timedelta(seconds=30),
    )
    assert result.wall_seconds == 102
    assert result.expected_loss_steps == pytest.approx(387 / 102)
    assert result.to_json()["expected_loss_per_failure_steps"] == pytest.approx(387 / 102)


@pytest.mark.parametrize(
    ("save", "step_time", "save_cost"),
    [
        (cw.every(5) | cw.on_final(), 1, 30),
        (cw.every(5), 1, 3600),
        (cw.never(), 1, 30),
        (cw.every(1), 0, 30),  # all of the time is saving
        (cw.every(3), 0.01, 0),
    ],
)
def test_lost_steps_never_exceed_the_run(
    save: cw.Trigger, step_time: float, save_cost: float
) -> None:
    result = simulate(
        save,
        steps=12,
        step_time=timedelta(seconds=step_time),
        save_cost=timedelta(seconds=save_cost),
    )
    assert 0 <= result.expected_loss_steps <= 12


def test_bad_length_is_a_config_error() -> None:
    with pytest.raises(cw.ConfigError, match="steps must be a positive integer, got 0"):
        simulate(cw.every(10), steps=0)
