"""The ``ckptwise`` command line: a thin layer over the public API.

``ls``, ``verify``, ``pin`` and ``unpin`` live here; ``simulate`` in
:mod:`ckptwise.cli.simulate_cmd`; ``show``, ``du``, ``diff`` and ``export`` in
:mod:`ckptwise.cli.storage`. Commands open a run read-only (no lock, nothing deleted);
``pin`` and ``unpin`` only create or delete the run's ``pins/<step>`` file, which a
training process checks before it deletes that step.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

try:
    import click
    from rich.console import Console
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        f"the ckptwise command line needs its extra ({exc.name} is missing): "
        "pip install 'ckptwise[cli]'"
    ) from exc

from ckptwise.cli.common import human_size, open_cli_run
from ckptwise.cli.simulate_cmd import simulate_command
from ckptwise.cli.storage import (
    archive_command,
    diff_command,
    du_command,
    export_command,
    show_command,
)
from ckptwise.errors import CheckpointError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptwise")
def cli() -> None:
    """Inspect, verify and manage ckptwise checkpoint runs."""


@cli.command("ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--branch", help="List a branch of checkpoints a rollback set aside instead.")
def ls_command(run: str, as_json: bool, branch: str | None) -> None:
    """List the committed checkpoints of RUN (a folder or fsspec URL)."""
    opened = open_cli_run(run)
    branches = opened.branches()
    if branch is not None:
        try:
            opened = opened.branch(branch)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from exc
        branches = {}
    kept = opened.kept()
    pins = opened.pins()
    rows: list[dict[str, Any]] = []
    for info in opened.checkpoints():
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
    if as_json:
        doc = {
            "run": run,
            "checkpoints": rows,
            "physical_bytes": opened.physical_bytes(),
            "unreadable": opened.unreadable,
            "branches": branches,
        }
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    table = Table(title=f"{run}: {len(rows)} checkpoint(s)")
    columns = (
        "step",
        "time",
        "saved because",
        "holds",
        "metrics",
        "bytes",
        "written",
        "kept because",
    )
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("step", "bytes", "written") else "left"
        )
    for row in rows:
        table.add_row(
            str(row["step"]),
            datetime.fromisoformat(row["time"]).strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(row["reasons"]),
            row["holds"],
            ", ".join(f"{k}={v:.4g}" for k, v in row["metrics"].items()),
            human_size(row["logical_bytes"]),
            human_size(row["new_bytes"]),
            ", ".join(row["kept_because"]),
        )
    console = Console()
    console.print(table)
    console.print(f"on disk: {human_size(opened.physical_bytes())} (each object counted once)")
    for path, problem in opened.unreadable.items():
        console.print(f"[red]unreadable manifest[/red] {path}: {problem}")
    for name, steps in branches.items():
        console.print(
            f"branch {name}: step(s) {', '.join(map(str, steps))}, set aside when training "
            f"went back (list them with: ckptwise ls {run} --branch {name})"
        )


@cli.command("verify")
@click.argument("run")
@click.option("--step", "steps", type=int, multiple=True, help="Only these steps (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def verify_command(run: str, steps: tuple[int, ...], as_json: bool) -> None:
    """Check every object of RUN against its checksum; exit 1 if any fails."""
    opened = open_cli_run(run)
    try:
        problems = opened.verify(list(steps) or None)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    checked = list(steps) if steps else opened.steps()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run": run,
                    "checked_steps": checked,
                    "ok": not problems,
                    "problems": [
                        {"step": p.step, "tensor": p.tensor, "message": p.message} for p in problems
                    ],
                },
                indent=2,
            )
        )
    else:
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        click.echo(f"verified {len(checked)} checkpoint(s) in {run}: {status}")
    sys.exit(1 if problems else 0)


@cli.command("pin")
@click.argument("run")
@click.argument("step", type=int)
def pin_command(run: str, step: int) -> None:
    """Keep STEP of RUN whatever the retention policy says (until `ckptwise unpin`)."""
    opened = open_cli_run(run)
    try:
        opened.pin(step)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pinned step {step} of {run}: no writer deletes it until `ckptwise unpin`")


@cli.command("unpin")
@click.argument("run")
@click.argument("step", type=int)
def unpin_command(run: str, step: int) -> None:
    """Let the retention policy decide about STEP of RUN again (at the next save)."""
    opened = open_cli_run(run)
    try:
        if step not in opened.pins():
            raise click.ClickException(f"step {step} of {run} is not pinned")
        opened.unpin(step)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
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
