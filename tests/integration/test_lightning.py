"""The Lightning callback with a real ``Trainer.fit``: policy-driven saves, validation-driven
saves, and an exact resume after kill -9 (RNG and data position included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning_train import Tiny, loaders, run
from safetensors.torch import load_file

import ckptwise as cw
from ckptwise.integrations.lightning import CheckpointCallback

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("lightning_train.py")
#: what a run folder holds (docs/FORMAT.md); anything else was left behind by someone
RUN_FILES = {"ckptwise.lock", "run.json", "checkpoints", "objects", "pins", "pruning", "branches"}


def test_saves_follow_the_policy_and_retention(tmp_path: Path) -> None:
    callback = run(
        str(tmp_path / "run"), 20, save=cw.every(7) | cw.on_final(), keep=cw.keep_last(2)
    )
    assert [s for s, _ in callback.saved] == [7, 14, 20]
    assert callback.saved[-1][1] == ("final",)
    assert [c.step for c in callback.manager.run.checkpoints()] == [14, 20]
    data = callback.manager.run.load(20)["data"]
    assert (data["epoch"], data["offset"]) == (1, 7 * 8)  # 13 batches fill epoch 0 (100 = 12*8+4)


def test_validation_metrics_of_the_step_drive_on_improvement(tmp_path: Path) -> None:
    callback = run(
        str(tmp_path / "run"),
        30,
        save=cw.on_improvement("val_loss"),
        keep=cw.keep_all(),
        val_every=5,
        final=False,
    )
    saved = [s for s, _ in callback.saved]
    assert saved
    assert set(saved) <= {5, 10, 15, 20, 25, 30}
    values = [c.metrics["val_loss"] for c in callback.manager.run.checkpoints()]
    assert values == sorted(values, reverse=True)  # each save improved on the one before
    assert saved[0] == 5


def test_the_last_step_is_saved_unless_final_is_false(tmp_path: Path) -> None:
    """As the README's example: every(7) over 30 steps ends with 28 and 30, not 21 and 28."""
    callback = run(str(tmp_path / "a"), 30, save=cw.every(7), keep=cw.keep_last(2))
    assert [s for s, _ in callback.saved] == [7, 14, 21, 28, 30]
    assert callback.saved[-1][1] == ("final",)
    assert [c.step for c in callback.manager.run.checkpoints()] == [28, 30]
    resumed = callback.manager.run.load(30)["lightning"]
    assert resumed["global_step"] == 30

    callback = run(str(tmp_path / "b"), 30, save=cw.every(7), keep=cw.keep_last(2), final=False)
    assert [c.step for c in callback.manager.run.checkpoints()] == [21, 28]

    # resumed at its last step and trained no further: nothing new to save
    callback = run(str(tmp_path / "a"), 30, save=cw.every(7), keep=cw.keep_last(2), resume=True)
    assert callback.saved == []


def test_best_model_score_path_and_export_like_model_checkpoint(tmp_path: Path) -> None:
    callback = run(
        str(tmp_path / "run"), 20, save=cw.every(5), keep=cw.keep_all(), monitor="val_loss"
    )
    values = {c.step: c.metrics["val_loss"] for c in callback.manager.run.checkpoints()}
    best = min(values, key=values.__getitem__)
    assert callback.best_model_score == values[best]
    assert callback.best_model_path == str(tmp_path / "run" / "checkpoints" / f"{best:012d}.json")
    assert Path(callback.best_model_path).is_file()

    saved = callback.manager.run.load(best)["lightning"]["state_dict"]
    weights = load_file(callback.export_best(tmp_path / "best"))
    assert weights.keys() == Tiny().state_dict().keys()
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor), name
    model = Tiny.load_from_checkpoint(callback.export_best(tmp_path / "ckpt", format="ckpt"))
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # another recorded metric, ranked the other way
    losses = {c.step: c.metrics["loss"] for c in callback.manager.run.checkpoints()}
    worst = max(losses, key=losses.__getitem__)
    path = callback.export_best(tmp_path / "worst", metric="loss", mode="max", format="ckpt")
    assert path.name == f"step-{worst}.ckpt"


def test_the_best_metric_comes_from_the_policy_or_is_missing_clearly(tmp_path: Path) -> None:
    keep = cw.keep_last(1) | cw.keep_best(1, "val_loss")
    callback = CheckpointCallback(tmp_path / "a", save=cw.every(5), keep=keep)
    assert callback.best == ("val_loss", "min")
    assert callback.best_model_score is None  # nothing saved yet
    assert callback.best_model_path == ""
    callback.manager.close()

    callback = CheckpointCallback(tmp_path / "b", save=cw.every(5))
    assert callback.best is None
    assert callback.best_model_score is None
    with pytest.raises(cw.ConfigError, match="monitor="):
        callback.export_best(tmp_path / "out")
    callback.manager.close()
    with pytest.raises(cw.ConfigError, match="needs the metric"):
        CheckpointCallback(tmp_path / "c", save=cw.every(5), mode="max")


def test_fit_releases_the_run_and_a_new_callback_in_the_same_process_works(
    tmp_path: Path,
) -> None:
    root = str(tmp_path / "run")
    first = run(root, 10)
    cw.CheckpointManager(root, save=cw.every(1)).close()  # fit's end released the lock
    idle = CheckpointCallback(root, save=cw.every(5))  # created, never used: holds the lock
    second = run(root, 20, resume=True)  # while both earlier callbacks are alive
    assert [s for s, _ in second.saved] == [15, 20]
    first.manager.run.refresh()  # closed, it still reads (what it listed last, until refreshed)
    assert [c.step for c in first.manager.run.checkpoints()] == [15, 20]
    with pytest.raises(cw.CheckpointError, match="closed"):
        idle.manager.save(99, {})
    assert set(os.listdir(root)) <= RUN_FILES


def test_lightning_checkpointing_or_a_counting_sampler_is_refused(tmp_path: Path) -> None:
    callback = CheckpointCallback(tmp_path / "a", save=cw.every(5))
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    train, val = loaders()
    with pytest.raises(cw.ConfigError, match="enable_checkpointing=False"):
        trainer.fit(Tiny(), train, val)
    cw.CheckpointManager(tmp_path / "a", save=cw.every(1)).close()  # the failed fit let go

    callback = CheckpointCallback(tmp_path / "b", save=cw.every(5))
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    train.sampler.auto_advance = True  # type: ignore[attr-defined]
    with pytest.raises(cw.ConfigError, match="auto_advance=False"):
        trainer.fit(Tiny(), train, val)


def losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def test_kill_9_then_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "a"), "--losses", str(tmp_path / "a.l")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    victim = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path / "b"),
            "--losses",
            str(tmp_path / "b.l"),
            "--step-sleep",
            "0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest = tmp_path / "b" / "checkpoints" / "000000000015.json"
    deadline = time.monotonic() + 240
    while not manifest.exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.15)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    resumed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path / "b"),
            "--losses",
            str(tmp_path / "b.l"),
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Restored all states" in resumed.stderr + resumed.stdout
    a, b = losses(tmp_path / "a.l"), losses(tmp_path / "b.l")
    assert sorted(a) == list(range(1, 41))
    assert a == b
    assert set(os.listdir(tmp_path / "b")) <= RUN_FILES


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_several_processes_under_torchrun_resume_each_rank_exactly(
    tmp_path: Path, strategy: str
) -> None:
    """``ddp``, and FSDP2 through ``ModelParallelStrategy`` (each rank's shards saved as its
    own entries, the run resumed from them with every rank's losses bit-identical)."""

    def torchrun(run_dir: Path, losses: Path, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(SCRIPT), str(run_dir), f"--{strategy}", "--losses", str(losses), *args],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    def read(path: Path) -> dict[int, str]:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return {d["step"]: d["loss"] for d in lines}

    torchrun(tmp_path / "a", tmp_path / "a.jsonl", "--steps", "20")
    torchrun(tmp_path / "b", tmp_path / "b.jsonl", "--steps", "12", "--no-final")  # 5, 10
    manifest = cw.open_run(tmp_path / "b").manifest(10)
    assert manifest.world_size == 2
    sharded = [entry for entry in manifest.entries() if getattr(entry, "shard", None)]
    assert bool(sharded) == (strategy == "fsdp")
    torchrun(tmp_path / "b", tmp_path / "b.jsonl", "--steps", "20", "--resume")
    for rank in (0, 1):
        straight = read(tmp_path / f"a.jsonl.rank{rank}")
        resumed = read(tmp_path / f"b.jsonl.rank{rank}")  # steps 11 and 12 run twice
        assert straight == resumed, rank
    # the ranks saw different data, and each resumed its own position in it
    assert read(tmp_path / "a.jsonl.rank0") != read(tmp_path / "a.jsonl.rank1")


@pytest.mark.slow  # 30 s to a minute: four DDP jobs of 14 steps, on one rank and on two
def test_ddp_resumes_on_another_number_of_ranks_exactly(tmp_path: Path) -> None:
    """2 ranks → 1 and 1 → 2 through ``resume_checkpoint()``.

    Every rank trains on the same batches (``--same-data``) and every rank's torch RNG is
    seeded alike, so dropout masks are alike too: the averaged gradient is each rank's own,
    exactly, and the run trains bit-identically on one rank or two (checked first). A
    resume on the other number must then match the uninterrupted run on that number bit for
    bit: every rank restores the saved weights and optimizer state exactly, and the rank
    that did not exist takes rank 0's torch RNG (alike on every rank then and now) while
    keeping its own numpy and Python generators (never seeded, they differ per process).
    """

    def torchrun(ranks: int, run_dir: Path, name: str, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(ranks), str(SCRIPT), str(run_dir), "--ddp", "--same-data", "--steps", "14",
             "--losses", str(tmp_path / name), "--dump", str(tmp_path / f"{name}.state"),
             *args],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    def read(name: str) -> dict[int, str]:
        return losses(tmp_path / name)

    def restored(name: str) -> Any:
        return json.loads((tmp_path / name).read_text())

    def saved(run_dir: Path) -> dict[str, Any]:
        values = cw.open_run(run_dir).load(10)["lightning"]
        weights = {k: v.tolist() for k, v in values["state_dict"].items()}
        (opt,) = values["optimizer_states"]
        moments = {f"{i}/{k}": v.tolist() for i, s in opt["state"].items() for k, v in s.items()}
        return {"weights": weights, "moments": moments}

    torchrun(2, tmp_path / "two", "s2")  # saves steps 5, 10 and 14
    torchrun(1, tmp_path / "one", "s1")
    resume = ("--resume", "--resume-step", "10")
    fewer = torchrun(1, tmp_path / "two", "r21", *resume)
    more = torchrun(2, tmp_path / "one", "r12", *resume)
    straight = read("s1.rank0")
    assert sorted(straight) == list(range(1, 15))
    assert read("s2.rank0") == read("s2.rank1") == straight
    after = {step: loss for step, loss in straight.items() if step > 10}
    assert restored("r21.state.rank0") == saved(tmp_path / "two")
    assert read("r21.rank0") == after
    assert "saved by 2 process(es) and is restored on 1; rank 0 restores its own state" in fewer
    for rank in (0, 1):
        assert restored(f"r12.state.rank{rank}") == saved(tmp_path / "one")
        assert read(f"r12.rank{rank}") == after
    assert "rank 1 did not exist then" in more
    assert "it keeps its own RNG states (numpy, python)" in more


def test_a_policy_file_sets_the_managers_options_too(tmp_path: Path) -> None:
    config = {"save": {"every": 5}, "keep": {"last": 2}, "codec": "zstd", "rng": False}
    callback = CheckpointCallback(tmp_path / "run", config=config)
    callback.manager.save(1, {"w": torch.zeros(4096)})
    callback.manager.close()
    manifest = cw.open_run(tmp_path / "run").manifest(1)
    assert manifest.tensors["w"].codec == "zstd"  # "auto" would store a first save raw
    assert "__rng__" not in (manifest.tree or {})
