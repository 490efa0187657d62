"""``ls`` and ``export --step best`` rank by the policy the run recorded
(``extra["policy"]`` of the newest manifest), not by traces of it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli
from ckptwise.config import policy_record
from ckptwise.store import CheckpointStore, LocalBackend

#: accuracy peaks at step 2; its saves carry an on_improvement(eval_loss) reason that a
#: reader of traces alone would rank by
STEPS = ((1, 0.5, 0.9), (2, 0.9, 0.6), (3, 0.7, 0.3))


def _recorded_run(root: Path, keep: cw.RetentionPolicy, *, record: bool = True) -> Path:
    store = CheckpointStore(LocalBackend(root))
    for step, acc, loss in STEPS:
        extra = {"policy": policy_record(cw.every(1), keep)} if record else {}
        store.commit(
            step,
            {"model/w": torch.full((4,), float(step))},
            tree={
                "model": {
                    "kind": "value",
                    "value": {"w": {"__ckptwise__": "tensor", "name": "model/w"}},
                }
            },
            metrics={"eval_acc": acc, "eval_loss": loss},
            reasons=("every(1)", "on_improvement(eval_loss)"),
            extra=extra,
        )
    return root


def _ls_json(root: Path) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["ls", str(root), "--json"])
    assert result.exit_code == 0, result.output
    ranked: dict[str, object] = json.loads(result.stdout)
    return ranked


def _best(root: Path, out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", str(root), str(out), "--step", "best", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["step"], result.stderr


def test_the_recorded_ranking_wins_over_the_traces(tmp_path: Path) -> None:
    root = _recorded_run(tmp_path / "run", cw.keep_best(3, "eval_acc", mode="max"))
    assert _ls_json(root)["ranked_by"] == {
        "metric": "eval_acc",
        "policy": "keep_best",
        "mode": "max",
    }
    step, warned = _best(root, tmp_path / "out")
    assert step == 2
    assert warned == ""  # the direction is recorded, not guessed


def test_a_recorded_policy_without_ranking_ranks_nothing(tmp_path: Path) -> None:
    root = _recorded_run(tmp_path / "run", cw.keep_last(3))
    assert _ls_json(root)["ranked_by"] is None


def test_runs_written_before_the_record_fall_back_to_the_traces(tmp_path: Path) -> None:
    root = _recorded_run(tmp_path / "run", cw.keep_last(3), record=False)
    assert _ls_json(root)["ranked_by"] == {
        "metric": "eval_loss",
        "policy": "on_improvement",
        "mode": "min",
    }
    assert _best(root, tmp_path / "out")[0] == 3


def test_the_manager_records_its_policy(tmp_path: Path) -> None:
    save = cw.every(1) | cw.on_improvement("eval_loss")
    keep = cw.keep_best(2, "eval_acc", mode="max")
    content = cw.full()
    with cw.CheckpointManager(tmp_path / "run", save=save, keep=keep, content=content) as manager:
        for step, acc, loss in STEPS:
            manager.step(
                step,
                {"model": {"w": torch.zeros(2)}},
                metrics={"eval_acc": acc, "eval_loss": loss},
            )
    run = cw.open_run(tmp_path / "run")
    for step in run.steps():
        assert run.manifest(step).extra["policy"] == policy_record(save, keep, content)
    assert _ls_json(tmp_path / "run")["ranked_by"] == {
        "metric": "eval_acc",
        "policy": "keep_best",
        "mode": "max",
    }
    assert _best(tmp_path / "run", tmp_path / "out") == (2, "")


def test_a_run_knows_its_direction_before_its_metric_appears(tmp_path: Path) -> None:
    """keep_best(2, "eval_loss") (lower is better by default) over a run whose first
    checkpoints come before the first evaluation: ``ls`` says "lower is better" from the
    first checkpoint on and never "direction unknown", and ``export --step best`` waits for
    the metric instead of blaming a --metric nobody passed."""
    root = tmp_path / "run"
    keep = cw.keep_last(3) | cw.keep_best(2, "eval_loss")
    ranked_by = {"metric": "eval_loss", "policy": "keep_best", "mode": "min"}
    runner = CliRunner()
    with cw.CheckpointManager(root, save=cw.every(1), keep=keep, async_save=False) as manager:
        for step in range(1, 9):
            evaluated = {"eval_loss": 1 / step} if step % 4 == 0 else {}
            manager.step(step, {"model": {"w": torch.full((2,), step)}}, metrics=evaluated)
            assert _ls_json(root)["ranked_by"] == ranked_by, step
            text = runner.invoke(cli, ["ls", str(root)]).output
            assert "eval_loss (the run's keep_best, lower is better)" in text, step
            best = runner.invoke(
                cli, ["export", str(root), str(tmp_path / f"out{step}"), "--step", "best"]
            )
            if step < 4:
                assert best.exit_code == 1, best.output
                assert "no checkpoint has recorded it yet" in best.output
                assert "--metric" not in best.output
            else:
                assert best.exit_code == 0, best.output
                assert f"exported step {4 if step < 8 else 8}" in best.output
    run = cw.open_run(root)
    assert all("policy" in run.manifest(s).extra for s in run.steps())
