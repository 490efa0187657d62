"""The main job: a MiniCPM-V-shaped fine-tune on the Hugging Face ``Trainer``, with ckptwise.

It runs ``finetune_minicpmv.py`` (a ``Trainer`` subclass, frozen LLM, ~6 % trainable) as real
processes:

1. with a ckptwise policy -- no saves before step 20, then every 10 steps, plus whenever
   ``eval_loss`` improves, plus the final step; keep the last 2 and the best 1 -- and kills
   it with SIGKILL after the save at step 30, then resumes it in a new process;
2. the same run uninterrupted, to show the resumed losses match bit for bit;
3. the ``Trainer``'s own ``save_steps=10, save_total_limit=2`` and ckptwise on the same
   schedule, to compare the bytes each writes.

    python examples/demo.py [--workdir DIR]

Without ``--workdir`` everything goes to a new temporary folder that is removed at the end
(about 35 MB); ``--workdir DIR`` keeps the runs there to look at (``ckptwise ls DIR/run/ckptwise``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("finetune_minicpmv.py")
STEPS = 60
COMMON = [
    "--max_steps",
    str(STEPS),
    "--per_device_train_batch_size",
    "8",
    "--learning_rate",
    "2e-3",
    "--logging_steps",
    "1",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "10",
    "--seed",
    "0",
    "--full_determinism",
    "--disable_tqdm",
    "true",
]
POLICY = [
    "--ckptwise_save",
    "after(20, every(10) | on_improvement(eval_loss) | final)",
    "--ckptwise_keep",
    "last(2) | best(1, eval_loss)",
]
#: what the demo writes in its work folder (and removes from a given one before it starts)
OUTPUTS = ("run", "reference", "best", "trainer", "ckptwise", "torchinductor")
RUNNING: list[subprocess.Popen[str]] = []


def launch(out: Path, *extra: str) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        str(SCRIPT),
        "--output_dir",
        str(out),
        *COMMON,
        "--losses_file",
        f"{out}.losses",
        "--summary_file",
        f"{out}.json",
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    RUNNING.append(proc)
    return proc


def finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{err[-3000:]}")


def summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(f"{out}.json").read_text())
    return data


def losses(out: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in Path(f"{out}.losses").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@contextmanager
def work_folder(given: str | None) -> Iterator[Path]:
    """The folder the runs go to: ``given`` (cleared of an earlier demo's outputs, kept at
    the end) or a temporary one, removed at the end however the demo ends."""
    work = Path(given) if given else Path(tempfile.mkdtemp(prefix="ckptwise-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        shutil.rmtree(work / name, ignore_errors=True)
        for suffix in (".json", ".losses"):
            (work / f"{name}{suffix}").unlink(missing_ok=True)
    # the training processes' torch compiler cache goes there too, not to the temp folder
    env_before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "torchinductor"))
    try:
        yield work
    finally:
        for proc in RUNNING:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if env_before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        if not given:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work} (pass --workdir DIR to keep the runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where runs go and stay (default: a temporary folder)")
    args = parser.parse_args()
    with work_folder(args.workdir) as work:
        demo(work)


def demo(work: Path) -> None:
    run, reference = work / "run", work / "reference"

    print(
        f"MiniCPM-V-shaped fine-tune (vpm + resampler train, llm frozen), {STEPS} steps, in {work}"
    )
    print(
        "policy: save after(20, every(10) | on_improvement(eval_loss) | final);"
        " keep last(2) | best(1, eval_loss)\n"
    )

    victim = launch(run, *POLICY, "--step_sleep", "0.1")
    marker = run / "ckptwise" / "checkpoints" / "000000000030.json"
    while not marker.exists():
        if victim.poll() is not None:
            finish(victim)
            raise SystemExit("the run ended before step 30")
        time.sleep(0.02)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    done = max(losses(run))
    print(f"[1] killed the run with SIGKILL at step {done}, after its checkpoint at step 30")
    resumed = launch(run, *POLICY, "--resume", "true", "--export_best", str(work / "best"))
    reference_run = launch(reference, *POLICY)
    finish(resumed)
    finish(reference_run)
    ours = summary(run)
    first_resumed = min(s["step"] for s in ours["saves"])
    print(
        f"[2] a new process resumed from the newest verified checkpoint and saved again from "
        f"step {first_resumed} on\n"
    )

    ref = summary(reference)
    print("which steps were saved, and why (the same in the interrupted and the straight run):")
    for save in ref["saves"]:
        print(f"  step {save['step']:3d}: {', '.join(save['reasons'])}")
    print("kept at the end:")
    for step, reasons in ours["kept"].items():
        print(f"  step {int(step):3d}: {', '.join(reasons)}")
    print(f"best model exported for from_pretrained to {ours.get('exported')}\n")

    a, b = losses(reference), losses(run)
    same = a == b and sorted(a) == list(range(1, STEPS + 1))
    weights = ref["weights_digest"] == ours["weights_digest"]
    print(
        f"losses of all {STEPS} steps, killed-and-resumed vs uninterrupted, bit for bit: "
        f"{'identical' if same else 'DIFFERENT'}; final weights: "
        f"{'identical' if weights else 'DIFFERENT'}\n"
    )

    schedule = ["--eval_strategy", "no", "--save_steps", "10"]
    hf = launch(work / "trainer", *schedule, "--save_total_limit", "2", "--use_ckptwise", "false")
    cw_same = launch(
        work / "ckptwise", *schedule, "--ckptwise_save", "every(10)", "--ckptwise_keep", "last(2)"
    )
    finish(hf)
    finish(cw_same)
    theirs, mine = summary(work / "trainer"), summary(work / "ckptwise")
    print("bytes for the same schedule (save every 10 steps, keep 2), measured by running both:")
    print(
        f"  Trainer save_steps=10, save_total_limit=2: {len(theirs['saves'])} saves wrote "
        f"{mib(theirs['bytes_written'])}, {mib(theirs['on_disk'])} on disk at the end"
    )
    print(
        f"  ckptwise every(10), keep_last(2):          {len(mine['saves'])} saves wrote "
        f"{mib(mine['bytes_written'])}, {mib(mine['on_disk'])} on disk at the end "
        f"({mine['bytes_written'] / theirs['bytes_written']:.2f}x the bytes written)"
    )
    if not (same and weights):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
