"""What a run records of its policies (``extra["policy"]``) and the ranking read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptwise as cw
from ckptwise.config import RankedBy, policy_from_config, policy_ranking, policy_record, ranking_of
from ckptwise.policy import Decision, KeepAny, TrainingState


@dataclass(frozen=True)
class EveryOther:
    """A trigger of the user's own: it has no config form."""

    def decide(self, state: TrainingState) -> Decision:
        return Decision.yes("every_other") if state.step % 2 == 0 else Decision.no()


@pytest.mark.parametrize(
    ("save", "keep", "expected"),
    [
        (cw.every(10), cw.keep_last(2), None),
        (cw.every(10), cw.keep_best(1, "eval_acc", mode="max"), ("eval_acc", "max", "keep_best")),
        (
            cw.every(10) | cw.on_improvement("eval_loss"),
            cw.keep_last(2) | cw.keep_best(1, "eval_acc", mode="max"),
            ("eval_acc", "max", "keep_best"),  # keep_best wins: it is what "best" keeps
        ),
        (
            cw.after(100, cw.every(10) & cw.on_improvement("eval_loss")),
            cw.keep_last(2),
            ("eval_loss", "min", "on_improvement"),
        ),
        (
            # a KeepAny built around another, as the constructor allows: to_config flattens
            # it, so the ranking must find the keep_best inside too
            cw.every(10),
            KeepAny((KeepAny((cw.keep_last(2), cw.keep_best(1, "eval_loss"))),)),
            ("eval_loss", "min", "keep_best"),
        ),
        (None, None, None),
    ],
)
def test_the_record_holds_the_ranking_and_survives_json(
    save: cw.Trigger | None, keep: cw.RetentionPolicy | None, expected: tuple[str, ...] | None
) -> None:
    record = json.loads(json.dumps(policy_record(save, keep)))
    ranked = None if expected is None else RankedBy(*expected)  # type: ignore[arg-type]
    assert policy_ranking(save, keep) == ranked
    assert ranking_of(record) == ranked


@pytest.mark.parametrize(
    "save",
    [
        cw.every(1000, start=200) | cw.on_improvement("eval_loss"),
        cw.schedule({0: 2000, 10_000: 1000}) | cw.on_signal(),  # int keys in Python
        cw.at_steps([10, 20]) | cw.geometric(10, 2.0) | cw.every_duration(timedelta(hours=1)),
    ],
)
def test_the_record_is_plain_json_and_rebuilds_the_policies(save: cw.Trigger) -> None:
    keep = cw.keep_last(3) | cw.keep_best(1, "eval_loss")
    content = cw.full_every(5000, otherwise=cw.weights_only(cast="bfloat16"))
    record = policy_record(save, keep, content)
    # what the manifest holds, as it is: JSON already (no int keys, no tuples)
    assert json.loads(json.dumps(record)) == record
    rebuilt = policy_from_config(record["config"])
    assert (rebuilt.save, rebuilt.keep, rebuilt.content) == (save, keep, content)


def test_a_run_under_a_schedule_saves_where_it_says(tmp_path: Path) -> None:
    with cw.CheckpointManager(
        tmp_path / "run", save=cw.schedule({0: 20, 50: 10}), keep=cw.keep_all(), async_save=False
    ) as manager:
        for step in range(1, 81):
            manager.step(step, {"w": torch.full((2,), float(step))})
    assert cw.open_run(tmp_path / "run").steps() == [20, 40, 50, 60, 70, 80]


def test_a_policy_of_your_own_is_recorded_without_config_but_with_its_ranking() -> None:
    record = policy_record(EveryOther(), cw.keep_best(2, "eval_loss"))
    assert record["config"] is None
    assert ranking_of(record) == RankedBy("eval_loss", "min", "keep_best")


@pytest.mark.parametrize(
    "record",
    [
        None,
        [],
        {},
        {"ranking": None},
        {"ranking": "eval_loss"},
        {"ranking": {"metric": "", "mode": "min", "policy": "keep_best"}},
        {"ranking": {"metric": "x", "mode": "lowest", "policy": "keep_best"}},
        {"ranking": {"metric": "x", "mode": "min", "policy": "regex"}},
        {"ranking": {"metric": 3, "mode": "min", "policy": "keep_best"}},
    ],
)
def test_a_record_that_says_nothing_usable_ranks_nothing(record: Any) -> None:
    assert ranking_of(record) is None
