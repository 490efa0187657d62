"""What the commands share: opening a run for reading, printing JSON, sizes and warnings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckptwise.errors import CheckpointError

if TYPE_CHECKING:
    from ckptwise.read.run import Run

__all__ = [
    "RUN_FILES",
    "CommandError",
    "JsonErrorGroup",
    "echo_json",
    "error_json",
    "human_size",
    "open_cached_run",
    "open_cli_run",
    "rank_folders",
    "warn",
]

#: What a run's folder holds (docs/FORMAT.md): a folder with none of these is no run.
RUN_FILES = frozenset({"checkpoints", "objects", "run.json", "ckptwise.lock", "pins", "branches"})
#: How many subfolders are looked into for a run one level down.
_LOOK_INTO = 50
_WHERE_RUNS_ARE = (
    "pass the folder given to CheckpointManager (a Trainer's attach() writes to "
    "output_dir/ckptwise)"
)


def human_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at or above 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def echo_json(doc: Any) -> None:
    """Print ``doc`` as the command's one JSON document on stdout."""
    click.echo(json.dumps(doc, indent=2, default=str))


class CommandError(click.ClickException):
    """A command's failure that no ckptwise error raised, with the error class it stands
    for (``kind``, e.g. ``"CheckpointNotFoundError"``), which ``--json`` reports."""

    def __init__(self, message: str, *, kind: str = "CheckpointError") -> None:
        super().__init__(message)
        self.kind = kind


def error_json(exc: click.ClickException) -> dict[str, Any]:
    """The JSON document of a failed command: ``{"error": {"type", "message", "exit_code"}}``,
    ``type`` being the ckptwise error class behind it (``UsageError`` for a bad command
    line)."""
    cause = exc.__cause__
    if isinstance(exc, CommandError):
        kind = exc.kind
    elif isinstance(cause, CheckpointError):
        kind = type(cause).__name__
    elif isinstance(exc, click.UsageError):
        kind = "UsageError"
    else:
        kind = "CheckpointError"
    return {"error": {"type": kind, "message": exc.format_message(), "exit_code": exc.exit_code}}


class JsonErrorGroup(click.Group):
    """A command group whose commands, given ``--json``, also print a failure as one JSON
    document on stdout (:func:`error_json`); the message stays on stderr and the exit code
    is kept. A ckptwise error a command let through is reported the same way, never as a
    traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ahead = args[: args.index("--")] if "--" in args else args
        ctx.meta["ckptwise.json"] = "--json" in ahead
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except CheckpointError as exc:
                raise click.ClickException(str(exc)) from exc
        except click.ClickException as exc:
            if ctx.meta.get("ckptwise.json"):
                echo_json(error_json(exc))
            raise


def warn(message: str) -> None:
    """A warning on stderr, so ``--json`` output stays one document."""
    click.echo(f"warning: {message}", err=True)


def open_cli_run(run: str) -> Run:
    """The run at ``run`` for reading; a usage error naming the fix when no run is there
    (a missing folder, an unrelated one, or the folder above a run)."""
    names = _names_in(run)
    if names is None:
        raise CommandError(
            f"no ckptwise run here: {run} does not exist; {_WHERE_RUNS_ARE}",
            kind="CheckpointNotFoundError",
        )
    if not names & RUN_FILES:
        below = [child for child in _subfolders(run, names) if _holds_run(child)]
        hint = f"did you mean {' or '.join(below)}?" if below else _WHERE_RUNS_ARE
        raise CommandError(
            f"no ckptwise run here: {run} holds no checkpoints/, objects/ or run.json; {hint}",
            kind="CheckpointNotFoundError",
        )
    from ckptwise.read.run import open_run  # not at import: `ckptwise --help` needs no run

    try:
        return open_run(run)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def open_cached_run(run: str, cache: str) -> Run:
    """The remote run at ``run`` read through a writer's cache folder ``cache``: what the
    writer has not uploaded yet is listed too. Nothing is written to either (the writer may
    be running)."""
    from ckptwise.read.run import open_run

    try:
        return open_run(run, cache=cache)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def rank_folders(caches: Iterable[str]) -> tuple[dict[int, str], bool]:
    """:func:`~ckptwise.read.run.cache_folders`, its error said the command line's way."""
    from ckptwise.read.run import cache_folders

    try:
        return cache_folders(caches)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def _is_url(run: str) -> bool:
    return "://" in run and not run.startswith("file://")


def _names_in(run: str) -> set[str] | None:
    """The names directly inside the folder ``run`` (a path or URL); ``None`` when there is
    no folder there."""
    try:
        if _is_url(run):
            import fsspec

            fs, path = fsspec.core.url_to_fs(run)
            if not fs.isdir(path):
                return None
            return {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        with os.scandir(run.removeprefix("file://") or ".") as entries:
            return {entry.name for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # any backend's error: the user needs its words
        raise click.ClickException(f"cannot list {run}: {exc}") from exc


def _holds_run(folder: str) -> bool:
    """Whether ``folder`` holds a run (a folder that cannot be listed does not)."""
    try:
        return bool((_names_in(folder) or set()) & RUN_FILES)
    except click.ClickException:
        return False


def _subfolders(run: str, names: set[str]) -> list[str]:
    """Folders directly inside ``run`` that may hold a run, ``ckptwise`` (where the framework
    adapters write) first."""
    ordered = sorted(names, key=lambda name: (name != "ckptwise", name))[:_LOOK_INTO]
    if _is_url(run):
        return [f"{run.rstrip('/')}/{name}" for name in ordered]
    root = Path(run.removeprefix("file://"))
    return [str(root / name) for name in ordered if (root / name).is_dir()]
