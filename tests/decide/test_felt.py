"""Felt charges a background save what the steps beside it lost, against quiet steps."""

from __future__ import annotations

import pytest

from ckptwise.decide.felt import Felt


def steps(
    felt: Felt, durations: list[float], *, busy: list[bool], start: float = 0.0
) -> list[float]:
    charged, now = [], start
    for took, is_busy in zip(durations, busy, strict=True):
        felt.left(now)
        now += took
        charged.append(felt.arrived(now, busy=is_busy))
    return charged


def test_nothing_is_charged_without_a_save() -> None:
    felt = Felt()
    assert steps(felt, [1.0, 1.2, 0.8, 1.0], busy=[False] * 4) == [0.0] * 4


def test_steps_beside_a_save_are_charged_their_excess_over_the_quiet_median() -> None:
    felt = Felt()
    steps(felt, [1.0, 1.0, 1.0, 1.0], busy=[False] * 4, start=0.0)
    felt.saved()
    charged = steps(felt, [1.5, 1.25, 1.0, 1.0], busy=[True, False, False, False], start=10.0)
    # the step that ran while the save finished is the last one charged
    assert charged == [pytest.approx(0.5), pytest.approx(0.25), 0.0, 0.0]


def test_faster_steps_are_never_negative_and_no_baseline_means_no_charge() -> None:
    felt = Felt()
    felt.saved()
    assert steps(felt, [5.0], busy=[False]) == [0.0]  # no quiet steps known yet
    steps(felt, [1.0, 1.0, 1.0], busy=[False] * 3, start=20.0)
    felt.saved()
    assert steps(felt, [0.5], busy=[False], start=40.0) == [0.0]


def test_a_call_without_left_charges_nothing() -> None:
    felt = Felt()
    felt.saved()
    assert felt.arrived(3.0, busy=True) == 0.0
