"""The ``ckptwise`` command line: a thin layer over the public API.

``ls``, ``verify``, ``pin`` and ``unpin`` live here; ``simulate`` in
:mod:`ckptwise.cli.simulate_cmd`; ``show``, ``du``, ``diff`` and ``export`` in
:mod:`ckptwise.cli.storage`. Commands open a run read-only (no lock, nothing deleted);
``pin`` and ``unpin`` only create or delete the run's ``pins/<step>`` file, which a
training process checks before it deletes that step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any

try:
    import click
    import rich  # noqa: F401  (checked here: the tables need it)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        f"the ckptwise command line needs its extra ({exc.name} is missing): "
        "pip install 'ckptwise[cli]'"
    ) from exc

from ckptwise.cli.common import (
    JsonErrorGroup,
    echo_json,
    human_size,
    open_cached_run,
    open_cli_run,
    rank_folders,
)
from ckptwise.cli.ranking import run_ranking, unknown_metric
from ckptwise.cli.simulate_cmd import simulate_command
from ckptwise.cli.storage import (
    archive_command,
    diff_command,
    du_command,
    export_command,
    show_command,
)
from ckptwise.cli.table import Column, print_table
from ckptwise.errors import CheckpointError

__all__ = ["cli", "main"]


@click.group(cls=JsonErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptwise")
def cli() -> None:
    """Inspect, verify and manage ckptwise checkpoint runs.

    RUN is the folder (or fsspec URL) given to CheckpointManager; a Trainer's attach() writes
    to OUTPUT_DIR/ckptwise. Every command takes --json: one JSON document on stdout, a
    failure's too ({"error": {"type", "message", "exit_code"}}, the message also on stderr).
    """


@cli.command("ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--branch", help="List a branch of checkpoints a rollback set aside instead.")
@click.option(
    "--metrics",
    "extra_metrics",
    metavar="A,B",
    help="Also show these recorded metrics (the one the run's policy ranks by is shown).",
)
@click.option(
    "--cache",
    metavar="DIR",
    multiple=True,
    help="The writer's local cache folder (cache=): also list what it has not uploaded "
    "yet, and show where each checkpoint is durable (local, uploading, remote). For a job "
    "of several ranks, each node's cache folder (repeat --cache for several nodes): the "
    "state is shown per rank.",
)
def ls_command(
    run: str,
    as_json: bool,
    branch: str | None,
    extra_metrics: str | None,
    cache: tuple[str, ...],
) -> None:
    """List the committed checkpoints of RUN (a folder or fsspec URL)."""
    states: dict[int, str] | None = None
    by_rank: dict[str, dict[int, str]] = {}
    if not cache:
        opened = open_cli_run(run)
    else:
        folders, single = rank_folders(cache)
        first = folders.get(0)
        opened = open_cli_run(run) if first is None else open_cached_run(run, first)
        if first is not None:
            states = dict(opened.upload_states() or {})
        if not single:
            by_rank = {
                f"rank {r}": dict(opened.rank_upload_states(f)) for r, f in folders.items() if r > 0
            }
            if first is not None:
                by_rank = {"rank 0": states or {}, **by_rank}
            states = {
                info.step: _worst(ranks.get(info.step, "remote") for ranks in by_rank.values())
                for info in opened.checkpoints()
            }
    branches = opened.branches()
    if branch is not None:
        try:
            opened = opened.branch(branch)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from exc
        branches = {}
        states = None  # uploads are tracked for the main line
    kept = opened.kept()
    pins = opened.pins()
    infos = opened.checkpoints()
    ranking = run_ranking(opened, infos)
    shown = [m.strip() for m in (extra_metrics or "").split(",") if m.strip()]
    for metric in shown:
        problem = unknown_metric(metric, infos)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--metrics")
    rows: list[dict[str, Any]] = []
    for info in infos:
        why = list(kept.get(info.step, []))
        if info.step in pins and "pinned" not in why:
            why.append("pinned")
        rows.append(
            {
                "step": info.step,
                "time": info.time.isoformat(),
                "reasons": list(info.reasons),
                "holds": info.variant,
                "metrics": dict(info.metrics),
                "logical_bytes": info.logical_bytes,
                "new_bytes": info.new_bytes,
                "kept_because": why,
            }
        )
        if states is not None:
            rows[-1]["upload"] = states.get(info.step, "remote")
        if by_rank:
            rows[-1]["uploads"] = {r: st.get(info.step, "remote") for r, st in by_rank.items()}
    physical = opened.physical_bytes()
    if as_json:
        echo_json(
            {
                "run": run,
                "checkpoints": rows,
                "ranked_by": None
                if ranking is None
                else {"metric": ranking.metric, "policy": ranking.policy, "mode": ranking.mode},
                "physical_bytes": physical,
                "unreadable": opened.unreadable,
                "branches": branches,
            }
        )
        return
    metrics = ([ranking.metric] if ranking else []) + [
        m for m in shown if not ranking or m != ranking.metric
    ]
    when, title_when = _times([info.time for info in infos])
    slim = any(row["holds"] != "full" for row in rows)  # else "what it holds" says nothing
    columns = [Column("step", numeric=True), Column("time"), Column("saved because", wrap=True)]
    columns += [Column("holds")] if slim else []
    columns += [Column(m, numeric=True) for m in metrics]
    columns += [Column("bytes", numeric=True)]
    columns += [Column("upload")] if states is not None else []
    columns += [Column("kept because", wrap=True)]
    table: list[list[str]] = []
    for row, time in zip(rows, when, strict=True):
        cells = [str(row["step"]), time, ", ".join(row["reasons"])]
        cells += [row["holds"]] if slim else []
        cells += [_number(row["metrics"].get(m)) for m in metrics]
        cells += [human_size(row["logical_bytes"])]
        if states is not None:
            waiting = [r for r, st in row.get("uploads", {}).items() if st != "remote"]
            cells += [row["upload"] + (f" ({', '.join(waiting)})" if waiting else "")]
        cells += [", ".join(row["kept_because"])]
        table.append(cells)
    print_table(f"{run}: {len(rows)} checkpoint(s){title_when}", columns, table)
    click.echo(f"on disk: {human_size(physical)} (each object counted once)")
    if ranking is not None:
        click.echo(f"ranked by {ranking.describe()}")
    for path, problem in opened.unreadable.items():
        click.echo(f"unreadable manifest {path}: {problem}")
    for name, steps in branches.items():
        click.echo(
            f"branch {name}: step(s) {', '.join(map(str, steps))}, set aside when training "
            f"went back (list them with: ckptwise ls {run} --branch {name})"
        )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _times(times: list[datetime]) -> tuple[list[str], str]:
    """Each time in local time, as short as the run allows (the date once, in the title,
    when every checkpoint is from the same day); and the title's part."""
    local = [t.astimezone() for t in times]
    days = {t.date() for t in local}
    if len(days) == 1:
        return [t.strftime("%H:%M:%S") for t in local], f", saved {days.pop().isoformat()}"
    return [t.strftime("%Y-%m-%d %H:%M") for t in local], ""


@cli.command("verify")
@click.argument("run")
@click.option("--step", "steps", type=int, multiple=True, help="Only these steps (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def verify_command(run: str, steps: tuple[int, ...], as_json: bool) -> None:
    """Check every object of RUN against its checksum; exit 1 if any fails or none is there."""
    opened = open_cli_run(run)
    try:
        problems = opened.verify(list(steps) or None)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    checked = list(steps) if steps else opened.steps()
    empty = (
        f"{run} has no committed checkpoint to verify: nothing was checked" if not checked else None
    )
    if as_json:
        echo_json(
            {
                "run": run,
                "checked_steps": checked,
                "ok": not problems and not empty,
                "problems": [
                    {"step": p.step, "tensor": p.tensor, "message": p.message} for p in problems
                ],
                **({"error": empty} if empty else {}),
            }
        )
    else:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        if empty:
            click.echo(f"Error: {empty}", err=True)
        else:
            status = "ok" if not problems else f"{len(problems)} problem(s)"
            click.echo(f"verified {len(checked)} checkpoint(s) in {run}: {status}")
    sys.exit(1 if problems or empty else 0)


@cli.command("pin")
@click.argument("run")
@click.argument("step", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def pin_command(run: str, step: int, as_json: bool) -> None:
    """Keep STEP of RUN whatever the retention policy says (until `ckptwise unpin`)."""
    opened = open_cli_run(run)
    try:
        opened.pin(step)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json({"run": run, "step": step, "pinned": True, "pins": sorted(opened.pins())})
        return
    click.echo(f"pinned step {step} of {run}: no writer deletes it until `ckptwise unpin`")


@cli.command("unpin")
@click.argument("run")
@click.argument("step", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def unpin_command(run: str, step: int, as_json: bool) -> None:
    """Let the retention policy decide about STEP of RUN again (at the next save)."""
    opened = open_cli_run(run)
    try:
        if step not in opened.pins():
            raise click.ClickException(f"step {step} of {run} is not pinned")
        opened.unpin(step)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json({"run": run, "step": step, "pinned": False, "pins": sorted(opened.pins())})
        return
    click.echo(f"unpinned step {step} of {run}")


for command in (
    simulate_command,
    show_command,
    du_command,
    diff_command,
    export_command,
    archive_command,
):
    cli.add_command(command)


def main() -> None:
    """Entry point of the ``ckptwise`` console script."""
    cli(prog_name="ckptwise")


def _worst(states: Iterable[str]) -> str:
    """The least durable of several ranks' upload states."""
    order = ["local", "uploading", "remote"]
    return min(states, key=order.index, default="remote")
