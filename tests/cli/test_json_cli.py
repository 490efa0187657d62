"""Every command takes ``--json`` and prints one JSON document on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    save = cw.every(1) | cw.on_improvement("eval_loss")
    with cw.CheckpointManager(root, save=save, keep=cw.keep_all()) as manager:
        for step, loss in ((1, 0.9), (2, 0.4), (3, 0.6)):
            manager.step(step, {"model": model, "optimizer": opt}, metrics={"eval_loss": loss})
    return root


def _commands(root: Path, out: Path) -> dict[str, list[str]]:
    return {
        "ls": ["ls", str(root)],
        "verify": ["verify", str(root)],
        "show": ["show", str(root)],
        "du": ["du", str(root)],
        "diff": ["diff", str(root), "1", "2"],
        "export": ["export", str(root), str(out / "export"), "--step", "best"],
        "archive": ["archive", str(root), str(out / "archive")],
        "pin": ["pin", str(root), "2"],
        "unpin": ["unpin", str(root), "2"],
        "simulate": ["simulate", "--save-steps", "5", "--steps", "12"],
    }


def test_every_command_has_a_json_option() -> None:
    for name in cli.list_commands(click.Context(cli)):
        command = cli.get_command(click.Context(cli), name)
        assert command is not None
        assert any("--json" in p.opts for p in command.params), name


def test_every_command_prints_one_json_document(run: Path, tmp_path: Path) -> None:
    commands = _commands(run, tmp_path)
    assert set(commands) == set(cli.list_commands(click.Context(cli)))
    docs = {}
    for name, args in commands.items():  # in order: pin before unpin
        result = CliRunner().invoke(cli, [*args, "--json"])
        assert result.exit_code == 0, (name, result.output)
        docs[name] = json.loads(result.stdout)
    assert docs["export"]["step"] == 2  # best by the run's own on_improvement metric
    assert docs["export"]["files"] == ["model.safetensors"]
    assert docs["archive"]["step"] == 3
    assert {"optimizer/state/0/exp_avg", "optimizer/state/1/exp_avg_sq"} <= set(
        docs["archive"]["lossy"]
    )
    assert docs["archive"]["stored_bytes"] < docs["archive"]["tensor_bytes"]
    assert (docs["pin"]["pinned"], docs["pin"]["pins"]) == (True, [2])
    assert (docs["unpin"]["pinned"], docs["unpin"]["pins"]) == (False, [])
    assert docs["verify"]["ok"] is True
    assert [s["step"] for s in docs["simulate"]["saves"]] == [5, 10, 12]
