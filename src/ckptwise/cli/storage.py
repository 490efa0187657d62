"""``ckptwise show``, ``du``, ``diff`` and ``export``: what a run stores, and getting it out.

``show`` lists a checkpoint's tensors with the codec each got and why; ``du`` splits each
checkpoint's bytes into what it holds (logical), what it alone keeps on disk and what dedup
and compression saved; ``diff`` says which tensors changed between two steps and by how
much; ``export`` writes plain safetensors or a Hugging Face style folder.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ckptwise.cli.common import CommandError, echo_json, human_size, open_cli_run, warn
from ckptwise.cli.ranking import recorded_metrics, run_ranking, unknown_metric
from ckptwise.cli.table import Column, print_table
from ckptwise.errors import CheckpointError
from ckptwise.read.hf_model import (
    AS_TRAINED,
    DTYPE_CHOICES,
    ExportedFolder,
    Layout,
    export_dtype,
    write_model_folder,
)

if TYPE_CHECKING:
    from ckptwise.read.run import Run

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
            click.option(
                "--metric",
                help="The metric 'best' is judged by (default: the one the run's keep_best or "
                "on_improvement ranks by).",
            ),
            click.option(
                "--mode",
                type=click.Choice(["min", "max"]),
                help="Lower (min) or higher (max) is better (default: as the run's policy "
                "ranked, else min).",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text."),
        )
    ):
        command = decorator(command)
    return command


def _resolve(opened: Run, step: str, metric: str | None, mode: str | None) -> int:
    """The step ``--step`` names; ``best`` by ``--metric`` or, without it, by the metric
    the run's own policy ranks by."""
    if step != "best":
        try:
            return opened.resolve(step)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from exc
    infos = opened.checkpoints()
    ranking = run_ranking(opened, infos)
    if metric is None:
        if ranking is None:
            recorded = ", ".join(recorded_metrics(infos)) or "none"
            raise click.UsageError(
                "--step best needs --metric: the run has no keep_best or on_improvement to "
                f"rank by (its checkpoints recorded: {recorded})"
            )
        metric = ranking.metric
        if mode is None and ranking.mode is None:
            warn(
                f"ranking by {metric}, the metric of the run's {ranking.policy}; the run does "
                "not record whether lower or higher is better: assuming lower (pass --mode max "
                "otherwise)"
            )
        if not any(metric in info.metrics for info in infos):
            # early in a run, before the first evaluation: not a misspelt --metric
            raise CommandError(
                f"--step best ranks by {metric}, the metric of the run's {ranking.policy}, and "
                f"no checkpoint has recorded it yet (they recorded: "
                f"{', '.join(recorded_metrics(infos)) or 'no metrics'}); pass --step latest or "
                "a step number",
                kind="CheckpointNotFoundError",
            )
    problem = unknown_metric(metric, infos)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--metric")
    if mode is None:
        same = ranking is not None and ranking.metric == metric
        mode = (ranking.mode if same and ranking is not None else None) or "min"
    try:
        return opened.resolve("best", metric=metric, mode="max" if mode == "max" else "min")
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("show")
@click.argument("run")
@click.option("--step", default="latest", show_default=True, help="A step, 'best' or 'latest'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_command(run: str, step: str, as_json: bool) -> None:
    """List the tensors of one checkpoint: dtype, shape, bytes, codec and why."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, None, None)
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
        echo_json({"run": run, "step": chosen, "tensors": rows})
        return
    columns = [
        Column("tensor", wrap=True),
        Column("dtype"),
        Column("shape"),
        Column("bytes", numeric=True),
        Column("stored", numeric=True),
        Column("codec"),
        Column("why", wrap=True),
    ]
    table = []
    for row in rows:
        stored = human_size(row["stored_bytes"])
        if row["stored_by_step"] != chosen:
            stored = f"(step {row['stored_by_step']})"
        table.append(
            [
                row["name"],
                row["dtype"],
                "x".join(map(str, row["shape"])) or "scalar",
                human_size(row["bytes"]),
                stored,
                row["codec"],
                row["why"],
            ]
        )
    print_table(f"{run}, step {chosen}: {len(rows)} tensors", columns, table)


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
        "unreferenced_objects": usage.unreferenced_objects,
        "unreferenced_bytes": usage.unreferenced_bytes,
    }
    if as_json:
        echo_json({"run": run, "checkpoints": rows, "total": totals})
        return
    columns = [
        Column(name, numeric=True) for name in ("step", "logical", "written", "only here", "shared")
    ]
    table = [
        [
            str(r["step"]),
            human_size(r["logical_bytes"]),
            human_size(r["written_bytes"]),
            human_size(r["exclusive_bytes"]),
            human_size(r["shared_bytes"]),
        ]
        for r in rows
    ]
    print_table(f"{run}: {len(rows)} checkpoint(s)", columns, table)
    click.echo(
        f"logical {human_size(logical)} -> {human_size(unique_raw)} after dedup "
        f"(saved {human_size(totals['saved_by_dedup'])}) -> {human_size(physical)} on disk after "
        f"compression (saved {human_size(totals['saved_by_compression'])})"
    )
    if usage.unreferenced_objects:
        click.echo(
            f"plus {human_size(usage.unreferenced_bytes)} on disk in "
            f"{usage.unreferenced_objects} object(s) no checkpoint names: left by a save that "
            "failed or was interrupted (or written by one in progress); the next writer of the "
            "run removes them"
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
        echo_json({"run": run, "a": a, "b": b, "tensors": rows})
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
    type=click.Choice(["auto", "safetensors", "hf"]),
    default="auto",
    show_default=True,
    help="One file, or a Hugging Face style folder; auto: the folder when the checkpoint "
    "records its model (Trainer runs) or --config-from is given, else the file.",
)
@click.option(
    "--dtype",
    # one spelling on the command line (Run.export also takes bfloat16, float16, float32)
    type=click.Choice(list(DTYPE_CHOICES[:4])),
    default=AS_TRAINED,
    show_default=True,
    help="as-trained: each tensor in the dtype the model was trained in (DeepSpeed bf16: "
    "the bf16 model, not the fp32 master copies); bf16/fp16/fp32: every float tensor so "
    "(fp32 keeps DeepSpeed's master weights). config.json says the same.",
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
    help="Copy config/tokenizer JSON files from this model folder (over those the "
    "checkpoint recorded); for checkpoints that record no model.",
)
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    help="The model the run fine-tuned (a folder of safetensors weights): the tensors the "
    "checkpoint lacks come from it, e.g. the frozen weights of a weights='trainable' run.",
)
def export_command(
    run: str,
    out: str,
    step: str,
    metric: str | None,
    mode: str | None,
    as_json: bool,
    fmt: str,
    dtype: str,
    key: str,
    config_from: str | None,
    base: str | None,
) -> None:
    """Write a checkpoint's weights as model.safetensors, or a folder from_pretrained loads."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, metric, mode)
    if config_from is not None and fmt == "safetensors":
        warn("--config-from is used with --format hf or auto only; no config was copied")
        config_from = None
    layout: Layout = "hf" if fmt == "hf" else "safetensors" if fmt == "safetensors" else "auto"
    try:
        if key == "model" and "deepspeed" in opened.manifest(chosen).tree:
            done = _export_deepspeed(opened, chosen, out, config_from, dtype, layout, base)
        else:
            done = opened.export_folder(
                chosen,
                out,
                key=key,
                config_from=config_from,
                dtype=dtype,
                layout=layout,
                base=base,
            )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    hf = "config.json" in done.files or layout == "hf" or config_from is not None
    if hf and "config.json" not in done.files:
        where = f"{config_from} has no config.json" if config_from else "no --config-from"
        warn(
            f"{out} has no config.json ({where}, and step {chosen} records no model config: "
            "it was saved before ckptwise recorded it, or not by the Trainer adapter), so "
            "from_pretrained cannot load it; pass --config-from MODEL_DIR, the folder holding "
            "the model's config.json and tokenizer files"
        )
    if hf and done.mixed:
        held = ", ".join(f"{name} ({n} tensors)" for name, n in sorted(done.mixed.items()))
        warn(
            f"step {chosen} does not record the dtype the model was trained in, so its "
            f"weights were written as stored: {held}; from_pretrained casts them all to one "
            "dtype, so pass --dtype bf16 (or fp16, fp32) to choose it"
        )
    if as_json:
        echo_json(
            {
                "run": run,
                "step": chosen,
                "format": "hf" if hf else "safetensors",
                "dtype": done.dtype,
                "path": str(done.path),
                "files": list(done.files),
            }
        )
        return
    dtype_note = f" ({done.dtype})" if done.dtype else ""
    click.echo(f"exported step {chosen}{dtype_note} to {done.path}")


def _export_deepspeed(
    opened: Run,
    step: int,
    out: str,
    config_from: str | None,
    dtype: str,
    layout: Layout,
    base: str | None,
) -> ExportedFolder:
    """A DeepSpeed checkpoint holds engine partitions, not a model: consolidate them."""
    try:
        from ckptwise.integrations.transformers.deepspeed import consolidated_weights
    except ImportError as exc:
        raise click.ClickException(
            f"step {step} was saved by DeepSpeed; exporting it needs DeepSpeed and "
            f"transformers ({exc.name} is missing): pip install 'ckptwise[deepspeed,transformers]'"
        ) from exc
    cast = export_dtype(dtype)
    record = opened.hf_model(step)
    return write_model_folder(
        consolidated_weights(opened, step),
        out,
        record=record,
        dtype=cast,
        layout=layout,
        config_from=config_from,
        base=base,
        step=step,
    )


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
    run: str,
    out: str,
    step: str,
    metric: str | None,
    mode: str | None,
    as_json: bool,
    prefixes: tuple[str, ...],
) -> None:
    """Copy one checkpoint to a new run OUT, optimizer state quantized to int8 (lossy)."""
    opened = open_cli_run(run)
    chosen = _resolve(opened, step, metric, mode)
    try:
        info = opened.archive(chosen, out, lossy=prefixes)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = open_cli_run(out).manifest(chosen)
    lossy = {n: e.note for n, e in manifest.tensors.items() if e.lossy}
    original = sum(e.nbytes for e in manifest.tensors.values())
    if as_json:
        echo_json(
            {
                "run": run,
                "step": chosen,
                "out": out,
                "stored_bytes": info.new_bytes,
                "tensor_bytes": original,
                "lossy": lossy,
            }
        )
        return
    for name, note in lossy.items():
        click.echo(f"{name}: {note}")
    click.echo(
        f"archived step {chosen} to {out}: {human_size(info.new_bytes)} for "
        f"{human_size(original)} of tensors, {len(lossy)} of them lossy"
    )
