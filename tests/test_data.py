"""ResumableSampler: a resumed loader yields exactly the indices an uninterrupted one would."""

from __future__ import annotations

import pytest

import ckptwise as cw


def take(it: object, n: int) -> list[int]:
    iterator = iter(it)  # type: ignore[call-overload]
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("consumed", [0, 3, 10, 11, 25])
def test_resume_mid_epoch_continues_the_same_order(consumed: int) -> None:
    straight = cw.ResumableSampler(10, seed=4)
    stream = [i for _ in range(4) for i in straight]
    first = cw.ResumableSampler(10, seed=4)
    seen: list[int] = []
    while len(seen) < consumed:
        for i in first:
            seen.append(i)
            if len(seen) == consumed:
                break
    resumed = cw.ResumableSampler(10, seed=4)
    resumed.load_state_dict(first.state_dict())
    rest = [i for _ in range(4) for i in resumed]
    assert (seen + rest)[: len(stream)] == stream


def test_epochs_are_permutations_that_differ() -> None:
    sampler = cw.ResumableSampler(50, seed=1)
    a, b = list(sampler), list(sampler)
    assert sorted(a) == sorted(b) == list(range(50))
    assert a != b
    assert list(cw.ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_manual_advance_for_worker_loaders() -> None:
    sampler = cw.ResumableSampler(8, seed=0, auto_advance=False)
    order = list(sampler)
    assert sampler.state_dict()["offset"] == 0
    sampler.advance(11)
    assert (sampler.epoch, sampler.offset) == (1, 3)
    assert list(sampler) == sampler.order(1)[3:]
    assert order == sampler.order(0)


def test_mismatched_data_set_is_refused() -> None:
    with pytest.raises(cw.ConfigError, match="covered 10 samples but this one covers 12"):
        cw.ResumableSampler(12).load_state_dict(cw.ResumableSampler(10).state_dict())
    with pytest.raises(cw.ConfigError, match="positive int"):
        cw.ResumableSampler(0)
