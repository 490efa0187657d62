"""Every command pointed at a folder that holds no run says so and exits non-zero.

The natural mistake is the folder above the run (a ``Trainer``'s ``output_dir``, whose run
is ``output_dir/ckptwise``): the message names the run one level down.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli

#: every command that reads a run, with what it needs after RUN
COMMANDS = {
    "ls": [],
    "verify": [],
    "show": [],
    "du": [],
    "diff": ["1", "2"],
    "export": ["OUT"],
    "archive": ["OUT"],
    "pin": ["1"],
    "unpin": ["1"],
}


def _args(command: str, run: Path, tmp_path: Path) -> list[str]:
    rest = [str(tmp_path / "out") if a == "OUT" else a for a in COMMANDS[command]]
    return [command, str(run), *rest]


def _folders(tmp_path: Path) -> dict[str, Path]:
    """A missing folder, an empty one, and one of unrelated files (like /etc/apt)."""
    (tmp_path / "empty").mkdir()
    unrelated = tmp_path / "apt"
    (unrelated / "apt.conf.d").mkdir(parents=True)
    (unrelated / "sources.list").write_text("deb http://example.invalid stable main\n")
    (unrelated / "apt.conf.d" / "01autoremove").write_text("APT {};\n")
    return {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "unrelated": unrelated}


def test_the_command_list_is_complete() -> None:
    assert set(COMMANDS) == set(cli.list_commands(click.Context(cli))) - {"simulate"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_folder_without_a_run(command: str, tmp_path: Path) -> None:
    for kind, folder in _folders(tmp_path).items():
        result = CliRunner().invoke(cli, _args(command, folder, tmp_path))
        assert result.exit_code == 1, (kind, result.output)
        assert "no ckptwise run here" in result.stderr, kind
        assert "output_dir/ckptwise" in result.stderr, kind  # where a Trainer's run is
        assert result.stdout == "", kind
    assert not (tmp_path / "out").exists()  # export and archive wrote nothing
    assert not (tmp_path / "empty" / "pins").exists()  # pin created nothing


def _trainer_like(output_dir: Path) -> Path:
    run = output_dir / "ckptwise"
    with cw.CheckpointManager(run, save=cw.every(1)) as manager:
        for step in (1, 2):
            manager.step(step, {"model": {"w": torch.full((4,), float(step))}})
    (output_dir / "runs").mkdir()  # what a Trainer leaves next to it
    (output_dir / "trainer_state.json").write_text("{}")
    return run


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_folder_above_a_run_names_the_run(command: str, tmp_path: Path) -> None:
    run = _trainer_like(tmp_path / "hf_out")
    result = CliRunner().invoke(cli, _args(command, tmp_path / "hf_out", tmp_path))
    assert result.exit_code == 1, result.output
    assert f"did you mean {run}?" in result.stderr
    if command == "unpin":
        cw.open_run(run).pin(1)
    assert CliRunner().invoke(cli, _args(command, run, tmp_path)).exit_code == 0


def test_exit_codes_of_the_real_console_script(tmp_path: Path) -> None:
    """Through the installed ``ckptwise`` entry point and ``python -m ckptwise``."""
    run = _trainer_like(tmp_path / "hf_out")
    script = Path(sys.executable).with_name("ckptwise")
    assert script.exists(), "the ckptwise console script is not installed next to python"
    for prefix in ([str(script)], [sys.executable, "-m", "ckptwise"]):
        for args, code, said in (
            (["verify", str(tmp_path / "hf_out")], 1, f"did you mean {run}?"),
            (["du", str(tmp_path / "nope")], 1, "no ckptwise run here"),
            (["ls", str(run)], 0, "2 checkpoint(s)"),
        ):
            proc = subprocess.run(
                [*prefix, *args], capture_output=True, text=True, timeout=120, check=False
            )
            assert proc.returncode == code, (prefix, args, proc.stderr)
            assert said in proc.stdout + proc.stderr
