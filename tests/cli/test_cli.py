"""``ckptwise ls`` and ``ckptwise verify``, in-process and as a real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli
from ckptwise.store.layout import object_path


def make_run(run_dir: Path) -> None:
    save = cw.every(2) | cw.on_improvement("eval_loss")
    with cw.CheckpointManager(run_dir, save=save, keep=cw.keep_last(2)) as manager:
        for step in range(1, 7):
            metrics = {"eval_loss": 1.0 / step} if step == 3 else {}
            manager.step(step, {"w": torch.full((64,), float(step))}, metrics=metrics)


def test_ls_json_lists_steps_reasons_metrics_and_why_kept(run_dir: Path) -> None:
    make_run(run_dir)
    result = CliRunner().invoke(cli, ["ls", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    rows = {row["step"]: row for row in doc["checkpoints"]}
    assert sorted(rows) == [4, 6]
    assert rows[6]["reasons"] == ["every(2)"]
    assert rows[6]["kept_because"] == ["last 2", "newest"]
    assert rows[4]["logical_bytes"] == 64 * 4 + rows[4]["logical_bytes"] - 256
    assert doc["physical_bytes"] > 0


def test_ls_table_mentions_every_checkpoint(run_dir: Path) -> None:
    make_run(run_dir)
    result = CliRunner().invoke(cli, ["ls", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "every(2)" in result.output
    assert "newest" in result.output


def test_verify_exit_codes_and_names_the_broken_tensor(run_dir: Path) -> None:
    make_run(run_dir)
    ok = CliRunner().invoke(cli, ["verify", str(run_dir)])
    assert ok.exit_code == 0
    assert "verified 2 checkpoint(s)" in ok.output
    oid = cw.open_run(run_dir).manifest(6).tensors["w"].object
    path = run_dir / object_path(oid)
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    bad = CliRunner().invoke(cli, ["verify", str(run_dir), "--json"])
    assert bad.exit_code == 1
    doc = json.loads(bad.output)
    assert doc["ok"] is False
    assert [(p["step"], p["tensor"]) for p in doc["problems"]] == [(6, "w")]
    only4 = CliRunner().invoke(cli, ["verify", str(run_dir), "--step", "4"])
    assert only4.exit_code == 0


def test_console_script_runs_as_a_module(run_dir: Path) -> None:
    make_run(run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptwise", "verify", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_an_empty_run_lists_nothing_but_its_verify_is_no_pass(tmp_path: Path) -> None:
    cw.CheckpointManager(tmp_path / "empty", save=cw.every(5)).close()  # a run never saved
    empty = CliRunner().invoke(cli, ["ls", str(tmp_path / "empty"), "--json"])
    assert empty.exit_code == 0
    assert json.loads(empty.output)["checkpoints"] == []
    verify = CliRunner().invoke(cli, ["verify", str(tmp_path / "empty")])
    assert verify.exit_code == 1
    assert "has no committed checkpoint to verify: nothing was checked" in verify.output
    assert "ok" not in verify.output
    as_json = CliRunner().invoke(cli, ["verify", str(tmp_path / "empty"), "--json"])
    assert as_json.exit_code == 1
    doc = json.loads(as_json.stdout)
    assert (doc["ok"], doc["checked_steps"]) == (False, [])
    assert "nothing was checked" in doc["error"]
