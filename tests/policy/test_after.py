"""``after(start, trigger)``: one place to say "no saves before step N" for every trigger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.errors import ConfigError
from ckptwise.policy import Decision, Request, Trigger, after, step_only, walk
from policy_support import any_of, reported, state

SIGTERM = Request("signal", "SIGTERM")
SAVE_NOW = Request("file", "SAVE_NOW")


@pytest.mark.parametrize(
    ("step", "final", "requests", "save"),
    [
        (1000, False, (), False),  # every(1000) fires, but before the warm-up ends
        (1999, False, (), False),
        (2000, False, (), True),  # start is inclusive
        (3000, False, (), True),
        (2500, False, (), False),  # from start on it is the trigger itself
        (1500, True, (), True),  # the final step always saves
        (1500, False, (SIGTERM,), True),  # so does a save a signal asks for
        (1500, False, (SAVE_NOW,), True),  # or a request file
        (1500, False, (Request("signal", "SIGUSR2"),), False),  # a signal nobody watches
    ],
)
def test_after_holds_back_everything_but_the_final_step_and_requests(
    step: int, final: bool, requests: tuple[Request, ...], save: bool
) -> None:
    trigger = after(2000, any_of(cw.every(1000), cw.on_final(), cw.on_signal(), cw.on_file()))
    decision = trigger.decide(state(step, final=final, requests=requests))
    assert decision.save is save
    if save and requests:
        assert decision.requests == frozenset(requests)  # so the manager consumes them


def test_after_passes_the_reasons_and_requests_of_the_inner_decision() -> None:
    trigger = after(10, any_of(cw.every(5), cw.on_signal()))
    assert trigger.decide(state(20, requests=[SIGTERM])) == Decision(
        True, ("every(5)", "on_signal(SIGTERM)"), frozenset({SIGTERM})
    )
    assert trigger.decide(state(5, requests=[SIGTERM])) == Decision(
        True, ("every(5)", "on_signal(SIGTERM)"), frozenset({SIGTERM})
    )


def test_final_before_start_saves_only_when_the_inner_trigger_fires() -> None:
    """``after`` adds no trigger of its own: without on_final a final step saves nothing."""
    assert not after(100, cw.every(7)).decide(state(50, final=True)).save
    assert after(100, cw.every(7)).decide(state(49, final=True)).save


def test_after_holds_back_improvements_where_every_start_does_not() -> None:
    """The issue's case: ``start`` of ``every`` does not hold back ``on_improvement``."""
    history = {"eval_loss": reported(3.0)}
    metrics = {"eval_loss": 1.0}
    per_trigger = any_of(cw.every(1000, start=2000), cw.on_improvement("eval_loss"))
    run_wide = after(2000, any_of(cw.every(1000), cw.on_improvement("eval_loss")))
    for step in (500, 1000, 1500):
        assert per_trigger.decide(state(step, metrics, history)).save
        assert not run_wide.decide(state(step, metrics, history)).save
    assert run_wide.decide(state(2500, metrics, history)).reasons == ("on_improvement(eval_loss)",)


def test_after_composes_with_the_operators() -> None:
    trigger = after(10, cw.every(5)) | cw.every(3)
    assert trigger.decide(state(6)).save  # every(3) is not held back
    assert not trigger.decide(state(5)).save
    assert (after(10, cw.every(5)) & cw.every(2)).decide(state(10)).save


def test_walk_and_step_only_see_through_after() -> None:
    trigger = after(10, any_of(cw.every(5), cw.on_signal()))
    expected: list[Trigger] = [cw.every(5), cw.on_signal()]
    assert list(walk(trigger)) == expected
    assert not step_only(trigger)  # a signal is not a function of the step
    assert step_only(after(10, cw.every(5) | cw.on_final()))


@pytest.mark.parametrize(
    ("start", "inner", "pattern"),
    [
        (-1, cw.every(5), r"after\(start\) must be an integer >= 0, got -1"),
        (True, cw.every(5), r"after\(start\) must be an integer >= 0, got True"),
        (10, 5, r"save= expects triggers such as cw.every\(1000\); got 5"),
    ],
)
def test_after_checks_its_arguments(start: object, inner: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        after(start, inner)  # type: ignore[arg-type]


def test_a_manager_with_after_saves_from_start_on_and_the_final_step(tmp_path: Path) -> None:
    save = after(20, cw.every(10) | cw.on_improvement("eval_loss") | cw.on_final())
    with cw.CheckpointManager(tmp_path, save=save, rng=False) as manager:
        for step in range(1, 36):
            manager.step(
                step,
                {"w": torch.full((4,), float(step))},
                metrics={"eval_loss": 10.0 - step * 0.1} if step % 5 == 0 else None,
                final=step == 35,
            )
        manager.wait()
        steps = [c.step for c in manager.run.checkpoints()]
    # improvements at 5, 10, 15 and every(10) at 10 are held back; from 20 on all count
    assert steps == [20, 25, 30, 35]
