"""``Trainer`` + DeepSpeed ZeRO-2 and ZeRO-3 (and plain DDP) under ``torchrun``, as MiniCPM-V
fine-tunes.

Two ranks on the CPU (gloo) train the tiny MiniCPM-V-shaped model (LLM frozen) with
ckptwise attached, saving in the background (one job per stage, shared by the tests of this
module). A second job resumes from the first checkpoint and must reach exactly the same
state: the same losses, and a re-saved last checkpoint whose every object already exists
(not one byte differs from the uninterrupted run's). The same resume on two "nodes" (two
``torchrun --nnodes 2`` agents, each with its own temporary folder) must be as exact, each
node's folder holding only its own rank's files. Resuming on one rank, and from that job's
checkpoint on two again, goes through DeepSpeed's universal checkpoint: the resumed engine
holds exactly the saved weights, Adam moments and schedule, and the losses stay close to
the run that kept its number of ranks. ``ckptwise export`` of each run loads with
``from_pretrained`` as the model was trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from click.testing import CliRunner
from minicpmv_tiny import MiniCPMVLike, build_model
from safetensors.torch import load_file
from transformers import AutoTokenizer

import ckptwise as cw
from ckptwise.cli.main import cli
from ckptwise.integrations.transformers.deepspeed import engine_scheduler, write_engine_files
from nodes_job import Nodes

pytestmark = pytest.mark.integration
#: from_pretrained's defaults: transformers 5 takes config.json's dtype; 4.x loads fp32 unless
#: told to read it
AUTO: dict[str, Any] = (
    {} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
)
pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).with_name("ds_train.py")


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(run: Path, out: Path, *args: str, ranks: int = 2) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(ranks), str(SCRIPT), str(run), str(out), *args],
        capture_output=True, text=True, timeout=400, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def two_nodes(run: Path, out: Path, tmp: Path, *args: str) -> list[dict[str, Any]]:
    """One rank on each of two "nodes": two ``torchrun --nnodes 2`` agents started together
    on this host, each with a temporary folder of its own."""
    with socket.socket() as probe:  # a free port for the job's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for node in (0, 1):
        (tmp / f"node{node}").mkdir(parents=True)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
            str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
            str(port), str(SCRIPT), str(run), str(out), *args,
        ]  # fmt: skip
        env = {**ENV, "TMPDIR": str(tmp / f"node{node}")}
        procs.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
        )
    try:
        said = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, text in zip(procs, said, strict=True):
        assert proc.returncode == 0, text[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@dataclass
class Straight:
    """A job of two ranks that trained 20 steps, saving at 10 and 20, and what it logged."""

    stage: int
    run: Path
    records: list[dict[str, Any]]
    #: the model as the engine held it when training ended (step 20), in its dtypes
    trained: Path
    #: what ``callback.export(..., "latest")`` wrote on rank 0 after training
    exported: Path

    def copy(self, to: Path) -> Path:
        """A copy of the run, for a test that saves into it."""
        shutil.copytree(self.run, to)
        return to


@pytest.fixture(scope="module")
def straight(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Straight:
    stage: int = request.param
    if not stage and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(
            "transformers 4.51 on a CPU process group loads optimizer.pt with map_location "
            "'cpu:0', which torch.load rejects (on GPUs it is 'cuda:N'); DeepSpeed runs, "
            "MiniCPM-V's case, are covered on 4.51"
        )
    tmp = tmp_path_factory.mktemp(f"straight{stage}")
    # saved in the background (the default) while training goes on: each rank's writes are
    # slowed so the next steps change the live weights, masters and moments meanwhile
    records = torchrun(
        tmp / "run", tmp / "a", "--stage", str(stage), "--steps", "20", "--slow-writes", "0.5",
        "--dump-final", str(tmp / "trained.safetensors"), "--export", str(tmp / "exported"),
    )  # fmt: skip
    return Straight(stage, tmp / "run", records, tmp / "trained.safetensors", tmp / "exported")


@pytest.mark.parametrize("straight", [0, 2, 3], ids=["ddp", "zero2", "zero3"], indirect=True)
def test_zero_stage_resumes_bit_exactly_and_frozen_weights_are_stored_once(
    tmp_path: Path, straight: Straight
) -> None:
    stage, run_dir = straight.stage, straight.run
    for record in straight.records:
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
    for before, after in zip(straight.records, resumed, strict=True):
        assert after["resumed_from"] == 10
        assert after["saves"] == [[20, ["every(10)"]]]
        assert sorted(after["losses"], key=int) == [str(s) for s in range(11, 21)]
        for step, loss in after["losses"].items():
            assert loss == before["losses"][step], step
    # step 20 saved again by the resumed job: every object (fp32 master partitions, Adam
    # moments, RNG, scheduler, ...) already existed, so it added nothing
    assert cw.open_run(run_dir).info(20).new_bytes == 0


@pytest.mark.parametrize("straight", [0, 2, 3], ids=["ddp", "zero2", "zero3"], indirect=True)
def test_export_loads_with_from_pretrained_as_the_model_was_trained(
    tmp_path: Path, straight: Straight
) -> None:
    """``ckptwise export RUN OUT`` alone (one process, no process group) writes a folder that
    ``from_pretrained`` with its defaults loads as the engine held the model when training
    ended: under DeepSpeed bf16 every tensor in bf16, the trained ones DeepSpeed's fp32
    masters rounded as DeepSpeed rounds them; with DDP the fp32 model. The tokenizer comes
    with it. ``callback.export`` (in the training job) writes the same; ``--dtype fp32`` keeps
    the masters whole."""
    trained = load_file(str(straight.trained))
    as_trained = torch.bfloat16 if straight.stage else torch.float32
    assert {t.dtype for t in trained.values()} == {as_trained}
    initial = build_model(seed=42).state_dict()
    run = str(straight.run)
    # the CLI's default, the callback's default, then the CLI's fp32 (DDP's model is fp32)
    for dtype in ["as-trained", "callback"] + (["fp32"] if straight.stage else []):
        out = tmp_path / dtype
        if dtype == "callback":
            out = straight.exported
        else:
            chosen = [] if dtype == "as-trained" else ["--dtype", dtype]
            result = CliRunner().invoke(cli, ["export", run, str(out), "--step", "20", *chosen])
            assert result.exit_code == 0, result.output
            assert "warning" not in result.stderr  # (zero_to_fp32's progress bars are there)
        found: Any = MiniCPMVLike.from_pretrained(out, output_loading_info=True, **AUTO)
        loaded, info = found
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        state = loaded.state_dict()
        assert state.keys() == trained.keys()
        want = torch.float32 if dtype == "fp32" else as_trained
        for name, tensor in trained.items():
            assert state[name].dtype == want, name
            assert torch.equal(state[name].to(as_trained), tensor), name
            if name.startswith("llm."):  # frozen
                assert torch.equal(state[name], initial[name].to(as_trained).to(want)), name
        assert AutoTokenizer.from_pretrained(out)("w3 w7")["input_ids"] == [3, 7]
    assert not torch.equal(state["resampler.query"], initial["resampler.query"])
    if straight.stage:  # the fp32 masters hold more than the bf16 model upcast
        assert not torch.equal(state["resampler.query"], trained["resampler.query"].float())


@pytest.mark.parametrize("straight", [2, 3], ids=["zero2", "zero3"], indirect=True)
def test_zero_stage_resumes_on_two_nodes_each_writing_only_its_own_ranks_files(
    tmp_path: Path, straight: Straight
) -> None:
    run_dir = straight.copy(tmp_path / "run")
    resumed = two_nodes(
        run_dir, tmp_path / "b", tmp_path / "tmp", "--stage", str(straight.stage),
        "--steps", "20", "--resume", "10",
    )  # fmt: skip
    for before, after in zip(straight.records, resumed, strict=True):
        assert after["resumed_from"] == 10
        assert sorted(after["losses"], key=int) == [str(s) for s in range(11, 21)]
        for step, loss in after["losses"].items():
            assert loss == before["losses"][step], step
    folders = [Path(record["resume_folder"]) for record in resumed]
    # a local run's resume folders are in the run folder (the checkpoints' disk), one per node
    assert folders[0].parent != folders[1].parent
    assert all(folder.parent.parent == run_dir for folder in folders)
    assert not any(folder.parent.exists() for folder in folders)  # removed once training stepped
    tag = "global_step10"
    for rank, record in enumerate(resumed):
        # what DeepSpeed's load_checkpoint reads on the rank: its optimizer partition and,
        # under ZeRO-2, the one model states file of data-parallel rank 0; under ZeRO-3 its own
        states = (
            f"{tag}/mp_rank_00_model_states.pt"
            if straight.stage == 2
            else f"{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        )
        assert record["resume_files"] == sorted(
            [
                f"{tag}/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                states,
                "latest",
                f"rng_state_{rank}.pth",
                "scheduler.pt",
                "trainer_state.json",
            ]
        )


def universal(folder: Path, out: Path) -> dict[str, Any]:
    """What DeepSpeed's universal checkpoint of ``folder`` (a ``global_stepN`` or other tag
    folder of every rank's files) holds for each parameter: its fp32 weights, Adam moments
    and step, by file (``zero/NAME/fp32.pt``, ...), whatever number of ranks saved it."""
    from deepspeed.checkpoint import ds_to_universal

    options = {"num_extract_workers": 1, "num_merge_workers": 1, "keep_temp_folder": False}
    ds_to_universal.main(
        argparse.Namespace(
            input_folder=str(folder), output_folder=str(out), strict=True,
            inject_missing_state=True, **options,
        )
    )  # fmt: skip
    zero = out / "zero"
    return {
        str(path.relative_to(zero)): torch.load(path, weights_only=False)
        for path in sorted(zero.rglob("*.pt"))
        if path.name != "optimizer_state.pt"
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_resumed_exactly(run: cw.Run, step: int, dump: Path, tmp: Path) -> None:
    """The engine that resumed from ``step`` (which saved itself to ``dump`` as training
    began) holds exactly what the checkpoint holds, though the ranks differ in number."""
    saved = tmp / "saved"
    for rank in range(run.manifest(step).world_size):
        loaded = run.read(step, rank=rank)
        assert loaded is not None
        write_engine_files(loaded.values()["deepspeed"], saved)
    expected = universal(saved / f"global_step{step}", tmp / "expected" / "u")
    got = universal(dump / "start", tmp / "got" / "u")
    assert sum(name.endswith("/exp_avg_sq.pt") for name in expected) >= 9  # the trained ones
    assert expected.keys() == got.keys()
    differ = [name for name in expected if not same(expected[name], got[name])]
    assert not differ, differ
    loaded = run.read(step, rank=0)
    assert loaded is not None
    scheduler = engine_scheduler(loaded.values()["deepspeed"])
    model_states = next((dump / "start").glob("*model_states.pt"))
    engine = torch.load(model_states, weights_only=False)
    assert engine["global_steps"] == step
    assert scheduler is not None
    assert scheduler == engine["lr_scheduler"]


def two_to_one_to_two(
    straight: Straight, tmp_path: Path
) -> tuple[cw.Run, dict[str, Any], list[dict[str, Any]]]:
    """A copy of ``straight``'s run resumed 2 -> 1 (its step 10 on one rank, which saves at
    15 and 20), then 1 -> 2 (that rank's step 15 on two ranks), each dumping the state it
    starts from into ``dump1``/``dump2``; the run and the two jobs' records."""
    run_dir = straight.copy(tmp_path / "run")
    stage = str(straight.stage)
    (one,) = torchrun(
        run_dir, tmp_path / "one", "--stage", stage, "--steps", "20", "--save", "every(5)",
        "--resume", "10", "--dump-start", str(tmp_path / "dump1"), ranks=1,
    )  # fmt: skip
    two = torchrun(
        run_dir, tmp_path / "two", "--stage", stage, "--steps", "20", "--save", "every(5)",
        "--resume", "15", "--dump-start", str(tmp_path / "dump2"),
    )  # fmt: skip
    run = cw.open_run(run_dir)
    assert (run.manifest(10).world_size, run.manifest(15).world_size) == (2, 1)
    assert one["resumed_from"] == 10
    assert one["saves"] == [[15, ["every(5)"]], [20, ["every(5)"]]]
    assert [r["resumed_from"] for r in two] == [15, 15]
    return run, one, two


@pytest.mark.parametrize("straight", [2, 3], ids=["zero2", "zero3"], indirect=True)
def test_zero_stage_resumes_on_another_number_of_ranks_through_universal_checkpoints(
    tmp_path: Path, straight: Straight
) -> None:
    run, one, two = two_to_one_to_two(straight, tmp_path)
    # one folder for the node's ranks, with DeepSpeed's universal checkpoint; the RNG states
    # of the ranks the checkpoint had (a new rank keeps the seeded state Trainer starts with)
    assert "latest_universal" in one["resume_files"]
    assert "rng_state.pth" in one["resume_files"]
    assert two[0]["resume_files"] == two[1]["resume_files"]
    assert "rng_state_0.pth" in two[0]["resume_files"]
    assert "rng_state_1.pth" not in two[0]["resume_files"]

    # exact: fp32 master weights, Adam moments and steps, LR schedule and step count
    assert_resumed_exactly(run, 10, tmp_path / "dump1", tmp_path / "check1")
    assert_resumed_exactly(run, 15, tmp_path / "dump2", tmp_path / "check2")

    # not exact: the data order (each step now takes a global batch of 4 samples instead of
    # 8, or the reverse, and Trainer skips as many batches of the new loader as steps were
    # done) and the new ranks' RNG. The first resumed step runs the very weights the other
    # run has, on another batch: its loss differs by the batches' spread only (measured here:
    # 0.6 % on both stages, both ways); the next steps also train on other batches and drift
    # a little (at most 1.3 %). 2 % and 3 % hold with room, and still catch a resume that lost
    # the weights (the fresh model's loss is 15 % higher). The moments, which the losses of a
    # few steps cannot tell, are checked exactly above.
    def losses(record: dict[str, Any], steps: range) -> list[float]:
        return [float.fromhex(record["losses"][str(s)]) for s in steps]

    assert sorted(one["losses"], key=int) == [str(s) for s in range(11, 21)]
    assert sorted(two[0]["losses"], key=int) == [str(s) for s in range(16, 21)]
    for got, expected in [
        (losses(one, range(11, 21)), losses(straight.records[0], range(11, 21))),
        (losses(two[0], range(16, 21)), losses(one, range(16, 21))),
    ]:
        assert got[0] == pytest.approx(expected[0], rel=0.02)
        assert got == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("straight", [0], ids=["ddp"], indirect=True)
def test_the_trainer_with_ddp_resumes_on_another_number_of_ranks(
    tmp_path: Path, straight: Straight
) -> None:
    """Without DeepSpeed every rank holds the whole model and optimizer: 2 -> 1 and
    1 -> 2 restore them exactly, with the step count and the schedule."""
    run, one, two = two_to_one_to_two(straight, tmp_path)
    assert [r["saves"] for r in two] == [[[20, ["every(5)"]]]] * 2
    # the RNG file Trainer reads on each rank (a new rank: rank 0's, as Trainer seeds every
    # rank alike)
    assert "rng_state.pth" in one["resume_files"]
    assert [f"rng_state_{r}.pth" in two[r]["resume_files"] for r in (0, 1)] == [True, True]
    # exact: the weights and Adam's moments and steps every rank starts from
    for step, dump, ranks in ((10, tmp_path / "dump1", 1), (15, tmp_path / "dump2", 2)):
        saved = run.load(step)
        expected = {f"model/{k}": v for k, v in saved["model"].items()}
        for index, moments in saved["optimizer"]["state"].items():
            expected.update({f"optimizer/{index}/{k}": v for k, v in moments.items()})
        assert sum(k.endswith("/exp_avg_sq") for k in expected) >= 4  # the trained ones
        for rank in range(ranks):
            started = load_file(str(dump / f"rank{rank}.safetensors"))
            assert started.keys() == expected.keys()
            differ = [
                k for k, v in started.items() if not torch.equal(v, torch.as_tensor(expected[k]))
            ]
            assert not differ, (step, rank, differ)

    # the data order changes with the number of ranks (each step takes another batch), so
    # the losses follow the uninterrupted run's closely, not bit for bit
    def losses(record: dict[str, Any], steps: range) -> list[float]:
        return [float.fromhex(record["losses"][str(s)]) for s in steps]

    assert losses(one, range(11, 21)) == pytest.approx(
        losses(straight.records[0], range(11, 21)), rel=0.03
    )
    assert losses(two[0], range(16, 21)) == pytest.approx(losses(one, range(16, 21)), rel=0.03)


#: the bucket of the module's S3-compatible server (the ``s3`` fixture, tests/conftest.py)
BUCKET = "deepspeed"


@pytest.mark.parametrize("straight", [3], ids=["zero3"], indirect=True)
def test_zero3_on_two_nodes_through_caches_to_s3_survives_a_killed_node(
    tmp_path: Path, straight: Straight, s3: dict[str, Any]
) -> None:
    """MiniCPM-V's multi-node launch without a shared file system: each node has its own
    cache folder and temporary folder, the run is in the bucket. Node 1 is killed (SIGKILL,
    every process) while its objects of step 10 are still uploading; the bucket then lists
    no checkpoint, and the job relaunched on the same caches uploads step 10 and resumes
    from it bit-exactly, each node reading and writing only its own files."""
    job = Nodes(SCRIPT, s3, tmp_path, "s3://deepspeed/run")
    job.start("a", "--stage", "3", "--steps", "20", slow={1: 2.0})
    deadline = time.monotonic() + 300
    while 10 not in job.committed():
        assert time.monotonic() < deadline, "step 10 was never committed"
        time.sleep(0.05)
    job.kill(1)
    job.wait(ok=False, timeout=90)
    bucket = cw.open_run(job.run, storage_options=s3)
    assert bucket.steps() == []  # step 10 waits for node 1's objects: never listed half
    assert bucket.verify() == []

    job.start("b", "--stage", "3", "--steps", "20", "--resume")
    job.wait()
    resumed = [job.record(node, "b") for node in (0, 1)]
    for node, (before, after) in enumerate(zip(straight.records, resumed, strict=True)):
        assert after["resumed_from"] == 10
        assert sorted(after["losses"], key=int) == [str(s) for s in range(11, 21)]
        for step, loss in after["losses"].items():
            assert loss == before["losses"][step], step
        # the node's own temporary folder, holding its own rank's per-rank files only
        assert Path(after["resume_folder"]).is_relative_to(tmp_path / f"tmp-node{node}")
        assert not [f for f in after["resume_files"] if f"rank_{1 - node}_" in f]
    bucket.refresh()
    assert bucket.steps() == [10, 20]
    assert bucket.verify() == []
