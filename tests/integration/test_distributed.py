"""Multi-process runs with real ``torchrun`` processes on gloo: DDP and FSDP2.

Each test launches ``dist_train.py`` (2 or 4 ranks on the CPU) and checks what every rank
recorded and what the run folder holds: one decision for all ranks even when their clocks
disagree, bit-exact resume, sharded save and restore on another number of ranks (DDP and
FSDP2, 2 → 1 and 1 → 2, against an uninterrupted run on the new number; FSDP2 4 → 2 and on
one process), and a rank that dies or raises in the middle of a save.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptwise as cw
from torchrun_job import run_job

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("dist_train.py")


def torchrun(ranks: int, run: Path, out: Path, *args: str, ok: bool = True) -> float:
    """Run the job on ``ranks`` processes; returns its wall time in seconds."""
    started = time.monotonic()
    run_job(SCRIPT, str(run), str(out), *args, ranks=ranks, ok=ok)
    return time.monotonic() - started


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_ddp_ranks_agree_though_their_clocks_differ_and_resume_exactly(tmp_path: Path) -> None:
    # synchronous saves: the preemption after step 12 finds step 10 committed
    policy = ("--save", "every(5) | every_duration(4s)", "--skew", "1.0", "--steps", "16", "--sync")
    torchrun(2, tmp_path / "run", tmp_path / "a", *policy, "--stop-at", "12")
    first = records(tmp_path / "a")
    # rank 1's clock runs twice as fast: deciding alone it would save at other steps and
    # hang in the save's collectives; rank 0 decides for both
    assert first[0]["saves"] == first[1]["saves"]
    assert [s for s, _ in first[0]["saves"]] == [4, 5, 9, 10]
    run = cw.open_run(tmp_path / "run")
    assert run.steps() == [5, 9, 10]  # keep last 3
    assert run.manifest(10).world_size == 2
    assert run.verify() == []

    torchrun(2, tmp_path / "run", tmp_path / "b", *policy)
    resumed = records(tmp_path / "b")
    assert [r["restored"] for r in resumed] == [10, 10]
    assert resumed[0]["latest"] == 15
    torchrun(2, tmp_path / "straight", tmp_path / "c", *policy)
    straight = records(tmp_path / "c")
    for rank in (0, 1):
        assert resumed[rank]["saves"] == [s for s in straight[rank]["saves"] if s[0] > 10]
        for step, loss in resumed[rank]["losses"].items():
            assert loss == straight[rank]["losses"][step], (rank, step)
        for step, loss in first[rank]["losses"].items():
            assert loss == straight[rank]["losses"][step], (rank, step)
    usage = cw.open_run(tmp_path / "straight").usage()
    # replicated weights and optimizer state are written once, not once per rank, and the
    # frozen first layer only by the first save
    frozen = (24 * 40 + 40) * 4
    assert all(c.written_bytes < c.logical_bytes - frozen for c in usage.checkpoints[1:])


def test_fsdp_shards_resume_exactly_on_the_same_ranks(tmp_path: Path) -> None:
    policy = ("--mode", "fsdp", "--save", "every(3)", "--steps", "9", "--sync")
    torchrun(2, tmp_path / "run", tmp_path / "a", *policy, "--stop-at", "7")
    run = cw.open_run(tmp_path / "run")
    manifest = run.manifest(6)
    shards = [e.shard for e in manifest.tensors.values() if e.shard is not None]
    assert shards, "FSDP2 parameters are saved as each rank's chunk"
    assert manifest.ranks[0].tensors, "rank 1 saved its own chunks"
    torchrun(2, tmp_path / "run", tmp_path / "b", *policy)
    torchrun(2, tmp_path / "straight", tmp_path / "c", *policy)
    resumed, straight = records(tmp_path / "b"), records(tmp_path / "c")
    assert [r["restored"] for r in resumed] == [6, 6]
    for rank in (0, 1):
        for step, loss in resumed[rank]["losses"].items():
            assert loss == straight[rank]["losses"][step], (rank, step)


def test_fsdp_in_a_world_of_one_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 1`` of an FSDP2 script: a world of one is a world. Its
    DTensors hold all their values on the one rank: they are saved as plain tensors (in the
    background, the one-process default) and restored into the DTensors in place."""
    policy = ("--mode", "fsdp", "--save", "every(3)", "--steps", "9")
    torchrun(1, tmp_path / "run", tmp_path / "a", *policy, "--stop-at", "7")
    run = cw.open_run(tmp_path / "run")
    # killed after step 7 as a preemption would: step 6's background save may not have
    # committed, and then the run resumes from step 3
    assert run.steps() in ([3], [3, 6])
    assert run.verify() == []
    assert run.manifest(run.steps()[-1]).world_size == 1
    torchrun(1, tmp_path / "run", tmp_path / "b", *policy)
    torchrun(1, tmp_path / "straight", tmp_path / "c", *policy)
    (resumed,), (straight,) = records(tmp_path / "b"), records(tmp_path / "c")
    assert resumed["restored"] == run.steps()[-1]
    assert not resumed["errors"]
    assert resumed["losses"]
    for step, loss in resumed["losses"].items():
        assert loss == straight["losses"][step], step


def test_fsdp_restores_on_fewer_ranks_and_on_one_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ("--mode", "fsdp", "--save", "every(3)", "--dump")
    torchrun(4, run_dir, tmp_path / "four", *common, "--steps", "6")
    saved = records(tmp_path / "four")[0]["final"]
    torchrun(2, run_dir, tmp_path / "two", *common, "--restore-step", "6", "--steps", "8")
    two = records(tmp_path / "two")
    assert [r["restored"] for r in two] == [6, 6]
    assert two[0]["state"] == saved  # weights and Adam moments, every value
    assert not two[0]["errors"]
    assert len(two[0]["losses"]) == 2  # and it trains on from there

    # on one process, without a process group: the shards are put back together whole
    run = cw.open_run(run_dir)
    values = run.load(6)
    for name, value in saved["weights"].items():
        assert values["model"][name].tolist() == value, name
    last = torch.nn.Linear(40, 3)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(), last
    )
    opt = torch.optim.AdamW(list(model.parameters())[2:], lr=2e-2)
    with pytest.warns(cw.RestoreWarning, match="saved by 4 process"):
        assert run.restore({"model": model, "optimizer": opt}, rng=False) == 6
    assert last.weight.tolist() == saved["weights"]["4.weight"]

    # the command line reads sharded checkpoints on one process too
    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptwise", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "verified 2 checkpoint(s)" in cli("verify", str(run_dir))
    usage = json.loads(cli("du", str(run_dir), "--json"))
    assert usage["total"]["logical_bytes"] > usage["total"]["unique_bytes"]
    cli("export", str(run_dir), str(tmp_path / "export"), "--step", "6")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported["2.weight"].tolist() == saved["weights"]["2.weight"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])  # each about 20 s: four short jobs
def test_a_run_resumes_on_another_number_of_ranks_exactly(tmp_path: Path, mode: str) -> None:
    """2 ranks → 1 and 1 → 2 through ``manager.restore``, DDP's replicated state and FSDP2's
    shards (a one-process checkpoint of FSDP2 holds whole tensors, cut to each rank's chunk).

    Every rank trains on the same batch of each step (``--data full``): the averaged
    gradient is then each rank's own, exactly, so the run trains bit-identically on one rank
    or two (checked first), and a resume on the other number must match the uninterrupted
    run on that number bit for bit. Each rank's RNG is seeded apart from the others' and
    draws one number a step: a rank that existed goes on with its own stream; a rank that
    did not keeps the generator its job seeded, and never draws rank 0's numbers.
    """
    common = ["--mode", mode, "--data", "full", "--save", "every(3)", "--steps", "8"]
    common += ["--dump-step", "6"]
    torchrun(2, tmp_path / "run2", tmp_path / "s2", *common)
    torchrun(1, tmp_path / "run1", tmp_path / "s1", *common)
    resume = ("--restore-step", "6", "--dump")
    torchrun(1, tmp_path / "run2", tmp_path / "r21", *common, *resume)
    torchrun(2, tmp_path / "run1", tmp_path / "r12", *common, *resume)
    (s1,), s2 = records(tmp_path / "s1"), records(tmp_path / "s2")
    assert s1["losses"] == s2[0]["losses"] == s2[1]["losses"]
    assert s1["at_step"] == s2[0]["at_step"]

    def after(values: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in values.items() if int(k) > 6}

    (r21,) = records(tmp_path / "r21")
    assert r21["restored"] == 6
    assert not r21["errors"]
    assert r21["state"] == s2[0]["at_step"]  # weights and Adam moments, every value
    assert r21["losses"] == after(s1["losses"])
    assert r21["draws"] == after(s2[0]["draws"])  # rank 0's own stream, where it stopped
    (warning,) = r21["warnings"]
    assert "saved by 2 process(es) and is restored on 1" in warning
    assert "rank(s) 1 (RNG states) are restored by no rank" in warning

    r12 = records(tmp_path / "r12")
    for rank, record in enumerate(r12):
        assert record["restored"] == 6
        assert not record["errors"]
        assert record["state"] == s1["at_step"]
        assert record["losses"] == after(s2[rank]["losses"])
    assert r12[0]["draws"] == after(s1["draws"])
    assert r12[0]["warnings"] == [
        f"checkpoint at step 6 of {tmp_path / 'run1'} was saved by 1 process(es) and is "
        "restored on 2; rank 0 restores its own state"
    ]
    new = r12[1]
    assert new["rng_after"] == new["rng_before"]
    # what a fresh rank 1 draws first (in the uninterrupted run), not rank 0's numbers
    assert list(new["draws"].values()) == [s2[1]["draws"]["1"], s2[1]["draws"]["2"]]
    assert not set(new["draws"].values()) & set(s1["draws"].values())
    (warning,) = new["warnings"]
    assert "rank 1 did not exist then" in warning
    assert "it keeps its own RNG states (numpy, python, torch)" in warning


@pytest.mark.parametrize("killed", [0, 1])
def test_a_rank_killed_mid_save_fails_the_job_and_the_next_resumes(
    tmp_path: Path, killed: int
) -> None:
    """SIGKILL to one rank while its background write of step 10 runs (rank 0 also holds
    the lock and would write the manifest): the job fails within the collective's wait, the
    run holds only whole checkpoints, and the next job resumes bit-exactly from step 5."""
    run_dir = tmp_path / "run"
    args = ("--save", "every(5)", "--steps", "12")
    seconds = torchrun(
        2, run_dir, tmp_path / "a", *args, "--kill-rank", str(killed), "--kill-step", "10",
        ok=False,
    )  # fmt: skip
    assert seconds < 120
    run = cw.open_run(run_dir)
    assert run.steps() == [5]  # step 10 never committed
    assert run.verify() == []
    torchrun(2, run_dir, tmp_path / "b", *args)
    resumed = records(tmp_path / "b")
    assert [r["restored"] for r in resumed] == [5, 5]
    assert cw.open_run(run_dir).steps() == [5, 10]
    torchrun(2, tmp_path / "straight", tmp_path / "c", *args)
    for rank, straight in enumerate(records(tmp_path / "c")):
        assert resumed[rank]["losses"]
        for step, loss in resumed[rank]["losses"].items():
            assert loss == straight["losses"][step], (rank, step)


@pytest.mark.parametrize("defer", [False, True], ids=["copied", "deferred"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_background_saves_hold_each_ranks_state_at_its_step(
    tmp_path: Path, mode: str, defer: bool
) -> None:
    """The default, asynchronous on every rank (and with ``defer_copy=True``, the optimizer's
    tensors copied while the next forward and backward run): while each rank's (slowed)
    write runs, training changes the live weights and Adam moments, and every checkpoint
    still restores to the state each rank had at that step()."""
    run_dir = tmp_path / "run"
    torchrun(
        2, run_dir, tmp_path / "a", "--mode", mode, "--save", "every(2)", "--keep", "all",
        "--steps", "9", "--check-saves", *(["--defer"] if defer else []),
    )  # fmt: skip
    for record in records(tmp_path / "a"):
        assert not record["errors"]
        assert record["save_checks"] == {str(s): True for s in (2, 4, 6, 8)}, record["rank"]
        # (copied before step() returned, copied while the next steps ran)
        assert all(after > 0 if defer else after == 0 for _, after in record["copies"])
    run = cw.open_run(run_dir)
    assert run.steps() == [2, 4, 6, 8]
    assert run.verify() == []


def test_fsdp_in_a_world_of_one_defers_the_copy_soundly(tmp_path: Path) -> None:
    """``defer_copy=True`` on FSDP2 in a world of one: the optimizer's DTensor parameters
    are found by their local values, deferred, and every checkpoint holds its step()."""
    torchrun(
        1, tmp_path / "run", tmp_path / "a", "--mode", "fsdp", "--save", "every(2)",
        "--keep", "all", "--steps", "9", "--check-saves", "--defer",
    )  # fmt: skip
    ((record,),) = [records(tmp_path / "a")]
    assert record["save_checks"] == {str(s): True for s in (2, 4, 6, 8)}
    assert all(after > 0 for _, after in record["copies"])


def _failed_once(record: dict[str, Any], sync: bool) -> tuple[str, str]:
    """The one error a rank raised for the failed save of step 10, and the kind, checking
    when it was raised: by the save's own step() when synchronous, else by a step() after
    the background save ended (the first after it, on each rank, or the next save's step
    at the latest), while the ranks stayed in step and saved step 15."""
    ((step, kind, message),) = record["errors"]
    if sync:
        assert step == 10
        assert [s for s, _ in record["saves"]] == [5, 15]
    else:
        assert 11 <= step <= 15, step
        # the decision to save step 10 was returned; a save that failed at step 15 was not
        assert [s for s, _ in record["saves"]] == [5, 10] + ([15] if step < 15 else [])
    return kind, message


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_rank_whose_state_cannot_be_captured_fails_the_save_everywhere(
    tmp_path: Path, sync: bool
) -> None:
    run_dir = tmp_path / "run"
    torchrun(
        2, run_dir, tmp_path / "a", "--save", "every(5)", "--steps", "15",
        "--capture-fail-rank", "1", "--capture-fail-step", "10", *(["--sync"] if sync else []),
    )  # fmt: skip
    for record in records(tmp_path / "a"):
        kind, message = _failed_once(record, sync)
        assert kind == "SnapshotError"  # rank 1's error, raised on every rank
        assert "failed on rank 1" in message
    run = cw.open_run(run_dir)
    assert run.steps() == [5, 15]
    assert run.verify() == []


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_rank_whose_write_fails_fails_the_save_on_every_rank(tmp_path: Path, sync: bool) -> None:
    """ENOSPC on rank 1 only: every rank raises the same error naming rank 1, no manifest
    names the objects rank 0 wrote, and the run goes on saving."""
    run_dir = tmp_path / "run"
    torchrun(
        2, run_dir, tmp_path / "a", "--save", "every(5)", "--steps", "15",
        "--fail-rank", "1", "--fail-step", "10", *(["--sync"] if sync else []),
    )  # fmt: skip
    messages = set()
    for record in records(tmp_path / "a"):
        kind, message = _failed_once(record, sync)
        assert kind == "CheckpointError"
        assert "failed on rank 1" in message
        assert "No space left on device" in message
        messages.add(message.split("failed on rank 1")[1])
    assert len(messages) == 1  # the same words on every rank
    run = cw.open_run(run_dir)
    assert run.steps() == [5, 15]
    assert run.verify() == []


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_signal_to_one_rank_saves_on_all_then_all_exit(tmp_path: Path, signalled: int) -> None:
    torchrun(
        2, tmp_path / "run", tmp_path / "a", "--save", "every(50) | on_signal", "--steps", "30",
        "--signal-rank", str(signalled), "--signal-step", "6",
    )  # fmt: skip
    # rank 0 decides at once; another rank's signal reaches it with the next step's decision
    expected = 6 if signalled == 0 else 7
    for record in records(tmp_path / "a"):
        assert record["exited_at"] == expected  # step() raised SystemExit after the save
        assert not record["errors"]
    run = cw.open_run(tmp_path / "run")
    assert run.steps() == [expected]
    assert run.info(expected).reasons == ("on_signal(SIGUSR1)",)
