"""``ckptwise simulate``, ``pin`` and ``unpin`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptwise as cw
from ckptwise.cli.main import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_minicpm_v_like_trainer_schedule(tmp_path: Path) -> None:
    """`--save_steps 1000 --save_total_limit 10` over 10 000 steps with 22 GB checkpoints."""
    plot = tmp_path / "timeline.png"
    args = [
        "simulate",
        "--save-steps",
        "1000",
        "--save-total-limit",
        "10",
        "--steps",
        "10000",
        "--checkpoint-bytes",
        "22GB",
        "--save-cost",
        "5m",
        "--step-time",
        "6s",
        "--mtbf",
        "1d",
        "--plot",
        str(plot),
    ]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "10 saves over 10000 steps" in text.output
    assert "step     1000  every(1000)" in text.output
    assert "204.9 GiB" in text.output  # 10 x 22 GB written
    assert plot.read_bytes()[:8] == PNG_MAGIC

    as_json = CliRunner().invoke(cli, [*args, "--json"])
    doc = json.loads(as_json.output)
    assert [s["step"] for s in doc["saves"]] == list(range(1000, 10_001, 1000))
    assert doc["bytes_written"] == 220 * 10**9
    assert doc["peak_bytes_on_disk"] == 220 * 10**9
    assert sorted(map(int, doc["kept"])) == list(range(1000, 10_001, 1000))
    assert doc["policy"] == {
        "save": {"every": {"interval": 1000, "start": 0}, "final": True},
        "keep": {"last": 10},
    }
    assert doc["save_seconds"] == 10 * 300
    assert 0 < doc["expected_failures"] < 1


def test_policy_file_and_metrics_trace(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "save:\n  every: 500\n  start: 1000\n  on_improvement: {metric: eval_loss}\n"
        "keep:\n  last: 2\n  best: eval_loss\n"
    )
    trace = tmp_path / "trace.csv"
    trace.write_text("step,eval_loss\n250,1.0\n750,0.5\n1250,0.7\n")
    result = CliRunner().invoke(
        cli,
        ["simulate", "--config", str(policy), "--steps", "2000", "--metrics", str(trace), "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [s["step"] for s in doc["saves"]] == [250, 750, 1000, 1500, 2000]
    assert sorted(map(int, doc["kept"])) == [750, 1500, 2000]


def test_one_line_policies_and_bad_input(tmp_path: Path) -> None:
    ok = CliRunner().invoke(
        cli,
        ["simulate", "--save", "geometric(100, 2, 5000)", "--keep", "last(3)", "--steps", "20000"],
    )
    assert ok.exit_code == 0, ok.output
    assert "9 saves over 20000 steps" in ok.output
    bad = CliRunner().invoke(cli, ["simulate", "--save", "evry(10)", "--steps", "10"])
    assert bad.exit_code == 2
    assert "unknown policy 'evry'" in bad.output
    none = CliRunner().invoke(cli, ["simulate", "--steps", "10"])
    assert none.exit_code == 2
    assert "give a save policy" in none.output
    size = CliRunner().invoke(
        cli, ["simulate", "--save-steps", "5", "--steps", "10", "--checkpoint-bytes", "lots"]
    )
    assert size.exit_code == 2
    assert "not a size" in size.output


def test_pin_and_unpin_from_the_command_line(run_dir: Path) -> None:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_last(1)) as manager:
        manager.step(1, {"w": torch.zeros(2)})
        manager.wait()  # a step can be pinned once committed
        assert CliRunner().invoke(cli, ["pin", str(run_dir), "1"]).exit_code == 0
        manager.step(2, {"w": torch.ones(2)})  # the writer re-reads pins before pruning
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [1, 2]
        missing = CliRunner().invoke(cli, ["pin", str(run_dir), "9"])
        assert missing.exit_code == 1
        assert "no committed checkpoint at step 9" in missing.output
        assert CliRunner().invoke(cli, ["unpin", str(run_dir), "1"]).exit_code == 0
        assert CliRunner().invoke(cli, ["unpin", str(run_dir), "1"]).exit_code == 1
        manager.step(3, {"w": torch.full((2,), 3.0)})
        manager.wait()
        assert [c.step for c in manager.run.checkpoints()] == [3]


def test_save_steps_saves_the_last_step_as_trainer_does(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["simulate", "--save-steps", "4", "--save-total-limit", "2", "--steps", "10", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(s["step"], s["reasons"]) for s in doc["saves"]] == [
        (4, ["every(4)"]),
        (8, ["every(4)"]),
        (10, ["final"]),
    ]
    assert sorted(map(int, doc["kept"])) == [8, 10]
    assert doc["warnings"] == []


def test_a_metric_trigger_without_metrics_can_never_fire(tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(
        "save:\n  on_improvement: {metric: eval_loss}\nkeep:\n  best: {n: 1, metric: eval_loss}\n"
    )
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), "--steps", "20"])
    assert result.exit_code == 0, result.output
    assert "on_improvement(eval_loss) can never fire: no --metrics trace reports 'eval_loss'" in (
        result.stderr
    )
    assert "keep_best(1, eval_loss) keeps nothing" in result.stderr
    assert "0 saves over 20 steps" in result.stdout
    trace = tmp_path / "metrics.csv"
    trace.write_text("step,loss\n5,0.5\n10,0.4\n")
    other = CliRunner().invoke(
        cli,
        ["simulate", "--config", str(config), "--steps", "20", "--metrics", str(trace), "--json"],
    )
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["warnings"] == [
        "on_improvement(eval_loss) can never fire: the --metrics CSV has no 'eval_loss' column",
        "keep_best(1, eval_loss) keeps nothing: the --metrics CSV has no 'eval_loss' column",
    ]
    trace.write_text("step,eval_loss\n5,0.5\n10,0.4\n")
    fires = CliRunner().invoke(
        cli, ["simulate", "--config", str(config), "--steps", "20", "--metrics", str(trace)]
    )
    assert fires.stderr == ""
    assert "2 saves over 20 steps" in fires.stdout


def test_lost_work_is_at_most_the_length_of_the_run() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--save-steps", "5", "--steps", "12"])
    assert result.exit_code == 0, result.output
    assert "expected work lost per failure: 36.7 s (~4 steps)" in result.output


def test_a_zero_mtbf_is_a_usage_error() -> None:
    result = CliRunner().invoke(
        cli, ["simulate", "--save-steps", "5", "--steps", "12", "--mtbf", "0s"]
    )
    assert result.exit_code == 2, result.output
    assert "--mtbf" in result.output
    assert "longer than 0" in result.output


def test_a_metrics_csv_may_have_blank_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    """As spreadsheets and hand edits leave them: a UTF-8 BOM, a blank line, a last newline."""
    trace = tmp_path / "trace.csv"
    trace.write_bytes(b"\xef\xbb\xbfstep,eval_loss\r\n5,0.5\r\n\r\n10,0.4\r\n\r\n")
    args = ["simulate", "--save", "on_improvement(eval_loss)", "--steps", "12", "--json"]
    result = CliRunner().invoke(cli, [*args, "--metrics", str(trace)])
    assert result.exit_code == 0, result.output
    assert [s["step"] for s in json.loads(result.stdout)["saves"]] == [5, 10]


def test_a_run_that_never_saves_says_it_keeps_nothing() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--save", "every(100)", "--steps", "12"])
    assert result.exit_code == 0, result.output
    assert "0 saves over 12 steps:\nkept at the end: nothing\n" in result.output


def test_a_bad_option_value_is_named_once() -> None:
    result = CliRunner().invoke(
        cli, ["simulate", "--save-steps", "5", "--steps", "12", "--step-time", "-1s"]
    )
    assert result.exit_code == 2
    assert "--step-time: '-1s' is not a duration" in result.output
    assert result.output.count("--step-time") == 1, result.output


def test_a_bad_save_flag_gets_an_example_in_the_flag_s_own_spelling() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--steps", "100", "--save", "every(-5)"])
    assert result.exit_code == 2
    assert "save.every.interval: -5 is not a positive integer; e.g. every(1000)" in result.output
    assert "Invalid value for --save:" in result.output
    assert "cw." not in result.output


@pytest.mark.parametrize(
    ("args", "named", "example"),
    [
        (["--save", "every(5)", "--keep", "lst(2)"], "--keep", "did you mean 'last'?"),
        (["--save-steps", "0"], "--save-steps", "e.g. --save-steps 1000"),
        (["--save-steps", "5", "--save-total-limit", "0"], "--save-total-limit", "e.g. "),
    ],
)
def test_each_bad_policy_option_is_named_with_an_example_in_its_own_spelling(
    args: list[str], named: str, example: str
) -> None:
    result = CliRunner().invoke(cli, ["simulate", "--steps", "100", *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {named}:" in result.output
    assert example in result.output
    assert "cw." not in result.output


def test_the_times_it_assumes_are_said_until_given() -> None:
    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["simulate", "--save", "every(5)", "--steps", "20", *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert "(times assume 1s per step (--step-time) and 30s per save (--save-cost)" in run()
    assert "(times assume 1s per step (--step-time): " in run("--save-cost", "2s")
    assert "times assume" not in run("--save-cost", "2s", "--step-time", "1s")
    doc = json.loads(run("--json", "--step-time", "3s"))
    assert doc["assumed"] == ["30s per save (--save-cost)"]
