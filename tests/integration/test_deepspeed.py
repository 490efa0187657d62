"""``Trainer`` + DeepSpeed ZeRO-2 and ZeRO-3 (and plain DDP) under ``torchrun``, as MiniCPM-V
fine-tunes.

Two ranks on the CPU (gloo) train the tiny MiniCPM-V-shaped model (LLM frozen) with
ckptwise attached, saving in the background; a second job resumes from the first checkpoint
and must reach exactly the same state: the same losses, and a re-saved last checkpoint
whose every object already exists (not one byte differs from the uninterrupted run's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from minicpmv_tiny import build_model
from safetensors.torch import load_file

import ckptwise as cw

pytestmark = pytest.mark.integration
pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).with_name("ds_train.py")


def torchrun(run: Path, out: Path, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(run), str(out), *args],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("stage", [0, 2, 3], ids=["ddp", "zero2", "zero3"])
def test_zero_stage_resumes_bit_exactly_and_frozen_weights_are_stored_once(
    tmp_path: Path, stage: int
) -> None:
    if not stage and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(
            "transformers 4.51 on a CPU process group loads optimizer.pt with map_location "
            "'cpu:0', which torch.load rejects (on GPUs it is 'cuda:N'); DeepSpeed runs, "
            "MiniCPM-V's case, are covered on 4.51"
        )
    run_dir = tmp_path / "run"
    # saved in the background (the default) while training goes on: each rank's writes are
    # slowed so the next steps change the live weights, masters and moments meanwhile
    straight = torchrun(
        run_dir, tmp_path / "a", "--stage", str(stage), "--steps", "20", "--slow-writes", "0.5"
    )
    for record in straight:
        assert record["saves"] == [[10, ["every(10)"]], [20, ["every(10)"]]]
    run = cw.open_run(run_dir)
    first, second = run.info(10), run.info(20)
    assert run.manifest(20).world_size == 2
    assert run.verify() == []
    # the frozen LLM's weights (and its ZeRO partitions) were written by the first save only
    assert second.new_bytes < first.new_bytes / 3

    resumed = torchrun(
        run_dir, tmp_path / "b", "--stage", str(stage), "--steps", "20", "--resume", "10"
    )
    for before, after in zip(straight, resumed, strict=True):
        assert after["resumed_from"] == 10
        assert after["saves"] == [[20, ["every(10)"]]]
        assert sorted(after["losses"], key=int) == [str(s) for s in range(11, 21)]
        for step, loss in after["losses"].items():
            assert loss == before["losses"][step], step
    # step 20 saved again by the resumed job: every object (fp32 master partitions, Adam
    # moments, RNG, scheduler, ...) already existed, so it added nothing
    assert cw.open_run(run_dir).info(20).new_bytes == 0

    # one consolidated model on one process, without DeepSpeed's process group
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptwise", "export", str(run_dir), str(out), "--step", "20"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(out / "model.safetensors"))
    model = build_model(seed=42)
    assert exported.keys() == model.state_dict().keys()
    if not stage:
        return  # DDP saved the model itself: export is the one-process path
    for name, initial in model.state_dict().items():
        if name.startswith("llm."):  # frozen: as DeepSpeed holds them, in bf16
            assert torch.equal(exported[name], initial.to(torch.bfloat16)), name
        else:  # trained: the fp32 master weights
            assert exported[name].dtype == torch.float32, name
    assert not torch.equal(exported["resampler.query"], model.state_dict()["resampler.query"])
