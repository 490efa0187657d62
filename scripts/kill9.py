"""Kill a real saving process with SIGKILL, again and again, and check that no committed
checkpoint is ever lost or corrupt.

Each kill starts a writer subprocess (this script with ``--worker``) that resumes from the
newest checkpoint of its run folder and saves every step through the public API
(``save=cw.every(1), keep=cw.keep_last(2)``), printing ``saving N`` before each step,
``pruning N`` as retention starts and ``committed N`` once a step is known committed. The
killer SIGKILLs it at a random moment: while it opens the run, inside a save, or just after
retention starts deleting. Then it checks, in this process:

1. every checkpoint the run lists verifies and loads to exactly the state the worker had at
   that step (the state is a function of the step, so it is rebuilt here);
2. no step the worker reported committed is missing unless retention may have deleted it
   (``keep_last(2)``: two newer checkpoints are there; a step the worker resumed from is
   committed too, so the same rule covers it);
3. a new writer takes over the dead process's lock, leaves no debris (temporary files,
   unreferenced objects), restores the newest checkpoint and saves the next step.

Runs are fresh folders or chains of several kills on one folder (a preempted job resumed
each time). Prints a table per mode and exits 1 on any failure; a failing run folder is kept.

    .venv/bin/python scripts/kill9.py --count 240
    .venv/bin/python scripts/kill9.py --count 20 --mode deltas --mode prune --seed 7 --workdir /tmp/k9

A failure names the run folder and the seed; the same seed draws the same kill plans (where
each kill lands still varies with timing).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch

import ckptwise as cw
from ckptwise.policy import RetentionContext

#: float32 elements of the big tensor (2 MiB): large enough that a save takes a moment
BIG = 1 << 19
#: int64 elements of the tensor that never changes (its object is shared by every step)
FROZEN = 1 << 16
#: int64 elements of the small tensor that changes every step
SMALL = 1024
#: seconds a worker may go without reaching its kill point before it counts as stalled
STALL = 120.0
#: guesses (seconds) for how long a save, a prune and opening a run take, until measured
SAVE_GUESS, PRUNE_GUESS, OPEN_WINDOW = 0.05, 0.005, 0.06
#: lengths of the runs each mode's kills are split into: fresh folders and chains
CHAINS = (3, 1, 4, 1)

Kind = Literal["open", "save", "prune"]


@dataclass(frozen=True)
class Mode:
    """How the worker saves, and where its kills are aimed."""

    name: str
    codec: str
    deltas: int | None = None
    async_save: bool = False
    #: "prune": most kills land just after retention starts deleting
    aim: Literal["save", "prune"] = "save"
    #: the big tensor is written by an optimizer's step(), so an async save copies it while
    #: the worker goes on and that step() waits for the copy (see ckptwise.snapshot.copying)
    overlap: bool = False

    def manager(self, root: Path, keep: cw.RetentionPolicy) -> cw.CheckpointManager:
        return cw.CheckpointManager(
            root,
            save=cw.every(1),
            keep=keep,
            codec=self.codec,
            deltas=self.deltas,
            async_save=self.async_save,
        )


MODES = {
    m.name: m
    for m in (
        Mode("sync", "raw"),
        Mode("async", "raw", async_save=True),
        Mode("async-overlap", "raw", async_save=True, overlap=True),
        Mode("zstd", "zstd"),
        Mode("bytegroup", "bytegroup"),
        Mode("auto", "auto"),
        Mode("deltas", "bytegroup", deltas=4),
        Mode("prune", "raw", aim="prune"),
        Mode("async-deltas-prune", "bytegroup", deltas=4, async_save=True, aim="prune"),
    )
}


# -- the training state: a function of the step -----------------------------------------------

_BASE: list[torch.Tensor] = []


def _base() -> torch.Tensor:
    if not _BASE:
        _BASE.append(torch.randn(BIG, generator=torch.Generator().manual_seed(20240611)))
    return _BASE[0]


def expected(step: int) -> dict[str, Any]:
    """The worker's state at ``step``: a big float tensor that drifts a little each step (so
    deltas pay), a small one that changes, a frozen one (dedup) and a plain value."""
    return {
        "weights": _base() * (1.0 + step * 2.0**-20),
        "counter": torch.full((SMALL,), step, dtype=torch.int64),
        "frozen": torch.arange(FROZEN, dtype=torch.int64),
        "meta": {"step": step, "tag": f"step-{step}"},
    }


class Setter(torch.optim.Optimizer):
    """An optimizer whose ``step()`` writes the next step's weights in place, as training's
    optimizer would (so torch's pre-step hooks see the write)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__([weights], {"lr": 0.0})
        self.target: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert self.target is not None
        for group in self.param_groups:
            for param in group["params"]:
                param.copy_(self.target)


def with_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with a :class:`Setter` over its weights (for modes with ``overlap``)."""
    return {**state, "optimizer": Setter(state["weights"])}


def advance(state: dict[str, Any], step: int) -> None:
    """Turn ``state`` into :func:`expected` ``(step)`` in place, as training would."""
    new = expected(step)
    if "optimizer" in state:
        state["optimizer"].target = new["weights"]
        state["optimizer"].step()
    else:
        state["weights"].copy_(new["weights"])
    state["counter"].copy_(new["counter"])
    state["meta"] = new["meta"]


def mismatch(values: Mapping[str, Any], step: int) -> str:
    """What differs between ``values`` and the state at ``step``; empty when they are equal
    (an ``optimizer`` entry, which holds no tensors, is left out of the comparison)."""
    want = expected(step)
    values = {k: v for k, v in values.items() if k != "optimizer"}
    if set(values) != set(want):
        return f"keys {sorted(values)} instead of {sorted(want)}"
    for key, value in want.items():
        got = values[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return f"{key!r} is a {type(got).__name__}, not a tensor"
            if got.dtype != value.dtype or got.shape != value.shape:
                return f"{key!r} is {got.dtype} {tuple(got.shape)}"
            if not torch.equal(got, value):
                return f"{key!r} holds other values"
        elif got != value:
            return f"{key!r} is {got!r} instead of {value!r}"
    return ""


# -- the worker ---------------------------------------------------------------------------------


def say(word: str, step: int) -> None:
    sys.stdout.write(f"{word} {step}\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Announced:
    """A retention policy that prints ``pruning N`` when it lets checkpoints go, so the
    killer can aim at the deletions that follow (the manager may still keep the step it
    resumed from)."""

    inner: cw.RetentionPolicy

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        kept = self.inner.select(context)
        steps = {c.step for c in context.checkpoints}
        if steps - set(kept):
            say("pruning", max(steps))
        return kept


def worker(root: Path, mode: Mode) -> int:
    """Resume from the newest checkpoint and save every step until killed."""
    say("opening", 0)
    manager = mode.manager(root, Announced(cw.keep_last(2)))
    state = with_optimizer(expected(0)) if mode.overlap else expected(0)
    start = manager.restore(state)
    if start and mismatch(state, start):
        say("bad-resume", start)
        return 3
    say("resumed", start)
    step = start
    while True:
        step += 1
        advance(state, step)
        say("saving", step)
        decision = manager.step(step, state)
        if mode.async_save:
            newest = manager.run.latest_step()  # listed only once its manifest is durable
            if newest is not None:
                say("committed", newest)
        elif decision.save:
            say("committed", step)


# -- killing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where one kill lands: ``after`` steps past the resumed one, ``fraction`` of the way
    into the phase (opening the run, a save, a prune) that ``kind`` names."""

    kind: Kind
    after: int
    fraction: float

    @classmethod
    def draw(cls, rng: random.Random, mode: Mode) -> Plan:
        r = rng.random()
        kind: Kind
        if r < 0.12:
            kind = "open"
        elif mode.aim == "prune" and r < 0.8:
            kind = "prune"
        else:
            kind = "save"
        return cls(kind, after=rng.randint(1, 4), fraction=rng.random())


@dataclass
class Outcome:
    """What the killer saw of one worker."""

    committed: set[int] = field(default_factory=set)
    resumed: int | None = None
    last_saving: int | None = None
    killed: bool = False
    error: str = ""
    bad_resume: int | None = None


Line = tuple[float, str, int]


def _pump(stream: IO[str], lines: queue.Queue[Line | None]) -> None:
    for raw in stream:
        parts = raw.split()
        if len(parts) == 2 and parts[1].isdigit():
            lines.put((time.monotonic(), parts[0], int(parts[1])))
    lines.put(None)


def _window(samples: list[float], guess: float) -> float:
    return statistics.median(samples[-5:]) if samples else guess


def kill_worker(root: Path, mode: Mode, plan: Plan, stderr_path: Path) -> Outcome:
    """Start a worker on ``root``, SIGKILL it where ``plan`` says, and report what it said."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root)]
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [*cmd, "--mode", mode.name], stdout=subprocess.PIPE, stderr=err, text=True
        )
    assert proc.stdout is not None
    lines: queue.Queue[Line | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    out = Outcome()
    deadline = time.monotonic() + STALL
    kill_at: float | None = None
    target: int | None = None
    saving_at: dict[int, float] = {}
    pruning_at: dict[int, float] = {}
    save_windows: list[float] = []
    prune_windows: list[float] = []
    exited = False
    while True:
        now = time.monotonic()
        until = kill_at if kill_at is not None else deadline
        if now >= until:
            break
        try:
            item = lines.get(timeout=until - now)
        except queue.Empty:
            continue
        if item is None:
            exited = True
            break
        at, word, step = item
        _record(out, word, step)
        if word == "opening" and plan.kind == "open" and kill_at is None:
            kill_at = at + plan.fraction * OPEN_WINDOW
        elif word == "resumed":
            target = step + plan.after
        elif word == "saving":
            if mode.async_save and saving_at:
                save_windows.append(at - saving_at[max(saving_at)])  # one save in flight
            saving_at[step] = at
            if plan.kind == "save" and target is not None and step >= target and kill_at is None:
                kill_at = at + plan.fraction * 1.2 * _window(save_windows, SAVE_GUESS)
        elif word == "pruning":
            pruning_at[step] = at
            aimed = target is not None and step >= max(target, 3)
            if plan.kind == "prune" and aimed and kill_at is None:
                kill_at = at + plan.fraction * 1.2 * _window(prune_windows, PRUNE_GUESS)
        elif word == "committed" and not mode.async_save:
            if step in saving_at:
                save_windows.append(at - saving_at[step])
            if step in pruning_at:
                prune_windows.append(at - pruning_at[step])
    if not exited and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    pump.join(timeout=60)
    while True:  # what it printed before it died
        try:
            item = lines.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            _record(out, item[1], item[2])
    out.killed = proc.returncode == -signal.SIGKILL and not exited and kill_at is not None
    if not out.killed:
        tail = stderr_path.read_text(errors="replace")[-2000:]
        why = "stalled" if kill_at is None and not exited else f"exited {proc.returncode}"
        out.error = f"worker {why} before its kill point; stderr:\n{tail}"
    return out


def _record(out: Outcome, word: str, step: int) -> None:
    if word == "committed":
        out.committed.add(step)
    elif word == "resumed":
        out.resumed = step
    elif word == "saving":
        out.last_saving = step
    elif word == "bad-resume":
        out.bad_resume = step


# -- checking -----------------------------------------------------------------------------------


@dataclass
class Findings:
    """What the checks after one kill found; every list holds one message per failure."""

    checked: int = 0
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    reopen: list[str] = field(default_factory=list)
    codecs: set[str] = field(default_factory=set)
    steps: list[int] = field(default_factory=list)
    #: whether the kill left temporary files or unreferenced objects (it cut an operation)
    debris: bool = False

    def failures(self) -> Iterator[str]:
        for kind in ("lost", "corrupt", "wrong", "foreign", "reopen"):
            for message in getattr(self, kind):
                yield f"{kind}: {message}"


def check_run(root: Path, committed: set[int]) -> Findings:
    """Checks 1 and 2 on the run at ``root``, read-only; ``committed`` holds every step
    reported committed on this folder so far."""
    found = Findings()
    try:
        run = cw.open_run(root)
        present = run.steps()
        found.steps = present
        for path, why in run.unreadable.items():
            found.corrupt.append(f"manifest {path} cannot be read: {why}")
        for problem in run.verify():
            found.corrupt.append(f"verify: {problem}")
        stored = {p.name for p in (root / "objects").rglob("*") if p.is_file()}
        found.debris = bool(stored - set(run.object_bytes())) or any(
            ".tmp-" in p.name for p in root.rglob("*")
        )
        for step in present:
            found.checked += 1
            found.codecs.update(e.codec for e in run.manifest(step).tensors.values())
            try:
                values = run.load(step)
            except cw.CheckpointError as exc:
                found.corrupt.append(f"step {step} does not load: {exc}")
                continue
            differs = mismatch(values, step)
            if differs:
                found.wrong.append(f"step {step} loads other values: {differs}")
    except cw.CheckpointError as exc:
        found.corrupt.append(f"reading the run failed: {type(exc).__name__}: {exc}")
        return found
    except Exception:
        found.foreign.append(f"reading the run raised:\n{traceback.format_exc()}")
        return found
    for step in sorted(committed):
        newer = sum(p > step for p in present)
        # keep_last(2) deletes a step only once two newer ones are committed
        if step not in present and newer < 2:
            found.lost.append(
                f"step {step} was reported committed and is gone with only {newer} newer "
                f"checkpoint(s) left (steps now: {present})"
            )
    return found


def check_writer(root: Path, mode: Mode, found: Findings) -> int | None:
    """Check 3: a new writer opens the run, cleans it, restores the newest checkpoint and
    saves the next step; returns that step (None when it could not)."""
    newest = max(found.steps, default=0)
    step = newest + 1
    try:
        with mode.manager(root, cw.keep_last(2)) as manager:
            debris = sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name)
            if debris:
                found.reopen.append(f"temporary files left after opening: {debris}")
            stored = {p.name for p in (root / "objects").rglob("*") if p.is_file()}
            unreferenced = stored - set(manager.run.object_bytes())
            if unreferenced:
                found.reopen.append(f"{len(unreferenced)} unreferenced object(s) left")
            state = with_optimizer(expected(0)) if mode.overlap else expected(0)
            restored = manager.restore(state)
            if restored != newest:
                found.reopen.append(f"restore() gave step {restored}, the newest is {newest}")
            elif newest and mismatch(state, newest):
                found.wrong.append(f"restore of step {newest}: {mismatch(state, newest)}")
            advance(state, step)
            manager.step(step, state)
            manager.wait()
        run = cw.open_run(root)
        if step not in run.steps():
            found.reopen.append(f"step {step} saved by the new writer is not listed")
            return None
        problems = run.verify([step])
        if problems:
            found.corrupt.extend(f"new writer's step {step}: {p}" for p in problems)
        differs = mismatch(run.load(step), step)
        if differs:
            found.wrong.append(f"new writer's step {step}: {differs}")
    except cw.CheckpointError as exc:
        found.reopen.append(f"new writer failed: {type(exc).__name__}: {exc}")
        return None
    except Exception:
        found.foreign.append(f"new writer raised:\n{traceback.format_exc()}")
        return None
    return step


# -- the campaign -------------------------------------------------------------------------------


@dataclass
class Tally:
    """One row of the table."""

    kills: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: {"open": 0, "save": 0, "prune": 0})
    #: kills inside a step, by whether that step's checkpoint had committed: "no", "yes"
    landed: dict[str, int] = field(default_factory=lambda: {"no": 0, "yes": 0})
    debris: int = 0
    checked: int = 0
    lost: int = 0
    corrupt: int = 0
    wrong: int = 0
    foreign: int = 0
    worker: int = 0
    reopen: int = 0
    codecs: set[str] = field(default_factory=set)

    def add(self, found: Findings) -> None:
        self.checked += found.checked
        self.debris += found.debris
        self.lost += len(found.lost)
        self.corrupt += len(found.corrupt)
        self.wrong += len(found.wrong)
        self.foreign += len(found.foreign)
        self.reopen += len(found.reopen)
        self.codecs |= found.codecs

    @property
    def failed(self) -> int:
        return self.lost + self.corrupt + self.wrong + self.foreign + self.worker + self.reopen


def schedule(count: int, modes: list[Mode]) -> list[tuple[Mode, int]]:
    """Runs as (mode, kills on one folder): ``count`` kills spread over ``modes``, each mode's
    split into fresh folders and chains, interleaved so that a short campaign covers all."""
    per_mode = [count // len(modes) + (i < count % len(modes)) for i in range(len(modes))]
    runs: list[list[tuple[Mode, int]]] = []
    for mode, n in zip(modes, per_mode, strict=True):
        mine: list[tuple[Mode, int]] = []
        i = 0
        while n > 0:
            length = min(CHAINS[i % len(CHAINS)], n)
            mine.append((mode, length))
            n -= length
            i += 1
        runs.append(mine)
    order: list[tuple[Mode, int]] = []
    for i in range(max((len(r) for r in runs), default=0)):
        order.extend(r[i] for r in runs if i < len(r))
    return order


def campaign(count: int, modes: list[Mode], seed: int, workdir: Path) -> dict[str, Tally]:
    rng = random.Random(seed)
    tallies = {m.name: Tally() for m in modes}
    done = 0
    for number, (mode, length) in enumerate(schedule(count, modes)):
        root = workdir / f"{number:03d}-{mode.name}"
        committed: set[int] = set()
        failed = False
        for position in range(length):
            done += 1
            plan = Plan.draw(rng, mode)
            tally = tallies[mode.name]
            tally.kills += 1
            tally.kinds[plan.kind] += 1
            stderr_path = workdir / f"{root.name}.kill{position}.stderr"
            out = kill_worker(root, mode, plan, stderr_path)
            committed |= out.committed
            if out.resumed:
                committed.add(out.resumed)  # restored, so it had committed
            found = check_run(root, committed)
            if plan.kind != "open" and out.last_saving is not None:
                tally.landed["yes" if out.last_saving in found.steps else "no"] += 1
            if out.bad_resume is not None:
                found.wrong.append(f"the worker restored other values at step {out.bad_resume}")
            saved = check_writer(root, mode, found)
            if saved is not None:
                committed.add(saved)
            tally.add(found)
            problems = list(found.failures())
            if out.error:
                tally.worker += 1
                problems.append(out.error)
            where = f"at {plan.kind} {plan.fraction:.2f} (+{plan.after})"
            state = "ok" if not problems else f"FAILED ({len(problems)})"
            print(
                f"[{done}/{count}] {root.name} kill {position + 1}/{length} {where}: resumed "
                f"{out.resumed}, saving {out.last_saving}, reported "
                f"{max(out.committed, default=None)}; steps {found.steps} {state}",
                flush=True,
            )
            for problem in problems:
                print(f"    {problem}", flush=True)
            if problems:
                failed = True
                break  # keep the folder as the failure left it
            stderr_path.unlink(missing_ok=True)
        if not failed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"    run folder kept: {root}", flush=True)
    return tallies


def table(tallies: Mapping[str, Tally]) -> str:
    head = (
        "mode",
        "kills",
        "open/save/prune",
        "in-flight step committed no/yes",
        "left debris",
        "checked",
        "lost",
        "corrupt",
        "wrong",
        "non-ckptwise exc",
        "worker died",
        "reopen failed",
        "codecs seen",
    )
    total = Tally()
    rows: list[tuple[str, ...]] = []
    for name, t in [*tallies.items(), ("total", total)]:
        if name != "total":
            total.kills += t.kills
            for kind, n in t.kinds.items():
                total.kinds[kind] += n
            for landed, n in t.landed.items():
                total.landed[landed] += n
            for attr in (
                "debris",
                "checked",
                "lost",
                "corrupt",
                "wrong",
                "foreign",
                "worker",
                "reopen",
            ):
                setattr(total, attr, getattr(total, attr) + getattr(t, attr))
            total.codecs |= t.codecs
        kinds = "/".join(str(t.kinds[k]) for k in ("open", "save", "prune"))
        landed = f"{t.landed['no']}/{t.landed['yes']}"
        numbers = (
            t.kills,
            kinds,
            landed,
            t.debris,
            t.checked,
            t.lost,
            t.corrupt,
            t.wrong,
            t.foreign,
        )
        rest = (t.worker, t.reopen, ",".join(sorted(t.codecs)))
        rows.append((name, *map(str, numbers), *map(str, rest)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=24, help="kills in all (default 24)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill plans")
    parser.add_argument(
        "--mode",
        action="append",
        choices=sorted(MODES),
        help="a mode to run (repeatable; default: all)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where run folders go")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, MODES[(args.mode or ["sync"])[0]])
    if args.count < 1:
        parser.error("--count must be at least 1")
    modes = [MODES[name] for name in dict.fromkeys(args.mode or MODES)]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ckptwise-kill9-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"kill9: {args.count} kills, seed {seed}, workdir {workdir}", flush=True)
    started = time.monotonic()
    tallies = campaign(args.count, modes, seed, workdir)
    print()
    print(table(tallies))
    failed = sum(t.failed for t in tallies.values())
    minutes = (time.monotonic() - started) / 60
    print(
        f"\n{'FAILED' if failed else 'OK'}: {failed} failure(s) in {minutes:.1f} min, seed {seed}"
    )
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
