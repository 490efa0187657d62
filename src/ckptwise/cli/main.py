"""The ``ckptwise`` commands: ``ls``, ``verify``, ``pin``/``unpin`` and ``simulate``.

Commands open a run read-only (no lock, nothing deleted) through
:class:`~ckptwise.CheckpointManager`; ``pin`` only edits the run's ``run.json``, which a
training process re-reads before it prunes. ``simulate`` replays a policy with
:func:`ckptwise.simulate.simulate`.
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

import ckptwise as cw
from ckptwise.config import (
    Policy,
    parse_bytes,
    parse_duration,
    parse_keep,
    parse_save,
    policy_from_config,
    to_config,
)
from ckptwise.errors import CheckpointError
from ckptwise.manager import CheckpointManager
from ckptwise.simulate import simulate

__all__ = ["cli", "main"]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _open(run: str) -> CheckpointManager:
    try:
        manager = CheckpointManager(run)
        if not manager.store.backend.list_files(""):
            raise click.ClickException(
                f"{run} holds no ckptwise run (no checkpoints/ or objects/ in it); "
                "pass the folder given to CheckpointManager"
            )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    return manager


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptwise")
def cli() -> None:
    """Inspect, verify and manage ckptwise checkpoint runs."""


@cli.command("ls")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls_command(run: str, as_json: bool) -> None:
    """List the committed checkpoints of RUN (a folder or fsspec URL)."""
    manager = _open(run)
    kept = manager.store.read_run_state().get("kept", {})
    pins = manager.pinned()
    rows: list[dict[str, Any]] = []
    for info in manager.checkpoints():
        why = list(kept.get(str(info.step), []))
        if info.step in pins and "pinned" not in why:
            why.append("pinned")
        rows.append(
            {
                "step": info.step,
                "time": info.time.isoformat(),
                "reasons": list(info.reasons),
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
            "physical_bytes": manager.store.physical_bytes(),
            "unreadable": manager.store.broken,
        }
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    table = Table(title=f"{run}: {len(rows)} checkpoint(s)")
    for column in ("step", "time", "saved because", "metrics", "bytes", "written", "kept because"):
        table.add_column(
            column, justify="right" if column in ("step", "bytes", "written") else "left"
        )
    for row in rows:
        table.add_row(
            str(row["step"]),
            datetime.fromisoformat(row["time"]).strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(row["reasons"]),
            ", ".join(f"{k}={v:.4g}" for k, v in row["metrics"].items()),
            _size(row["logical_bytes"]),
            _size(row["new_bytes"]),
            ", ".join(row["kept_because"]),
        )
    console = Console()
    console.print(table)
    console.print(f"on disk: {_size(manager.store.physical_bytes())} (each object counted once)")
    for path, problem in manager.store.broken.items():
        console.print(f"[red]unreadable manifest[/red] {path}: {problem}")


@cli.command("verify")
@click.argument("run")
@click.option("--step", "steps", type=int, multiple=True, help="Only these steps (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def verify_command(run: str, steps: tuple[int, ...], as_json: bool) -> None:
    """Check every object of RUN against its checksum; exit 1 if any fails."""
    manager = _open(run)
    try:
        problems = manager.store.verify(steps or None)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    checked = list(steps) if steps else manager.store.steps()
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
    manager = _open(run)
    try:
        manager.pin(step)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pinned step {step} of {run}")


@cli.command("unpin")
@click.argument("run")
@click.argument("step", type=int)
def unpin_command(run: str, step: int) -> None:
    """Let the retention policy decide about STEP of RUN again (at the next save)."""
    manager = _open(run)
    if step not in manager.pinned():
        raise click.ClickException(f"step {step} of {run} is not pinned")
    manager.unpin(step)
    click.echo(f"unpinned step {step} of {run}")


def _read_metrics(path: str) -> dict[int, dict[str, float]]:
    """A CSV whose first column is the step and whose other columns are metrics; empty
    cells mean "not reported at this step"."""
    import csv

    out: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip().lower() != "step":
            raise click.BadParameter("the first column of the metrics CSV must be 'step'")
        for line, row in enumerate(reader, start=2):
            try:
                step = int(row[0])
                values = {
                    name.strip(): float(cell)
                    for name, cell in zip(header[1:], row[1:], strict=False)
                    if cell.strip()
                }
            except (ValueError, IndexError) as exc:
                raise click.BadParameter(f"{path}, line {line}: {exc}") from exc
            out.setdefault(step, {}).update(values)
    return out


def _policy(
    config: str | None,
    save: str | None,
    keep: str | None,
    save_steps: int | None,
    save_total_limit: int | None,
) -> Policy:
    policy = policy_from_config(config) if config else Policy()
    if save:
        policy = Policy(parse_save(save), policy.keep)
    if keep:
        policy = Policy(policy.save, parse_keep(keep))
    if save_steps is not None:
        policy = Policy(cw.every(save_steps), policy.keep)
    if save_total_limit is not None:
        policy = Policy(policy.save, cw.keep_last(save_total_limit))
    if policy.save is None:
        raise click.UsageError(
            "give a save policy: --config FILE, --save 'every(1000)' or --save-steps 1000"
        )
    return policy


def _human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _parse_option(kind: str, value: str | None, parse: Any) -> Any:
    if value is None:
        return None
    try:
        return parse(value, where=kind)
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), param_hint=kind) from exc


@cli.command("simulate")
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False),
    help="Policy file (YAML, TOML or JSON) with save/keep sections.",
)
@click.option("--save", "save", help="Save policy, one-line form: 'every(1000) | on_signal'.")
@click.option("--keep", "keep", help="Retention, one-line form: 'last(3) | best(1, eval_loss)'.")
@click.option("--save-steps", type=int, help="As Trainer's --save_steps: every(N).")
@click.option("--save-total-limit", type=int, help="As Trainer's --save_total_limit: last(N).")
@click.option("--steps", type=int, required=True, help="Length of the run in steps.")
@click.option("--step-time", default="1s", show_default=True, help="Time per step, e.g. 1.2s.")
@click.option("--save-cost", default="30s", show_default=True, help="Time per save, e.g. 30s.")
@click.option(
    "--checkpoint-bytes", default="0", show_default=True, help="Bytes per checkpoint, e.g. 22GB."
)
@click.option(
    "--metrics",
    "metrics_csv",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV trace: step,metric1,metric2,... (empty cell = not reported).",
)
@click.option("--mtbf", help="Mean time between failures, e.g. 3h, to estimate lost work.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG timeline.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def simulate_command(
    config: str | None,
    save: str | None,
    keep: str | None,
    save_steps: int | None,
    save_total_limit: int | None,
    steps: int,
    step_time: str,
    save_cost: str,
    checkpoint_bytes: str,
    metrics_csv: str | None,
    mtbf: str | None,
    plot_path: str | None,
    as_json: bool,
) -> None:
    """Replay a run without training: saves, kept checkpoints, bytes, time, lost work."""
    try:
        policy = _policy(config, save, keep, save_steps, save_total_limit)
    except CheckpointError as exc:
        raise click.BadParameter(str(exc)) from exc
    assert policy.save is not None
    step_td = _parse_option("--step-time", step_time, parse_duration)
    cost_td = _parse_option("--save-cost", save_cost, parse_duration)
    size = _parse_option("--checkpoint-bytes", checkpoint_bytes, parse_bytes)
    mtbf_td = _parse_option("--mtbf", mtbf, parse_duration)
    metrics = _read_metrics(metrics_csv) if metrics_csv else None
    try:
        result = simulate(
            policy.save,
            policy.keep,
            steps=steps,
            step_time=step_td,
            save_cost=cost_td,
            checkpoint_bytes=size,
            metrics=metrics,
        )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    doc = result.to_json()
    doc["policy"] = to_config(policy.save, policy.keep)
    if mtbf_td is not None:
        failures = result.wall_seconds / mtbf_td.total_seconds()
        doc["expected_failures"] = failures
        doc["expected_lost_seconds_total"] = failures * result.expected_loss_seconds
    if plot_path:
        from ckptwise.cli.plot import plot_simulation

        plot_simulation(result, plot_path, title=f"{len(result.saves)} saves over {steps} steps")
        doc["plot"] = plot_path
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    shown = result.saves[:20]
    click.echo(f"{len(result.saves)} saves over {steps} steps:")
    for step, reasons in shown:
        click.echo(f"  step {step:>8}  {', '.join(reasons)}")
    if len(result.saves) > len(shown):
        click.echo(f"  ... and {len(result.saves) - len(shown)} more (--json lists all)")
    click.echo(
        "kept at the end: " + ", ".join(f"{s} ({', '.join(r)})" for s, r in result.kept.items())
    )
    click.echo(
        f"bytes written: {_size(result.bytes_written)}; peak on disk: "
        f"{_size(result.peak_bytes)}; on disk at the end: "
        f"{_size(result.timeline[-1][1])}"
    )
    click.echo(
        f"time saving: {_human_seconds(result.save_seconds)} of "
        f"{_human_seconds(result.wall_seconds)} ({100 * result.overhead:.2f}%)"
    )
    click.echo(
        f"expected work lost per failure: {_human_seconds(result.expected_loss_seconds)}"
        f" (~{result.expected_loss_steps:.0f} steps)"
    )
    if mtbf_td is not None:
        click.echo(
            f"with a failure every {mtbf}: {doc['expected_failures']:.2f} failures, "
            f"{_human_seconds(doc['expected_lost_seconds_total'])} of work lost in all"
        )
    if plot_path:
        click.echo(f"plot: {plot_path}")


def main() -> None:
    """Entry point of the ``ckptwise`` console script."""
    cli(prog_name="ckptwise")
