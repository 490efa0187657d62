"""``--json`` on a failing command still prints one JSON document on stdout.

Each of these failed with nothing on stdout: ``ls``, ``verify`` and ``du`` of a missing run,
``show`` and ``export`` of a missing step. The document names the error's class and its
message; the message is also on stderr and the exit code is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    with cw.CheckpointManager(root, save=cw.every(1), async_save=False) as manager:
        manager.step(1, {"model": torch.nn.Linear(2, 2)})
    return root


def _cases(run: Path) -> dict[str, tuple[list[str], str, str]]:
    """Each command's arguments, the error class it reports and a part of its message."""
    missing = str(run.parent / "nowhere")
    return {
        "ls": (["ls", missing, "--json"], "CheckpointNotFoundError", "does not exist"),
        "verify": (["verify", missing, "--json"], "CheckpointNotFoundError", "does not exist"),
        "du": (["du", "--json", missing], "CheckpointNotFoundError", "does not exist"),
        "show": (
            ["show", str(run), "--step", "99", "--json"],
            "CheckpointNotFoundError",
            "no committed checkpoint at step 99",
        ),
        "export": (
            ["export", str(run), str(run.parent / "out"), "--step", "99", "--json"],
            "CheckpointNotFoundError",
            "no committed checkpoint at step 99",
        ),
    }


@pytest.mark.parametrize("command", ["ls", "verify", "du", "show", "export"])
def test_a_failing_command_prints_its_error_as_json(run: Path, command: str) -> None:
    args, kind, words = _cases(run)[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)  # one document, nothing else on stdout
    assert doc["error"]["type"] == kind
    assert words in doc["error"]["message"]
    assert doc["error"]["exit_code"] == 1
    assert f"Error: {doc['error']['message']}" in result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    )  # no traceback


def test_without_json_a_failure_prints_only_on_stderr(run: Path) -> None:
    result = CliRunner().invoke(cli, ["show", str(run), "--step", "99"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no committed checkpoint at step 99" in result.stderr


def test_a_bad_command_line_with_json_is_a_usage_error_document(run: Path) -> None:
    result = CliRunner().invoke(cli, ["show", str(run), "--json", "--mode", "sideways"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["error"]["type"] == "UsageError"
    assert doc["error"]["exit_code"] == 2
