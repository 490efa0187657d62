"""The manager: policies applied end to end on a real model, restore, pins, export."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptwise as cw
from ckptwise.store.layout import object_path
from tiny_state import Tiny, make_state, train_step


def steps_of(manager: cw.CheckpointManager) -> list[int]:
    return [c.step for c in manager.run.checkpoints()]


def test_policies_decide_saves_and_retention(run_dir: Path) -> None:
    state = make_state()
    save = cw.every(10, start=20) | cw.on_improvement("eval_loss") | cw.on_final()
    keep = cw.keep_last(2) | cw.keep_best(1, "eval_loss")
    evals = {15: 0.9, 30: 0.5, 45: 0.7, 60: 0.8}
    with cw.CheckpointManager(run_dir, save=save, keep=keep) as manager:
        decisions = {}
        for step in range(1, 71):
            train_step(state)
            metrics = {"eval_loss": evals[step]} if step in evals else {}
            decisions[step] = manager.step(step, state, metrics=metrics, final=step == 70)
        saved = {s: d.reasons for s, d in decisions.items() if d.save}
        assert [s for s, d in decisions.items() if d] == list(saved)  # truthy when it saves
        assert saved == {
            15: ("on_improvement(eval_loss)",),
            20: ("every(10)",),
            30: ("every(10)", "on_improvement(eval_loss)"),
            40: ("every(10)",),
            50: ("every(10)",),
            60: ("every(10)",),
            70: ("every(10)", "final"),
        }
        manager.wait()  # the save of step 70 commits (and prunes) in the background
        assert steps_of(manager) == [30, 60, 70]
        assert manager.last_plan is not None
        assert manager.last_plan.keep[30] == ("best 1 eval_loss",)
        assert manager.run.checkpoints()[0].metrics == {"eval_loss": 0.5}


def test_restore_returns_zero_on_an_empty_run(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(5)) as manager:
        assert manager.restore(make_state()) == 0
        assert manager.resumed_from is None


def test_restore_loads_every_part_of_the_state(run_dir: Path) -> None:
    state = make_state()
    state["epoch"] = 4
    state["ema"] = torch.tensor([1.0, 2.0])
    for _ in range(5):
        train_step(state)
    with cw.CheckpointManager(run_dir, save=cw.every(5)) as manager:
        manager.step(5, state)
    fresh = make_state(seed=1)
    fresh["epoch"] = 0
    ema = torch.zeros(2)
    fresh["ema"] = ema
    assert cw.open_run(run_dir).restore(fresh, rng=True) == 5
    for key in ("model", "optimizer", "scheduler"):
        assert str(fresh[key].state_dict()) == str(state[key].state_dict())
    assert fresh["epoch"] == 4
    assert fresh["ema"] is ema
    assert torch.equal(ema, torch.tensor([1.0, 2.0]))


def test_restore_falls_back_past_a_corrupt_checkpoint(run_dir: Path) -> None:
    state = make_state()
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        for step in (1, 2):
            train_step(state)
            manager.step(step, state)
        expected_step1 = manager.run.load(1)["model"]
        head = manager.run.manifest(2).tensors["model/head.weight"].object
    path = run_dir / object_path(head)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = make_state(seed=3)
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        with pytest.warns(cw.RestoreWarning, match=r"step 2 fails verification.*head\.weight"):
            assert manager.restore(fresh) == 1
        for name, tensor in fresh["model"].state_dict().items():
            assert torch.equal(tensor, expected_step1[name])
        with pytest.raises(cw.CorruptCheckpointError, match="step 2"):
            manager.restore(fresh, step=2)
        assert 2 in steps_of(manager)  # a corrupt checkpoint is reported, never deleted


def test_restore_raises_when_nothing_verifies(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, {"w": torch.ones(3)})
        oid = manager.run.manifest(1).tensors["w"].object
    (run_dir / object_path(oid)).write_bytes(b"\0" * 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cw.RestoreWarning)
        with pytest.raises(cw.CorruptCheckpointError, match=r"no checkpoint .* verifies"):
            cw.open_run(run_dir).restore({"w": torch.zeros(3)})


def test_strict_restore_names_missing_entries(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, {"model": Tiny()})
    state: dict[str, Any] = {
        "model": Tiny(),
        "optimizer": torch.optim.SGD(Tiny().parameters(), 0.1),
    }
    with pytest.raises(cw.CheckpointError, match=r"no entry for 'optimizer'.*strict=False"):
        cw.open_run(run_dir).restore(state)
    assert cw.open_run(run_dir).restore(state, strict=False) == 1


def test_metric_history_survives_resume(run_dir: Path) -> None:
    save = cw.on_improvement("eval_loss")
    with cw.CheckpointManager(run_dir, save=save) as manager:
        assert manager.step(1, {"x": 1}, metrics={"eval_loss": 0.5}).save
        assert not manager.step(2, {"x": 2}, metrics={"eval_loss": 0.6}).save
    with cw.CheckpointManager(run_dir, save=save) as manager:
        manager.restore({"x": 0})
        assert not manager.step(2, {"x": 2}, metrics={"eval_loss": 0.55}).save
        assert manager.step(3, {"x": 3}, metrics={"eval_loss": 0.4}).save


def test_pinned_and_resumed_from_checkpoints_are_kept(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_all()) as manager:
        for step in (1, 2, 3):
            manager.step(step, {"v": torch.tensor(step)})
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        assert manager.restore({"v": torch.tensor(0)}, step=2) == 2
        manager.prune()  # the checkpoint resumed from is kept until a newer one commits
        assert manager.last_plan is not None
        assert manager.last_plan.keep == {2: ("resumed from",), 3: ("last 1", "newest")}
        assert steps_of(manager) == [2, 3]
        manager.step(4, {"v": torch.tensor(4)})
        manager.wait()
        assert steps_of(manager) == [4]  # then retention decides about it again
        manager.pin(4)
        for step in (5, 6):
            manager.step(step, {"v": torch.tensor(step)})
        manager.wait()
        assert steps_of(manager) == [4, 6]
        assert manager.last_plan.keep == {4: ("pinned",), 6: ("last 1", "newest")}
        manager.unpin(4)
        manager.prune()
        assert steps_of(manager) == [6]
        with pytest.raises(cw.CheckpointNotFoundError, match="step 99"):
            manager.pin(99)


def test_frozen_half_is_stored_once_across_ten_checkpoints(run_dir: Path) -> None:
    width = 256
    state = make_state(width, freeze=True)
    frozen = sum(p.numel() * 4 for p in state["model"].backbone.parameters())
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        for step in range(1, 11):
            train_step(state, width)
            manager.step(step, state)
        manager.wait()
        infos = manager.run.checkpoints()
    on_disk = sum(p.stat().st_size for p in (run_dir / "objects").rglob("*") if p.is_file())
    logical = sum(i.logical_bytes for i in infos)
    per_save_changing = infos[-1].logical_bytes - frozen
    assert len(infos) == 10
    assert logical > 10 * frozen
    # one copy of the frozen weights plus what changes at each save, nothing more
    assert frozen + 10 * per_save_changing * 0.9 < on_disk < frozen + 10 * per_save_changing + 4096
    assert on_disk < 1.2 * frozen + 10 * per_save_changing
    assert all(i.new_bytes < frozen / 10 for i in infos[1:])


def test_a_manager_given_no_policy_saves_as_the_trainer_does_and_a_reader_writes_nothing(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = cw.open_run(run_dir)
    assert reader.checkpoints() == []
    assert not run_dir.exists()  # a reader writes nothing, not even a lock
    with cw.CheckpointManager(run_dir) as manager:
        assert "given no save=: saving every(500) | on_final()" in caplog.text
        assert not manager.step(499, {"w": torch.ones(1)}).save
        assert manager.step(500, {"w": torch.ones(1)}).save
        assert manager.step(501, {"w": torch.ones(1)}, final=True).save
        manager.wait()
        assert steps_of(manager) == [500, 501]  # kept: keep_all() by default


def test_a_manager_given_only_retention_saves_as_the_trainer_does(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with cw.CheckpointManager(run_dir, keep=cw.keep_last(2)) as manager:
        assert "given no save=: saving every(500) | on_final()" in caplog.text
        decisions = {s: manager.step(s, {"w": torch.ones(1) * s}) for s in (1, 499, 500, 501)}
        assert [s for s, d in decisions.items() if d.save] == [500]
        final = manager.step(503, {"w": torch.ones(1)}, final=True)
        assert final.save
        assert final.reasons == ("final",)
        manager.wait()
        assert steps_of(manager) == [500, 503]
    with cw.CheckpointManager(run_dir, save=cw.never(), keep=cw.keep_last(2)) as manager:
        assert not manager.step(1000, {"w": torch.ones(1)}, final=True).save  # asked for
        manager.save(1000, {"w": torch.ones(1)})  # saves only when told
        manager.wait()
        assert steps_of(manager) == [503, 1000]


def test_export_writes_plain_safetensors(run_dir: Path, tmp_path: Path) -> None:
    state = make_state()
    train_step(state)
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, state)
        path = manager.run.export(1, tmp_path / "export")  # waits for step 1 to commit
        with pytest.raises(cw.CheckpointError, match="no tensors under 'vision'"):
            manager.run.export(1, tmp_path / "x", key="vision")
    weights = load_file(str(path))
    fresh = Tiny()
    fresh.load_state_dict(weights)
    for name, tensor in state["model"].state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)


def test_bad_arguments_fail_at_construction(run_dir: Path) -> None:
    with pytest.raises(cw.ConfigError, match=r"save= expects triggers.*got 5"):
        cw.CheckpointManager(run_dir, save=5)  # type: ignore[arg-type]
    with pytest.raises(cw.ConfigError, match="keep= expects a retention policy"):
        cw.CheckpointManager(run_dir, keep="last")  # type: ignore[arg-type]
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        with pytest.raises(cw.ConfigError, match="step must be an integer >= 0, got -1"):
            manager.step(-1, {})
        with pytest.raises(cw.ConfigError, match="metric 'acc' has value 'high'"):
            manager.step(1, {}, metrics={"acc": "high"})
        with pytest.raises(cw.ConfigError, match="reserved"):
            manager.save(1, {"__rng__": 1})


def test_unsaveable_state_fails_without_committing(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        with pytest.raises(cw.SnapshotError, match=r"cfg/fn: cannot save a value of type"):
            manager.step(1, {"cfg": {"fn": print}})
        assert manager.run.checkpoints() == []


def test_tensor_metrics_and_nan_are_accepted(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1)) as manager:
        manager.step(1, {"x": 1}, metrics={"loss": torch.tensor(0.5), "bad": math.nan})
        manager.wait()
        info = manager.run.checkpoints()[0]
        assert info.metrics["loss"] == 0.5
        assert math.isnan(info.metrics["bad"])


def test_closed_manager_refuses_work(run_dir: Path) -> None:
    manager = cw.CheckpointManager(run_dir, save=cw.every(1))
    manager.close()
    manager.close()
    with pytest.raises(cw.CheckpointError, match="closed"):
        manager.step(1, {})


def test_in_memory_run_through_the_manager() -> None:
    url = "memory://manager-test"
    state = make_state()
    with cw.CheckpointManager(url, save=cw.every(2), keep=cw.keep_last(1)) as manager:
        for step in range(1, 5):
            train_step(state)
            manager.step(step, state)
        manager.wait()
        assert steps_of(manager) == [4]
    fresh = make_state(seed=9)
    assert cw.open_run(url).restore(fresh, rng=True) == 4
    assert torch.equal(fresh["model"].head.weight, state["model"].head.weight)


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)


@pytest.mark.parametrize("tty", [True, False])
def test_long_saves_and_restores_report_bytes_and_speed_on_a_terminal_only(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    import ckptwise.report as report_module

    terminal = _Terminal(tty)
    monkeypatch.setattr(report_module, "REPORT_AFTER_SECONDS", 0.0)
    monkeypatch.setattr("sys.stderr", terminal)
    with cw.CheckpointManager(run_dir, save=cw.every(1), rng=False) as manager:
        manager.step(1, {"w": torch.ones(1000)})
    cw.open_run(run_dir).restore({"w": torch.zeros(1000)})
    if tty:
        assert "ckptwise: saved step 1: 0 MB in" in terminal.text
        assert "ckptwise: restored step 1:" in terminal.text
        assert "MB/s" in terminal.text
    else:
        assert terminal.text == ""
