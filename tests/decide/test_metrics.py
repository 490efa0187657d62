"""Metrics given as tensors are read only on steps where a policy reads them.

The probe is a real torch tensor whose subclass counts every read of its value (``item``,
``float``, ``tolist``): on a GPU each such read waits for the device.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import ckptwise as cw
from ckptwise.decide.metrics import Metrics, coerce_metrics
from ckptwise.decide.progress import PENDING_LIMIT, Progress
from ckptwise.errors import ConfigError
from ckptwise.manager import CheckpointManager
from ckptwise.testing import FakeClock

START = datetime(2026, 1, 1, tzinfo=UTC)


class Counted(torch.Tensor):
    """A tensor that counts the reads of its value, over all its copies."""

    reads: ClassVar[int] = 0
    _READS: ClassVar[tuple[Callable[..., Any], ...]] = (
        torch.Tensor.item,
        torch.Tensor.__float__,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
    )

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in cls._READS:
            Counted.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[no-untyped-call]


def counted(value: float) -> torch.Tensor:
    return torch.tensor(value).as_subclass(Counted)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Counted.reads = 0


def test_steps_no_trigger_reads_never_read_the_tensor(tmp_path: Path) -> None:
    save = cw.every(10) | cw.on_improvement("eval_loss")
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, save=save, rng=False, clock=FakeClock(START)) as manager:
        reads: dict[int, int] = {}
        for step in range(1, 11):
            before = Counted.reads
            metrics = {"loss": counted(10.0 - step)}
            if step == 5:
                metrics["eval_loss"] = counted(2.0)
            manager.step(step, {"model": model}, metrics=metrics)
            reads[step] = Counted.reads - before
        # steps 1-4 and 6-9: no trigger reads `loss`, nothing saves: no read at all
        assert all(reads[s] == 0 for s in (1, 2, 3, 4, 6, 7, 8, 9)), reads
        # step 5: on_improvement reads eval_loss (and saves, storing both metrics)
        assert reads[5] >= 1
        info = manager.run.info(10)
        assert info.metrics == {"loss": 0.0}
        assert manager.run.info(5).metrics == {"loss": 5.0, "eval_loss": 2.0}
        history = manager.run.manifest(10).extra["metric_history"]["loss"]
        assert (history["count"], history["min"], history["min_step"]) == (10, 0.0, 10)
        assert (history["max"], history["max_step"]) == (9.0, 1)


def test_on_improvement_reads_only_its_metric_on_the_steps_that_report_it() -> None:
    progress = Progress(START)
    trigger = cw.on_improvement("eval_loss")
    for step in range(1, 30):
        metrics = coerce_metrics(
            {"loss": counted(1.0 / step), **({"eval_loss": 1.0} if step % 10 == 0 else {})}
        )
        state = progress.state(step, START, metrics=metrics, requests=frozenset(), final=False)
        trigger.decide(state)
        progress.observe(step, metrics)
    assert Counted.reads == 0


def test_history_is_the_same_as_with_plain_numbers() -> None:
    lazy, eager = Progress(START), Progress(START)
    values = [3.0, 1.0, math.nan, 2.0, 0.5, math.inf]
    for step, value in enumerate(values, start=1):
        lazy.observe(step, coerce_metrics({"loss": counted(value), "lr": 0.1}))
        eager.observe(step, {"loss": value, "lr": 0.1})
    assert Counted.reads == 0
    assert lazy.counts() == {"loss": 6, "lr": 6}  # counting reads nothing
    assert Counted.reads == 0
    assert lazy.to_json() == eager.to_json()
    assert Counted.reads == 1  # the pending values were read together, once


def test_a_trigger_reading_the_history_reads_that_metric_only() -> None:
    progress = Progress(START)
    for step in range(1, 5):
        progress.observe(step, coerce_metrics({"a": counted(step), "b": counted(-step)}))
    state = progress.state(5, START, metrics={}, requests=frozenset(), final=False)
    assert set(state.history) == {"a", "b"}  # names are free
    assert Counted.reads == 0
    assert state.history["a"].max == 4.0
    assert Counted.reads == 1
    progress.observe(5, coerce_metrics({"a": counted(9.0)}))
    assert state.history["a"].max == 4.0  # the snapshot is the history before step 5
    assert state.history["b"].min == -4.0
    assert progress.history["a"].max == 9.0


def test_pending_tensors_are_read_in_batches() -> None:
    progress = Progress(START)
    for step in range(1, PENDING_LIMIT + 1):
        progress.observe(step, coerce_metrics({"loss": counted(float(step))}))
    assert Counted.reads == 1  # PENDING_LIMIT values, one transfer
    assert progress.history["loss"].max == PENDING_LIMIT


def test_a_tensor_changed_in_place_after_the_step_keeps_its_reported_value() -> None:
    running = torch.zeros(())
    metrics = coerce_metrics({"loss": running})
    progress = Progress(START)
    progress.observe(1, metrics)
    running += 5.0  # a loop that accumulates into its own tensor
    assert metrics["loss"] == 0.0
    assert progress.history["loss"].last == 0.0


def test_metrics_read_lazily_but_check_at_once() -> None:
    metrics = coerce_metrics({"loss": counted(0.25), "lr": 3e-4, "n": torch.tensor([7])})
    assert isinstance(metrics, Metrics)
    assert list(metrics) == ["loss", "lr", "n"]
    assert "loss" in metrics
    assert len(metrics) == 3
    assert Counted.reads == 0
    assert metrics["lr"] == 3e-4
    assert Counted.reads == 0
    assert metrics.get("loss") == 0.25
    assert Counted.reads == 1
    assert metrics["loss"] == 0.25
    assert Counted.reads == 1  # read once
    assert dict(metrics) == {"loss": 0.25, "lr": 3e-4, "n": 7.0}
    assert pickle.loads(pickle.dumps(metrics)) == {"loss": 0.25, "lr": 3e-4, "n": 7.0}
    assert coerce_metrics(metrics) is metrics


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (torch.ones(3), r"metric 'x' has value tensor\(\[1\., 1\., 1\.\]\)"),
        (torch.tensor(True), r"metric 'x' has value tensor\(True\)"),
        (torch.tensor(1 + 2j), r"metric 'x' has value"),
        ("high", r"metric 'x' has value 'high' of type str"),
    ],
)
def test_values_that_are_not_one_number_are_refused_at_the_step(
    value: object, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        coerce_metrics({"x": value})


def test_adapters_still_get_plain_floats_and_skip_what_is_not_a_number() -> None:
    assert coerce_metrics({"loss": counted(0.5), "name": "run", 3: 1.0}, strict=False) == {
        "loss": 0.5
    }


def test_a_resumed_run_continues_the_history_of_tensor_metrics(tmp_path: Path) -> None:
    clock = FakeClock(START)
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, save=cw.every(3), rng=False, clock=clock) as manager:
        for step in range(1, 4):
            manager.step(step, {"model": model}, metrics={"loss": counted(float(step))})
    clock.advance(timedelta(minutes=1))
    with CheckpointManager(tmp_path, save=cw.on_improvement("loss"), clock=clock) as again:
        assert again.restore({"model": model}) == 3
        assert not again.step(4, {"model": model}, metrics={"loss": counted(1.5)}).save
        assert again.step(5, {"model": model}, metrics={"loss": counted(0.5)}).save
