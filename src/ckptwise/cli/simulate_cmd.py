"""``ckptwise simulate``: replay a policy on a simulated clock, without training.

The policies and the simulator are imported when the command runs: ``ckptwise --help``
(which imports this module to list the command) stays light.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from ckptwise.cli.common import human_size, warn
from ckptwise.errors import CheckpointError

if TYPE_CHECKING:
    from ckptwise.policy import RetentionPolicy, Trigger

__all__ = ["simulate_command"]


def _read_metrics(path: str) -> dict[int, dict[str, float]]:
    """A CSV whose first column is the step and whose other columns are metrics; empty
    cells mean "not reported at this step", blank lines are skipped."""
    import csv

    out: dict[int, dict[str, float]] = {}
    # utf-8-sig: a spreadsheet's CSV starts with a byte order mark
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip().lower() != "step":
            raise click.BadParameter("the first column of the metrics CSV must be 'step'")
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
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
) -> tuple[Trigger, RetentionPolicy | None]:
    """The policy the options describe; flags override what the file says."""
    import ckptwise as cw
    from ckptwise.config import Policy, parse_keep, parse_save, policy_from_config

    def parsed(option: str, parse: Any, value: str) -> Any:
        try:
            return parse(value)
        except CheckpointError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from exc

    policy = parsed("--config", policy_from_config, config) if config else Policy()
    if save:
        policy = Policy(parsed("--save", parse_save, save), policy.keep)
    if keep:
        policy = Policy(policy.save, parsed("--keep", parse_keep, keep))
    if save_steps is not None:
        if save_steps <= 0:
            raise click.BadParameter(
                f"{save_steps} is not a positive number of steps; e.g. --save-steps 1000",
                param_hint="--save-steps",
            )
        # as TrainingArguments(save_steps=N) under attach(): the last step is saved too
        policy = Policy(cw.every(save_steps) | cw.on_final(), policy.keep)
    if save_total_limit is not None:
        if save_total_limit <= 0:
            raise click.BadParameter(
                f"{save_total_limit} is not a positive number of checkpoints; e.g. "
                "--save-total-limit 3 (leave it out to keep them all)",
                param_hint="--save-total-limit",
            )
        policy = Policy(policy.save, cw.keep_last(save_total_limit))
    if policy.save is None:
        raise click.UsageError(
            "give a save policy: --config FILE, --save 'every(1000)' or --save-steps 1000"
        )
    return policy.save, policy.keep


def _unmet_metrics(
    save: Trigger, keep: RetentionPolicy | None, metrics: dict[int, dict[str, float]] | None
) -> list[str]:
    """What the policy reads that the metrics trace never reports, in words."""
    from ckptwise.policy import KeepBest, OnImprovement, walk

    reported = {name for values in (metrics or {}).values() for name in values}

    def missing(metric: str) -> str:
        if metrics is None:
            return (
                f"no --metrics trace reports {metric!r} (pass --metrics FILE.csv with the "
                f"columns step,{metric},...)"
            )
        return f"the --metrics CSV has no {metric!r} column"

    out = [
        f"{trigger.reason} can never fire: {missing(trigger.metric)}"
        for trigger in walk(save)
        if isinstance(trigger, OnImprovement) and trigger.metric not in reported
    ]
    out += [
        f"keep_best({policy.n}, {policy.metric}) keeps nothing: {missing(policy.metric)}"
        for policy in _retention_leaves(keep)
        if isinstance(policy, KeepBest) and policy.metric not in reported
    ]
    return out


def _retention_leaves(keep: RetentionPolicy | None) -> list[RetentionPolicy]:
    from ckptwise.policy import KeepAny

    if keep is None:
        return []
    if isinstance(keep, KeepAny):
        return [leaf for inner in keep.policies for leaf in _retention_leaves(inner)]
    return [keep]


#: what simulate assumes of a run whose times are not given
STEP_TIME, SAVE_COST = "1s", "30s"


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
        raise click.BadParameter(str(exc)) from exc  # the message names the option


@click.command("simulate")
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False),
    help="Policy file (YAML, TOML or JSON) with save/keep sections.",
)
@click.option("--save", "save", help="Save policy, one-line form: 'every(1000) | on_signal'.")
@click.option("--keep", "keep", help="Retention, one-line form: 'last(3) | best(1, eval_loss)'.")
@click.option("--save-steps", type=int, help="As Trainer's --save_steps: every(N) | on_final().")
@click.option("--save-total-limit", type=int, help="As Trainer's --save_total_limit: last(N).")
@click.option("--steps", type=int, required=True, help="Length of the run in steps.")
@click.option("--step-time", help=f"Time per step, e.g. 1.2s.  [default: {STEP_TIME}]")
@click.option("--save-cost", help=f"Time per save, e.g. 5m.  [default: {SAVE_COST}]")
@click.option(
    "--checkpoint-bytes",
    default="0",
    show_default=True,
    help="Bytes per checkpoint, e.g. 22GB (every save counts this much, also the slimmer "
    "saves of a content: policy).",
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
    step_time: str | None,
    save_cost: str | None,
    checkpoint_bytes: str,
    metrics_csv: str | None,
    mtbf: str | None,
    plot_path: str | None,
    as_json: bool,
) -> None:
    """Replay a run without training: saves, kept checkpoints, bytes, time, lost work."""
    from ckptwise.config import parse_bytes, parse_duration, to_config
    from ckptwise.simulate import simulate

    save_policy, keep_policy = _policy(config, save, keep, save_steps, save_total_limit)
    assumed = [
        f"{default} per {what} ({option})"
        for given, default, what, option in (
            (step_time, STEP_TIME, "step", "--step-time"),
            (save_cost, SAVE_COST, "save", "--save-cost"),
        )
        if given is None
    ]
    step_td = _parse_option("--step-time", step_time or STEP_TIME, parse_duration)
    cost_td = _parse_option("--save-cost", save_cost or SAVE_COST, parse_duration)
    size = _parse_option("--checkpoint-bytes", checkpoint_bytes, parse_bytes)
    mtbf_td = _parse_option("--mtbf", mtbf, parse_duration)
    if mtbf_td is not None and mtbf_td.total_seconds() <= 0:
        raise click.BadParameter(
            f"the mean time between failures must be longer than 0, got {mtbf!r}; e.g. '3h'",
            param_hint="--mtbf",
        )
    metrics = _read_metrics(metrics_csv) if metrics_csv else None
    unmet = _unmet_metrics(save_policy, keep_policy, metrics)
    for message in unmet:
        warn(message)
    try:
        result = simulate(
            save_policy,
            keep_policy,
            steps=steps,
            step_time=step_td,
            save_cost=cost_td,
            checkpoint_bytes=size,
            metrics=metrics,
        )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    doc = result.to_json()
    doc["policy"] = to_config(save_policy, keep_policy)
    doc["warnings"] = unmet
    doc["assumed"] = assumed
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
    kept = ", ".join(f"{s} ({', '.join(r)})" for s, r in result.kept.items())
    click.echo(f"kept at the end: {kept or 'nothing'}")
    click.echo(
        f"bytes written: {human_size(result.bytes_written)}; peak on disk: "
        f"{human_size(result.peak_bytes)}; on disk at the end: "
        f"{human_size(result.timeline[-1][1])}"
    )
    click.echo(
        f"time saving: {_human_seconds(result.save_seconds)} of "
        f"{_human_seconds(result.wall_seconds)} ({100 * result.overhead:.2f}%)"
    )
    if assumed:
        click.echo(f"  (times assume {' and '.join(assumed)}: give your run's own)")
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
