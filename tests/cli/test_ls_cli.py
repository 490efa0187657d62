"""``ckptwise ls``: the columns that matter, readable at 80 columns and whole when piped."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import pytest
import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli

#: what a ``Trainer`` reports: eight metrics, of which the policy ranks by one
TRAINER_METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "epoch",
    "eval_loss",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _trainer_like_run(
    root: Path, *, mode: Literal["min", "max"] = "min", metric: str = "eval_loss"
) -> Path:
    save = cw.every(2) | cw.on_improvement(metric, mode=mode)
    keep = cw.keep_last(2) | cw.keep_best(1, metric, mode=mode)
    values = [0.9, 0.5, 0.7, 0.6, 0.8, 0.65]  # best (min) at step 2, (max) at step 1
    with cw.CheckpointManager(root, save=save, keep=keep) as manager:
        for step, value in enumerate(values, start=1):
            metrics = dict.fromkeys(TRAINER_METRICS, 1.0 / step)
            metrics[metric] = value
            manager.step(step, {"model": {"w": torch.full((8,), float(step))}}, metrics=metrics)
    return root


def _ls(*args: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, ["ls", *args], env=env)
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)


def _values(root: Path) -> dict[int, list[str]]:
    """Every value ``ls`` must show whole for each step: time, reasons, kept reasons."""
    run = cw.open_run(root)
    kept = run.kept()
    return {
        info.step: [
            info.time.astimezone().strftime("%H:%M:%S"),
            *info.reasons,
            *(w for why in kept.get(info.step, []) for w in why.split()),
        ]
        for info in run.checkpoints()
    }


def test_piped_ls_shows_the_columns_that_matter_whole(tmp_path: Path) -> None:
    root = _trainer_like_run(tmp_path / "run")
    out = _ls(str(root))
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("step"))
    assert header.split() == [
        "step",
        "time",
        "saved",
        "because",
        "eval_loss",
        "bytes",
        "kept",
        "because",
    ]
    assert "…" not in out
    for name in TRAINER_METRICS:
        if name != "eval_loss":
            assert name not in out.split()  # seven metrics do not crowd the table
    rows = {
        int(line.split()[0]): line for line in lines if line.split() and line.split()[0].isdigit()
    }
    assert sorted(rows) == [2, 4, 6]
    for step, values in _values(root).items():
        for value in values:
            assert value in rows[step].split() or value in rows[step], (step, value)
    assert "0.5" in rows[2].split()  # the ranked metric's value
    assert "best 1 eval_loss" in rows[2]
    assert "ranked by eval_loss (the run's keep_best, lower is better)" in out


def test_ls_fits_80_columns_on_a_terminal_without_cutting_a_word(tmp_path: Path) -> None:
    root = _trainer_like_run(tmp_path / "run")
    env = {"TTY_COMPATIBLE": "1", "COLUMNS": "80", "NO_COLOR": "1"}
    out = _ls(str(root), env=env)
    assert "━" in out or "─" in out  # drawn by rich, as on a terminal
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out
    words = out.split()
    for values in _values(root).values():
        for value in values:
            assert any(value in word for word in words), value
    assert "on_improvement(eval_loss)" in words or "on_improvement(eval_loss)," in words


def test_ls_metrics_option_adds_columns_and_refuses_unknown_names(tmp_path: Path) -> None:
    root = _trainer_like_run(tmp_path / "run")
    out = _ls(str(root), "--metrics", "loss, eval_runtime")
    header = next(line for line in out.splitlines() if line.startswith("step"))
    assert header.split()[4:7] == ["eval_loss", "loss", "eval_runtime"]
    wide = _ls(
        str(root), "--metrics", "loss,eval_runtime", env={"TTY_COMPATIBLE": "1", "COLUMNS": "80"}
    )
    assert "…" not in wide  # too wide for 80 columns: whole rows, which the terminal wraps
    bad = CliRunner().invoke(cli, ["ls", str(root), "--metrics", "eval_los"])
    assert bad.exit_code == 2
    assert "the run recorded: epoch, eval_loss, eval_runtime" in bad.stderr
    assert "did you mean 'eval_loss'?" in bad.stderr


@pytest.mark.parametrize("mode", ["min", "max"])
def test_ls_json_names_what_the_run_ranks_by(tmp_path: Path, mode: Literal["min", "max"]) -> None:
    root = _trainer_like_run(tmp_path / "run", mode=mode, metric="eval_acc")
    doc = json.loads(_ls(str(root), "--json"))
    assert doc["ranked_by"] == {"metric": "eval_acc", "policy": "keep_best", "mode": mode}
    rows = {row["step"]: row for row in doc["checkpoints"]}
    best = 2 if mode == "min" else 1
    assert "best 1 eval_acc" in rows[best]["kept_because"]


def test_ls_of_a_run_without_a_ranking_policy(tmp_path: Path) -> None:
    with cw.CheckpointManager(tmp_path / "run", save=cw.every(1)) as manager:
        manager.step(1, {"w": torch.zeros(2)}, metrics={"loss": 1.0})
    out = _ls(str(tmp_path / "run"))
    header = next(line for line in out.splitlines() if line.startswith("step"))
    assert header.split() == ["step", "time", "saved", "because", "bytes", "kept", "because"]
    assert "ranked by" not in out
    assert json.loads(_ls(str(tmp_path / "run"), "--json"))["ranked_by"] is None


def test_ls_shows_what_a_checkpoint_holds_only_when_some_are_slim(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with cw.CheckpointManager(root, save=cw.every(1), content=cw.full_every(2)) as manager:
        for step in (1, 2, 3):
            manager.step(step, {"model": torch.nn.Linear(2, 2), "epoch": step})
    out = _ls(str(root))
    header = next(line for line in out.splitlines() if line.startswith("step"))
    assert "holds" in header.split()
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:4].strip().isdigit()
    }
    assert "full" in rows["2"]
    assert any(word.startswith("weights") for word in rows["3"])
