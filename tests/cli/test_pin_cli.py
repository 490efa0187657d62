"""``ckptwise pin`` and ``unpin`` against a run whose writer is pruning."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_pin_of_a_step_the_writer_is_deleting_fails_with_the_reason(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(2)) as manager:
        for step in (1, 2):
            manager.step(step, {"w": torch.full((2,), float(step))})
        manager.wait()
        # the writer's retention marks a step it is about to delete with a tombstone
        (run_dir / "pruning").mkdir()
        (run_dir / "pruning" / "000000000001").write_text("{}")
        code, out = _run("pin", str(run_dir), "1")
        assert code == 1
        assert "step 1 of" in out
        assert "being deleted by the writer's retention" in out
        assert "pin a newer step" in out
        assert cw.open_run(run_dir).pins() == set()
        code, out = _run("pin", str(run_dir), "2")
        assert (code, "pinned step 2") == (0, out[: len("pinned step 2")])
        assert _run("unpin", str(run_dir), "2")[0] == 0
        code, out = _run("unpin", str(run_dir), "2")
        assert code == 1
        assert "is not pinned" in out


def test_pin_of_a_step_that_is_gone_fails(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        for step in (1, 2):
            manager.step(step, {"w": torch.full((2,), float(step))})
    code, out = _run("pin", str(run_dir), "1")
    assert code == 1
    assert "no committed checkpoint at step 1" in out
