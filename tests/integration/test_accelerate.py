"""An ``Accelerator`` loop (prepared model, optimizer, scheduler, data loader) resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator

from ckptwise.integrations.accelerate import accelerate_state

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("accelerate_train.py")


def train(run: Path, out: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_stop_and_resume_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    train(tmp_path / "a", tmp_path / "a.json")
    train(tmp_path / "b", tmp_path / "b.json", "--stop-after", "11")  # mid-epoch (9 per epoch)
    train(tmp_path / "b", tmp_path / "b.json")
    a, b = (
        json.loads((tmp_path / "a.json").read_text()),
        json.loads((tmp_path / "b.json").read_text()),
    )
    assert b["restored"] == [0, 11]
    assert sorted(map(int, a["losses"])) == list(range(1, 25))
    assert a["losses"] == b["losses"]
    assert a["weights"] == b["weights"]


def test_two_processes_stop_and_resume_bit_identically(tmp_path: Path) -> None:
    def torchrun(run: Path, out: Path, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(SCRIPT), str(run), "--out", str(out), *args],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    args = ("--steps", "16", "--samples", "64")  # 4 steps an epoch on 2 processes
    torchrun(tmp_path / "a", tmp_path / "a.json", *args)
    torchrun(tmp_path / "b", tmp_path / "b.json", *args, "--stop-after", "7")  # mid-epoch
    torchrun(tmp_path / "b", tmp_path / "b.json", *args)
    for rank in (0, 1):
        a = json.loads((tmp_path / f"a{rank}.json").read_text())
        b = json.loads((tmp_path / f"b{rank}.json").read_text())
        assert b["restored"] == [0, 7]  # the stop counts as final: on_final saved it
        assert a["losses"] == b["losses"]
        assert a["weights"] == b["weights"]


@pytest.mark.slow  # 30 s to a minute: four short jobs, on one process and on two
def test_a_run_resumes_on_another_number_of_processes(tmp_path: Path) -> None:
    """2 processes → 1 and 1 → 2 through ``manager.restore``.

    The restored weights and optimizer state are the saved ones, bit for bit, on every
    process. Losses: every step trains on the same 8 samples whatever the number of
    processes (``split_batches``: each of 2 processes takes 4 of them; no dropout, whose
    masks are drawn per process), so a resumed run must follow the uninterrupted run on its
    new number of processes. Not bit for bit: two processes average the gradients of two
    halves of the batch, summed in another order than one process sums the whole batch, so
    float32 rounding differs (by about 1e-7 of the loss over these 12 steps). The
    tolerance, 1e-5 of the loss, is a hundred times that and far below what a wrong
    restore does (a step of the wrong data or weights moves the loss by more than 1e-2).
    """

    def torchrun(ranks: int, run: Path, name: str, *args: str) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(ranks), str(SCRIPT), str(run), "--out", str(tmp_path / f"{name}.json"),
             "--split-batches", "--dropout", "0", "--steps", "12", "--samples", "64",
             "--dump-step", "9", *args],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        names = [f"{name}.json"] if ranks == 1 else [f"{name}{r}.json" for r in range(ranks)]
        return [json.loads((tmp_path / n).read_text()) for n in names]

    def close(resumed: dict[str, str], straight: dict[str, str]) -> None:
        assert set(resumed) == {"10", "11", "12"}
        for step, loss in resumed.items():
            got, want = float.fromhex(loss), float.fromhex(straight[step])
            assert got == pytest.approx(want, rel=1e-5), step

    s2 = torchrun(2, tmp_path / "two", "s2")  # saves steps 3, 6, 9 and 12; keeps 9 and 12
    (s1,) = torchrun(1, tmp_path / "one", "s1")
    assert s2[0]["at_step"] == s2[1]["at_step"]  # DDP: every process holds the same state
    for step, loss in s1["mean_losses"].items():  # the premise: the same data on 1 or 2
        assert float.fromhex(s2[0]["mean_losses"][step]) == pytest.approx(
            float.fromhex(loss), rel=1e-5
        )
    (r21,) = torchrun(1, tmp_path / "two", "r21", "--restore-step", "9")
    assert r21["restored"] == [9]
    assert r21["restored_state"] == s2[0]["at_step"]
    close(r21["mean_losses"], s1["mean_losses"])
    (warning,) = r21["warnings"]
    assert "saved by 2 process(es) and is restored on 1; rank 0 restores its own state" in warning
    r12 = torchrun(2, tmp_path / "one", "r12", "--restore-step", "9")
    for record in r12:
        assert record["restored"] == [9]
        assert record["restored_state"] == s1["at_step"]
        close(record["mean_losses"], s2[0]["mean_losses"])
    assert "rank 1 did not exist then" in r12[1]["warnings"][0]


def test_state_unwraps_the_model_and_keeps_other_objects() -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    sampler = object()
    state = accelerate_state(accelerator, model=model, data=sampler)
    assert state["model"] is accelerator.unwrap_model(model)
    assert state["data"] is sampler
    assert "scaler" not in state  # no fp16 on this accelerator
