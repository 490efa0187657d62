"""The manager's memory of a run: what each step's ``TrainingState`` holds, and how it
survives a checkpoint so a resumed run decides as an uninterrupted one would."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import ckptwise as cw
from ckptwise.decide.progress import COST_WINDOW, Progress
from ckptwise.policy import MetricStats, Request, SaveMark, TrainingState

START = datetime(2026, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


def state_at(progress: Progress, step: int, **metrics: float) -> TrainingState:
    return progress.state(
        step, START + step * MIN, metrics=metrics, requests=frozenset(), final=False
    )


def test_a_fresh_run_knows_only_its_start() -> None:
    requests = frozenset({Request("signal", "SIGTERM")})
    state = Progress(START).state(
        3, START + MIN, metrics={"loss": 1.0}, requests=requests, final=True
    )
    assert state == TrainingState(
        step=3,
        now=START + MIN,
        metrics={"loss": 1.0},
        run_start=START,
        requests=requests,
        final=True,
    )
    assert state.since_last_save() == MIN


def test_history_is_what_came_before_the_step() -> None:
    progress = Progress(START)
    assert state_at(progress, 1, loss=3.0).history == {}
    progress.observe(1, {"loss": 3.0})
    progress.observe(2, {"loss": 1.0, "acc": 0.5})
    progress.observe(3, {"loss": math.nan})
    state = state_at(progress, 4, loss=2.0)
    assert state.metrics == {"loss": 2.0}
    loss = state.history["loss"]
    assert (loss.count, loss.min, loss.min_step, loss.max, loss.max_step) == (3, 1.0, 2, 3.0, 1)
    assert loss.last_step == 3
    assert math.isnan(loss.last)
    assert state.history["acc"] == MetricStats.first(2, 0.5)


def test_the_state_is_a_snapshot() -> None:
    progress = Progress(START)
    progress.observe(1, {"loss": 3.0})
    before = state_at(progress, 2)
    progress.observe(2, {"loss": 1.0})
    progress.started_save(2, START, ["every(2)"])
    progress.finished_save(MIN)
    assert before.history["loss"].count == 1
    assert before.marks == {}
    assert before.save_costs == ()
    assert before.last_save_step is None


def test_a_save_sets_the_reference_time_marks_and_costs() -> None:
    progress = Progress(START)
    progress.observe(1, {"loss": 3.0})
    progress.observe(2, {"loss": 2.0})
    saved_at = START + 2 * MIN
    progress.started_save(2, saved_at, ["every(2)", "on_improvement(loss)"])
    progress.finished_save(timedelta(seconds=30))
    state = state_at(progress, 5)
    assert (state.last_save_step, state.last_save_time) == (2, saved_at)
    assert state.since_last_save() == 3 * MIN
    assert state.save_costs == (timedelta(seconds=30),)
    mark = SaveMark(step=2, time=saved_at, counts={"loss": 2})
    assert state.marks == {"every(2)": mark, "on_improvement(loss)": mark}


def test_only_the_recent_save_costs_are_kept() -> None:
    progress = Progress(START)
    for seconds in range(1, COST_WINDOW + 4):
        progress.finished_save(timedelta(seconds=seconds))
    costs = state_at(progress, 1).save_costs
    assert len(costs) == COST_WINDOW
    assert costs[-1] == timedelta(seconds=COST_WINDOW + 3)
    assert costs[0] == timedelta(seconds=4)


def run(progress: Progress, trigger: cw.Trigger, losses: dict[int, float]) -> list[int]:
    """Steps ``losses`` reports at, as the manager drives them; returns the steps saved."""
    saved = []
    for step, loss in losses.items():
        decision = trigger.decide(state_at(progress, step, loss=loss))
        progress.observe(step, {"loss": loss})
        if decision.save:
            saved.append(step)
            progress.started_save(step, START + step * MIN, decision.reasons)
            progress.finished_save(timedelta(seconds=10 * step))
    return saved


def test_a_restored_run_decides_as_the_uninterrupted_one() -> None:
    """Through JSON, as a checkpoint's manifest holds it, with a trigger that reads the
    history and its own marks."""
    trigger = cw.on_improvement("loss", patience=3)
    original = Progress(START)
    assert run(original, trigger, {1: 5.0, 2: 4.0, 3: math.nan, 4: 3.0}) == [1, 4]
    saved = json.loads(json.dumps(original.to_json()))
    restored_at = START + timedelta(days=1)
    restored = Progress(restored_at)
    restored.restore_json(saved, step=4, now=restored_at)

    before, after = state_at(original, 5), state_at(restored, 5)
    assert after.history.keys() == before.history.keys() == {"loss"}
    assert after.history["loss"].to_json() == before.history["loss"].to_json()
    assert after.marks == before.marks
    assert after.save_costs == before.save_costs == (timedelta(seconds=10), timedelta(seconds=40))
    # downtime between jobs is not training time: the restore is the last save's time
    assert (after.last_save_step, after.last_save_time) == (4, restored_at)
    rest = {5: 2.0, 6: 1.5, 7: 1.0, 8: 0.5}
    assert run(restored, trigger, rest) == run(original, trigger, rest) == [7]
