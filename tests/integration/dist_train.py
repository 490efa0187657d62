"""A small job for ``torchrun`` (gloo, CPU) that saves with ckptwise on every rank.

``torchrun --nproc_per_node 2 dist_train.py RUN OUT --mode ddp --steps 20`` trains an MLP
(its first layer frozen) wrapped in DDP or sharded with FSDP2's ``fully_shard``, each rank
on its own random batches (its RNG, saved per rank, draws them), and writes ``OUT/rankR.json``:
each step's loss as an exact hex float, which steps saved and why, what it restored from,
what went wrong, and (``--dump``) the whole model and optimizer state, gathered from the
shards, after the restore and at the end (``--dump-step S``: also after step S).

``--data full`` gives every rank the same batch of each step instead, drawn from a generator
seeded by the step: the averaged gradient is then every rank's own, exactly (on up to two
ranks), so a run trains bit-identically on one rank or two and a resume on another number of
ranks can be compared with an uninterrupted run bit for bit. Each rank's RNG is still
seeded apart from the others' and saved: each step draws one number from it (recorded, as a
dropout mask would draw, without touching the loss), and the job records a digest of it
before and after the restore and at each save, and the ``RestoreWarning`` lines the restore
gave.

Faults for the tests: ``--skew`` makes rank R's clock run ``1 + R * skew`` times as fast;
``--stop-at S`` ends every rank after step S as a preemption would; ``--kill-rank R
--kill-step S`` SIGKILLs rank R in the middle of step S's save; ``--fail-rank R
--fail-step S`` makes rank R's object writes raise at step S; ``--signal-rank R
--signal-step S`` sends SIGUSR1 to rank R after step S.

Remote runs: ``RUN`` may be an ``s3://`` URL, reached with the storage options in the
environment variable ``CKPTWISE_TEST_S3`` (JSON); ``--cache DIR`` writes it through the
node's cache folder DIR; ``--slow-uploads SECONDS`` makes each object upload of the ranks of
node ``--slow-node`` (torchrun's ``GROUP_RANK``) take that much longer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ckptwise as cw
from ckptwise.store import CheckpointStore

WIDTH = 24


def build(mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(WIDTH, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3)
    )
    model[0].requires_grad_(False)  # a frozen "vision tower": stored once
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        trained: nn.Module = model
    else:
        trained = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-2)
    return trained, opt


class SkewedClock:
    """A fake clock that moves ``rate`` seconds per step: ranks disagree about the time."""

    def __init__(self, rate: float) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.rate = rate

    def __call__(self) -> datetime:
        return self.now

    def tick(self) -> None:
        self.now += timedelta(seconds=self.rate)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model weights and optimizer state as whole tensors (gathered from shards)."""

    def whole(value: Any) -> Any:
        if hasattr(value, "full_tensor"):
            return value.full_tensor()
        return value

    weights = {k: whole(v).tolist() for k, v in model.state_dict().items()}
    moments = {
        f"{i}/{k}": whole(v).tolist()
        for i, s in opt.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return {"weights": weights, "moments": moments}


def rng_digest() -> str:
    """A digest of this process's torch RNG state."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save", default="every(5)")
    parser.add_argument("--keep", default="last(3)")
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=0)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--capture-fail-rank", type=int, default=-1)
    parser.add_argument("--capture-fail-step", type=int, default=0)
    parser.add_argument("--signal-rank", type=int, default=-1)
    parser.add_argument("--signal-step", type=int, default=0)
    parser.add_argument("--restore-step", type=int, default=None)
    parser.add_argument("--dump", action="store_true")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--slow-uploads", type=float, default=0.0)
    parser.add_argument("--slow-node", default="1")
    parser.add_argument("--dump-step", type=int, default=0)
    parser.add_argument("--data", choices=["rank", "full"], default="rank")
    parser.add_argument("--sync", action="store_true", help="async_save=False")
    parser.add_argument("--defer", action="store_true", help="defer_copy=True")
    parser.add_argument(
        "--check-saves",
        action="store_true",
        help="record the state at each save's step(), slow the writes down so training "
        "changes the live tensors while they run, and at the end restore every checkpoint "
        "into a fresh model and optimizer and compare",
    )
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"rank": rank, "world": dist.get_world_size(), "losses": {}}
    record["saves"], record["errors"] = [], []

    def flush() -> None:
        (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))

    if args.slow_uploads and os.environ.get("GROUP_RANK") == args.slow_node:
        from nodes_job import slow_uploads

        slow_uploads(args.slow_uploads)
    remote = os.environ.get("CKPTWISE_TEST_S3")
    model, opt = build(args.mode)
    clock = SkewedClock(1.0 + rank * args.skew)
    torch.manual_seed(100 + rank)  # each rank draws its own batches; saved per rank
    manager = cw.CheckpointManager(
        args.run,
        save=cw.parse_save(args.save),
        keep=cw.parse_keep(args.keep),
        clock=clock,
        async_save=not args.sync,
        defer_copy=args.defer,
        dist_timeout=timedelta(seconds=60),
        cache=args.cache,
        storage_options=None if remote is None else json.loads(remote),
    )
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    record["rng_before"] = rng_digest()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cw.RestoreWarning)
        start = manager.restore(state, step=args.restore_step)
    record["warnings"] = [str(w.message) for w in caught if w.category is cw.RestoreWarning]
    record["rng_after"] = rng_digest()
    record["restored"] = start
    if args.dump:
        record["state"] = full_state(model, opt)
        flush()
    real_write = CheckpointStore.write_objects

    def faulty_write(store: CheckpointStore, new: Any, **options: Any) -> Any:
        # on the writer thread of a background save: the step it writes, not the loop's
        saving = manager._pipeline.saving
        if rank == args.kill_rank and saving == args.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == args.fail_rank and saving == args.fail_step:
            raise OSError(28, "No space left on device (injected)")
        if args.check_saves:
            time.sleep(0.3)  # the next steps change the live tensors meanwhile
        return real_write(store, new, **options)

    CheckpointStore.write_objects = faulty_write  # type: ignore[method-assign,assignment]
    target = torch.randn(WIDTH, 3, generator=torch.Generator().manual_seed(7))
    at_save: dict[int, dict[str, Any]] = {}
    current = start
    try:
        for current in range(start + 1, args.steps + 1):
            if args.data == "full":
                x = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(1000 + current))
                record.setdefault("draws", {})[current] = float(torch.rand(()).item()).hex()
            else:
                x = torch.randn(16, WIDTH)
            loss = (model(x) - x @ target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            record["losses"][current] = loss.item().hex()
            clock.tick()
            if rank == args.signal_rank and current == args.signal_step:
                os.kill(os.getpid(), signal.SIGUSR1)
            if rank == args.capture_fail_rank:
                # a value that cannot be saved, on one rank, at one step
                state.pop("bad", None)
                if current == args.capture_fail_step:
                    state["bad"] = {1, 2}
            try:
                decision = manager.step(
                    current, state, metrics={"loss": loss.item()}, final=current == args.steps
                )
            except cw.CheckpointError as exc:
                record["errors"].append([current, type(exc).__name__, str(exc)])
                continue
            if decision.save:
                record["saves"].append([current, list(decision.reasons)])
                record.setdefault("rng", {})[current] = rng_digest()  # as step() saved it
                flush()  # what a harness that kills the job waits for
                if args.check_saves:
                    at_save[current] = full_state(model, opt)
                    record.setdefault("copies", []).append(list(manager.last_copy))
            if current == args.dump_step:
                record["at_step"] = full_state(model, opt)
            if current == args.stop_at:
                flush()
                os._exit(0)  # preempted: no close(), no clean exit
    except SystemExit:
        record["exited_at"] = current
    if args.check_saves:
        # each checkpoint, restored on every rank, holds each rank's state at its step()
        record["save_checks"] = {}
        for step, expected in at_save.items():
            fresh, fresh_opt = build(args.mode)
            manager.restore({"model": fresh, "optimizer": fresh_opt}, step=step)
            record["save_checks"][step] = full_state(fresh, fresh_opt) == expected
    manager.close()
    if rank == 0:  # a manager that only reads, on one rank alone, must not wait for the others
        options = None if remote is None else json.loads(remote)
        record["latest"] = cw.open_run(args.run, storage_options=options).latest_step()
    if args.dump:
        record["final"] = full_state(model, opt)
    flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' helpers (nodes_job)
    sys.exit(main())
