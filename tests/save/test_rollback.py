"""Going back: a save at an earlier step moves the later checkpoints to a branch, never loses
them, and never lets them push out or shadow what is saved from then on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import ckptwise as cw


def state_at(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), float(step)), "frozen": torch.arange(4096.0)}


def saved_run(root: Path, steps: list[int]) -> None:
    with cw.CheckpointManager(root, save=cw.every(1), keep=cw.keep_all()) as m:
        for step in steps:
            m.save(step, state_at(step))


def on_disk(root: Path) -> int:
    return sum(1 for p in (root / "objects").rglob("*") if p.is_file())


@pytest.mark.parametrize("async_save", [False, True])
def test_training_resumed_from_an_older_step_keeps_what_it_saves(
    tmp_path: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    saved_run(tmp_path, [10, 20, 30])
    live = state_at(0)
    with cw.CheckpointManager(
        tmp_path, save=cw.every(1), keep=cw.keep_last(2), async_save=async_save
    ) as m:
        assert m.restore(live, step=10) == 10  # a loss spike after 10: go back
        assert torch.equal(live["w"], state_at(10)["w"])
        with caplog.at_level(logging.WARNING, logger="ckptwise"):
            for step in range(11, 16):
                m.step(step, state_at(step))
                m.wait()
                assert step in m.run.steps()  # what it saved is there after the call
    run = cw.open_run(tmp_path)
    assert run.steps() == [14, 15]  # keep_last(2) of the line being trained
    assert "training went back" in caplog.text
    [(name, steps)] = run.branches().items()
    assert steps == [20, 30]  # set aside, not deleted
    assert run.verify() == []
    # a plain restore continues the line being trained, not the abandoned one
    fresh = state_at(0)
    assert run.restore(fresh) == 15
    assert torch.equal(fresh["w"], state_at(15)["w"])
    # the abandoned line is still there, whole, for whoever wants it back
    branch = run.branch(name)
    assert branch.steps() == [20, 30]
    assert branch.verify() == []
    assert branch.restore(fresh) == 30
    assert torch.equal(fresh["w"], state_at(30)["w"])
    assert torch.equal(fresh["frozen"], state_at(30)["frozen"])


def test_a_step_earlier_than_the_newest_is_never_deleted_by_its_own_save(tmp_path: Path) -> None:
    saved_run(tmp_path, [10, 20, 30])
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_last(2)) as m:
        decision = m.step(5, state_at(5))  # a step counter that restarted
        assert decision.save
        m.wait()
        assert m.run.steps() == [5]
        assert m.run.branches()
        assert sum(map(len, m.run.branches().values())) == 3
        m.step(6, state_at(6))
        m.step(7, state_at(7))
        m.wait()
        assert m.run.steps() == [6, 7]
    assert cw.open_run(tmp_path).verify() == []


def test_deleting_a_branch_frees_only_what_it_alone_held(tmp_path: Path) -> None:
    saved_run(tmp_path, [10, 20, 30])
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_all()) as m:
        m.save(11, state_at(11))
        m.wait()  # the later checkpoints move to a branch as step 11 commits
        [name] = m.run.branches()
        before = on_disk(tmp_path)
        held = m.run.physical_bytes()
        with pytest.raises(cw.CheckpointNotFoundError, match="no branch 'nope'"):
            m.delete_branch("nope")
        m.delete_branch(name)
        assert m.run.branches() == {}
        assert on_disk(tmp_path) == before - 2  # the two tensors only 20 and 30 held
        assert m.run.physical_bytes() == held - 2 * 64 * 4  # and du counts what is on disk
    run = cw.open_run(tmp_path)
    assert run.steps() == [10, 11]
    assert run.verify() == []  # the frozen tensor, shared with the branch, is still there
    fresh = state_at(0)
    assert run.restore(fresh) == 11
    assert torch.equal(fresh["frozen"], state_at(11)["frozen"])


def test_a_branch_is_read_only_and_names_are_checked(tmp_path: Path) -> None:
    saved_run(tmp_path, [10, 20])
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_all()) as m:
        m.save(15, state_at(15))
    run = cw.open_run(tmp_path)
    [name] = run.branches()
    with pytest.raises(cw.CheckpointNotFoundError, match="no branch"):
        run.branch("other")
    with pytest.raises(cw.ConfigError, match="not a branch name"):
        run.branch("../objects")
    assert run.branch(name).load(20)["w"].eq(20).all()


def test_ls_shows_branches_and_lists_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ckptwise.cli.main import cli

    saved_run(tmp_path, [10, 20])
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_all()) as m:
        m.save(15, state_at(15))
    [name] = cw.open_run(tmp_path).branches()
    listed = CliRunner().invoke(cli, ["ls", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    doc = json.loads(listed.output)
    assert [row["step"] for row in doc["checkpoints"]] == [10, 15]
    assert doc["branches"] == {name: [20]}
    table = CliRunner().invoke(cli, ["ls", str(tmp_path)])
    assert f"branch {name}: step(s) 20" in table.output
    one = CliRunner().invoke(cli, ["ls", str(tmp_path), "--branch", name, "--json"])
    assert [row["step"] for row in json.loads(one.output)["checkpoints"]] == [20]
    missing = CliRunner().invoke(cli, ["ls", str(tmp_path), "--branch", "nope"])
    assert missing.exit_code != 0
    assert "no branch 'nope'" in missing.output


def test_a_pin_goes_with_its_checkpoint_into_the_branch(tmp_path: Path) -> None:
    saved_run(tmp_path, [10, 20, 30])
    cw.open_run(tmp_path).pin(20)
    with cw.CheckpointManager(tmp_path, save=cw.every(1), keep=cw.keep_last(1)) as m:
        m.save(11, state_at(11))
        m.wait()
        assert m.run.pins() == set()  # step 20 of the new line is not pinned by the old pin
        for step in range(12, 22):
            m.step(step, state_at(step))
        m.wait()
        assert m.run.steps() == [21]
        assert list(m.run.branches().values()) == [
            [20, 30]
        ]  # the pinned checkpoint itself is kept, in the branch
