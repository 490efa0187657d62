"""``ckptwise show``, ``du``, ``diff`` and ``export``: what a run stores, and getting it out.

``show`` lists a checkpoint's tensors with the codec each got and why; ``du`` splits each
checkpoint's bytes into what it holds (logical), what it alone keeps on disk and what dedup
and compression saved; ``diff`` says which tensors changed between two steps and by how
much; ``export`` writes plain safetensors or a Hugging Face style folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ckptwise.cli.common import human_size, open_cli_run
from ckptwise.errors import CheckpointError
from ckptwise.formats import copy_hf_metadata, write_safetensors
from ckptwise.run import Run, open_run

__all__ = ["archive_command", "diff_command", "du_command", "export_command", "show_command"]


F = TypeVar("F", bound=Callable[..., Any])


def _which_checkpoint(command: F) -> F:
    """RUN, OUT and the options that pick one checkpoint: --step, --metric, --mode."""
    for decorator in reversed(
        (
            click.argument("run"),
            click.argument("out", type=click.Path(file_okay=False)),
            click.option(
                "--step", default="latest", show_default=True, help="A step, 'best' or 'latest'."
            ),
            click.option("--metric", help="The metric 'best' is judged by (e.g. eval_loss)."),
            click.option(
                "--mode", type=click.Choice(["min", "max"]), default="min", show_default=True
            ),
        )
    ):
        command = decorator(command)
    return command


def _resolve(opened: Run, step: str, metric: str | None, mode: str) -> int:
    if step == "best" and not metric:
        raise click.BadParameter("--step best needs --metric (e.g. --metric eval_loss)")
    try:
        return opened.resolve(step, metric=metric, mode="max" if mode == "max" else "min")
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("show")
@click.argument("run")
@click.option("--step", default="latest", show_default=True, help="A step, or 'latest'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_command(run: str, step: str, as_json: bool) -> None:
    """List the tensors of one checkpoint: dtype, shape, bytes, codec and why."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, None, "min")
    try:
        manifest = opened.manifest(chosen)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    stored_by = opened.first_stored(chosen)
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "dtype": e.dtype,
            "shape": list(e.shape),
            "bytes": e.nbytes,
            "stored_bytes": e.stored_bytes,
            "codec": e.codec,
            "why": e.note,
            "stored_by_step": stored_by[name],
        }
        for name, e in manifest.tensors.items()
    ]
    if as_json:
        click.echo(json.dumps({"run": run, "step": chosen, "tensors": rows}, indent=2))
        return
    table = Table(title=f"{run}, step {chosen}: {len(rows)} tensors")
    for column in ("tensor", "dtype", "shape", "bytes", "stored", "codec", "why"):
        table.add_column(column, justify="right" if column in ("bytes", "stored") else "left")
    for row in rows:
        stored = human_size(row["stored_bytes"])
        if row["stored_by_step"] != chosen:
            stored = f"(step {row['stored_by_step']})"
        table.add_row(
            row["name"],
            row["dtype"],
            "x".join(map(str, row["shape"])) or "scalar",
            human_size(row["bytes"]),
            stored,
            row["codec"],
            row["why"],
        )
    Console().print(table)


@click.command("du")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def du_command(run: str, as_json: bool) -> None:
    """Logical vs physical bytes per checkpoint, and what dedup and compression saved."""
    usage = open_cli_run(run).usage()
    rows = [dataclasses.asdict(row) for row in usage.checkpoints]
    logical, unique_raw, physical = usage.logical_bytes, usage.unique_bytes, usage.physical_bytes
    totals = {
        "checkpoints": len(rows),
        "logical_bytes": logical,
        "unique_bytes": unique_raw,
        "physical_bytes": physical,
        "saved_by_dedup": usage.saved_by_dedup,
        "saved_by_compression": usage.saved_by_compression,
    }
    if as_json:
        click.echo(json.dumps({"run": run, "checkpoints": rows, "total": totals}, indent=2))
        return
    table = Table(title=f"{run}: {len(rows)} checkpoint(s)")
    for column in ("step", "logical", "written", "only here", "shared"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["step"]),
            human_size(r["logical_bytes"]),
            human_size(r["written_bytes"]),
            human_size(r["exclusive_bytes"]),
            human_size(r["shared_bytes"]),
        )
    console = Console()
    console.print(table)
    console.print(
        f"logical {human_size(logical)} -> {human_size(unique_raw)} after dedup "
        f"(saved {human_size(totals['saved_by_dedup'])}) -> {human_size(physical)} on disk after "
        f"compression (saved {human_size(totals['saved_by_compression'])})"
    )


@click.command("diff")
@click.argument("run")
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged tensors.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def diff_command(run: str, a: int, b: int, show_all: bool, as_json: bool) -> None:
    """Which tensors changed between steps A and B, and by how much."""
    try:
        changes = open_cli_run(run).diff(a, b)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c in changes]
    if as_json:
        click.echo(json.dumps({"run": run, "a": a, "b": b, "tensors": rows}, indent=2))
        return
    counts = Counter(r["status"] for r in rows)
    for r in rows:
        if r["status"] == "same" and not show_all:
            continue
        extra = ""
        if "relative_change" in r:
            extra = f"  rel {r['relative_change']:.3g}  max|d| {r['max_abs_change']:.3g}"
        if "changed_elements" in r:
            extra += f"  {r['changed_elements']}/{r['elements']} elements"
        click.echo(f"{r['status']:>8}  {r['name']}{extra}")
    click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))


@click.command("export")
@_which_checkpoint
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "hf"]),
    default="safetensors",
    show_default=True,
    help="One file, or a Hugging Face style folder.",
)
@click.option(
    "--key",
    default="model",
    show_default=True,
    help="Which entry of the state holds the weights (e.g. lightning/state_dict).",
)
@click.option(
    "--config-from",
    type=click.Path(exists=True, file_okay=False),
    help="With --format hf: copy config/tokenizer JSON files from this folder.",
)
def export_command(
    run: str,
    out: str,
    step: str,
    metric: str | None,
    mode: str,
    fmt: str,
    key: str,
    config_from: str | None,
) -> None:
    """Write a checkpoint's weights as model.safetensors any tool loads."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, metric, mode)
    metadata_from = config_from if fmt == "hf" else None
    try:
        if key == "model" and "deepspeed" in opened.manifest(chosen).tree:
            path = _export_deepspeed(opened, chosen, out, metadata_from)
        else:
            path = opened.export(chosen, out, key=key, config_from=metadata_from)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"exported step {chosen} to {path}")


def _export_deepspeed(opened: Run, step: int, out: str, config_from: str | None) -> Path:
    """A DeepSpeed checkpoint holds engine partitions, not a model: consolidate them."""
    try:
        from ckptwise.integrations.transformers.deepspeed import consolidated_weights
    except ImportError as exc:
        raise click.ClickException(
            f"step {step} was saved by DeepSpeed; exporting it needs DeepSpeed and "
            f"transformers ({exc.name} is missing): pip install 'ckptwise[deepspeed,transformers]'"
        ) from exc
    weights = consolidated_weights(opened, step)
    path = write_safetensors(weights, Path(out) / "model.safetensors", step=step)
    if config_from is not None:
        copy_hf_metadata(config_from, out)
    return path


@click.command("archive")
@_which_checkpoint
@click.option(
    "--lossy",
    "prefixes",
    multiple=True,
    default=["optimizer/"],
    show_default=True,
    help="Quantize float tensors whose names start with this (repeatable).",
)
def archive_command(
    run: str, out: str, step: str, metric: str | None, mode: str, prefixes: tuple[str, ...]
) -> None:
    """Copy one checkpoint to a new run OUT, optimizer state quantized to int8 (lossy)."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, metric, mode)
    try:
        info = opened.archive(chosen, out, lossy=prefixes)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = open_run(out).manifest(chosen)
    lossy = {n: e.note for n, e in manifest.tensors.items() if e.lossy}
    for name, note in lossy.items():
        click.echo(f"{name}: {note}")
    original = sum(e.nbytes for e in manifest.tensors.values())
    click.echo(
        f"archived step {chosen} to {out}: {human_size(info.new_bytes)} for "
        f"{human_size(original)} of tensors, {len(lossy)} of them lossy"
    )
