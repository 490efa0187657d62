"""``ckptwise show``, ``du``, ``diff`` and ``export`` on a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckptwise as cw
from ckptwise.cli.main import cli
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store.commit import Committer


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Three checkpoints: a frozen tensor, a changing one, and an eval metric."""
    root = tmp_path / "run"
    frozen = torch.randn(256, 256)
    with cw.CheckpointManager(root, save=cw.every(1), codec="bytegroup", rng=False) as manager:
        for step, loss in ((1, 0.9), (2, 0.5), (3, 0.7)):
            head = torch.full((64, 64), float(step)).to(torch.bfloat16)
            manager.step(
                step,
                {"model": {"frozen": frozen, "head": head}, "epoch": step},
                metrics={"eval_loss": loss},
            )
    return root


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_show_lists_codec_and_where_each_object_was_stored(run: Path) -> None:
    doc = json.loads(invoke("show", str(run), "--step", "3", "--json"))
    rows = {r["name"]: r for r in doc["tensors"]}
    assert rows["model/frozen"]["stored_by_step"] == 1
    assert rows["model/head"]["stored_by_step"] == 3
    assert rows["model/head"]["codec"] == "bytegroup"
    assert rows["model/frozen"]["stored_bytes"] < rows["model/frozen"]["bytes"]
    assert "model/frozen" in invoke("show", str(run))


def test_du_splits_dedup_from_compression(run: Path) -> None:
    doc = json.loads(invoke("du", str(run), "--json"))
    total = doc["total"]
    frozen, head = 256 * 256 * 4, 64 * 64 * 2
    assert total["logical_bytes"] == 3 * (frozen + head)
    assert total["unique_bytes"] == frozen + 3 * head
    assert total["saved_by_dedup"] == 2 * frozen
    assert total["saved_by_compression"] == total["unique_bytes"] - total["physical_bytes"] > 0
    first, last = doc["checkpoints"][0], doc["checkpoints"][-1]
    assert first["shared_bytes"] > 0
    assert last["exclusive_bytes"] < 2 * head
    assert "after dedup" in invoke("du", str(run))


def test_diff_names_changed_tensors_and_how_much(run: Path) -> None:
    doc = json.loads(invoke("diff", str(run), "1", "2", "--json"))
    rows = {r["name"]: r for r in doc["tensors"]}
    assert rows["model/frozen"]["status"] == "same"
    head = rows["model/head"]
    assert head["status"] == "changed"
    assert head["changed_elements"] == head["elements"] == 64 * 64
    assert head["max_abs_change"] == pytest.approx(1.0)
    assert head["relative_change"] == pytest.approx(1.0)
    text = invoke("diff", str(run), "1", "3")
    assert "changed  model/head" in text
    assert "1 changed, 1 same" in text


def test_export_best_latest_and_step(run: Path, tmp_path: Path) -> None:
    out = invoke(
        "export", str(run), str(tmp_path / "best"), "--step", "best", "--metric", "eval_loss"
    )
    assert "exported step 2" in out
    weights = load_file(str(tmp_path / "best" / "model.safetensors"))
    assert torch.equal(weights["head"], torch.full((64, 64), 2.0).to(torch.bfloat16))
    invoke("export", str(run), str(tmp_path / "latest"))
    assert load_file(str(tmp_path / "latest" / "model.safetensors"))["head"][0, 0].item() == 3.0
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.json").write_text('{"model_type": "x"}')
    invoke(
        "export",
        str(run),
        str(tmp_path / "hf"),
        "--step",
        "1",
        "--format",
        "hf",
        "--config-from",
        str(config),
    )
    assert (tmp_path / "hf" / "config.json").exists()
    bad = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "x"), "--step", "best"])
    assert bad.exit_code == 2
    assert "--metric" in bad.output


def test_archive_reports_what_it_quantized(tmp_path: Path) -> None:
    root = tmp_path / "run"
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    with cw.CheckpointManager(root, save=cw.every(1)) as manager:
        manager.step(1, {"model": model, "optimizer": opt})
    out = invoke("archive", str(root), str(tmp_path / "archive"))
    assert "optimizer/state/0/exp_avg: lossy q8: max abs error" in out
    assert "archived step 1" in out
    assert "verified 1 checkpoint(s)" in invoke("verify", str(tmp_path / "archive"))


def _ranked_run(root: Path, save: cw.Trigger, keep: cw.RetentionPolicy) -> Path:
    """Accuracy peaks at step 2 (max), loss bottoms out at step 3 (min)."""
    with cw.CheckpointManager(root, save=save, keep=keep) as manager:
        for step, acc, loss in ((1, 0.5, 0.9), (2, 0.9, 0.6), (3, 0.7, 0.3), (4, 0.6, 0.4)):
            manager.step(
                step,
                {"model": {"w": torch.full((4,), float(step))}},
                metrics={"eval_acc": acc, "eval_loss": loss},
            )
    return root


def _exported_step(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["step"], result.stderr


@pytest.mark.parametrize(
    ("save", "keep", "best"),
    [
        (cw.every(1), cw.keep_best(2, "eval_acc", mode="max"), 2),
        (cw.every(1), cw.keep_best(2, "eval_loss"), 3),
        (cw.on_improvement("eval_acc", mode="max") | cw.every(4), cw.keep_all(), 2),
        (cw.on_improvement("eval_loss") | cw.every(4), cw.keep_all(), 3),
    ],
)
def test_export_best_ranks_by_the_runs_own_policy(
    tmp_path: Path, save: cw.Trigger, keep: cw.RetentionPolicy, best: int
) -> None:
    root = _ranked_run(tmp_path / "run", save, keep)
    step, warned = _exported_step(str(root), str(tmp_path / "out"), "--step", "best")
    assert step == best
    assert warned == ""
    # an explicit --metric and --mode still win
    step, _ = _exported_step(
        str(root), str(tmp_path / "o2"), "--step", "best", "--metric", "eval_loss", "--mode", "max"
    )
    infos = cw.open_run(root).checkpoints()
    assert step == max(infos, key=lambda info: info.metrics["eval_loss"]).step


def test_export_best_says_when_the_direction_is_a_guess(tmp_path: Path) -> None:
    # keep_best(2) of two checkpoints in a run written before runs recorded their policy:
    # nothing tells whether lower or higher is better
    store = CheckpointStore(LocalBackend(tmp_path / "run"))
    for step, acc in ((1, 0.2), (2, 0.8)):
        store.commit(
            step,
            {"model/w": torch.zeros(2)},
            tree={
                "model": {
                    "kind": "value",
                    "value": {"w": {"__ckptwise__": "tensor", "name": "model/w"}},
                }
            },
            metrics={"eval_acc": acc},
            reasons=("every(1)",),
        )
    store.record_kept({1: ["best 2 eval_acc"], 2: ["best 2 eval_acc", "newest"]})
    step, warned = _exported_step(str(tmp_path / "run"), str(tmp_path / "out"), "--step", "best")
    assert step == 1
    assert "does not record whether lower or higher is better" in warned
    assert "pass --mode max" in warned
    # a manager records its policy now: the same run written by one is ranked as it said
    with cw.CheckpointManager(
        tmp_path / "new", save=cw.every(1), keep=cw.keep_best(2, "eval_acc", mode="max")
    ) as manager:
        for step, acc in ((1, 0.2), (2, 0.8)):
            manager.step(step, {"model": {"w": torch.zeros(2)}}, metrics={"eval_acc": acc})
    step, warned = _exported_step(str(tmp_path / "new"), str(tmp_path / "out2"), "--step", "best")
    assert step == 2
    assert warned == ""


def test_a_misspelt_metric_lists_what_the_run_recorded(run: Path, tmp_path: Path) -> None:
    bad = CliRunner().invoke(
        cli, ["export", str(run), str(tmp_path / "x"), "--step", "best", "--metric", "eval_los"]
    )
    assert bad.exit_code == 2
    assert "no checkpoint recorded the metric 'eval_los'" in bad.stderr
    assert "the run recorded: eval_loss" in bad.stderr
    assert "did you mean 'eval_loss'?" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_export_hf_warns_when_the_folder_cannot_load(run: Path, tmp_path: Path) -> None:
    """A checkpoint that records no model (a plain loop's, or a Trainer's saved before
    ckptwise recorded it): each warning names its fix."""
    bare = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "hf"), "--format", "hf"])
    assert bare.exit_code == 0, bare.output
    assert "has no config.json (no --config-from, and step 3 records no model config" in bare.stderr
    assert "from_pretrained cannot load it; pass --config-from MODEL_DIR" in bare.stderr
    # bf16 and fp32 as stored, which from_pretrained would cast to one dtype
    assert "bfloat16 (1 tensors), float32 (1 tensors)" in bare.stderr
    assert "pass --dtype bf16 (or fp16, fp32)" in bare.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()
    empty = tmp_path / "no_config"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}")
    args = ["export", str(run), str(tmp_path / "hf2"), "--dtype", "bf16", "--config-from"]
    partial = CliRunner().invoke(cli, [*args, str(empty)])
    assert f"{empty} has no config.json" in partial.stderr
    assert (tmp_path / "hf2" / "tokenizer.json").exists()
    (empty / "config.json").write_text('{"model_type": "x", "torch_dtype": "float32"}')
    whole = CliRunner().invoke(cli, [*args, str(empty)])
    assert whole.exit_code == 0
    assert whole.stderr == ""
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config == {"model_type": "x", "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    weights = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_du_shows_what_a_failed_save_left_until_the_next_writer_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    with cw.CheckpointManager(root, save=cw.every(1), rng=False, async_save=False) as manager:
        manager.step(1, {"w": torch.zeros(1000)})

        def full_disk(committer: Committer, manifest: object) -> None:
            raise OSError(28, "No space left on device (injected)")

        with monkeypatch.context() as patch:
            patch.setattr(Committer, "publish", full_disk)
            with pytest.raises(cw.CheckpointError):  # its objects were written, not its manifest
                manager.step(2, {"w": torch.randn(100_000)})
    doc = json.loads(invoke("du", str(root), "--json"))["total"]
    assert doc["unreferenced_objects"] == 1
    assert doc["unreferenced_bytes"] > 100_000  # random floats barely compress
    assert "object(s) no checkpoint names" in invoke("du", str(root))
    with cw.CheckpointManager(root, save=cw.every(1)):  # the next writer collects them
        pass
    doc = json.loads(invoke("du", str(root), "--json"))["total"]
    assert (doc["unreferenced_objects"], doc["unreferenced_bytes"]) == (0, 0)
    assert "no checkpoint names" not in invoke("du", str(root))
