"""What importing ckptwise costs: the command line's read-only commands never import torch,
and ``import ckptwise`` imports a module only when one of its names is first used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.store.manifest import DTYPES, ITEMSIZES


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_command_line_imports_no_torch() -> None:
    proc = _python(
        "-c",
        "import ckptwise.cli.main, sys; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'numpy' not in sys.modules, 'numpy'",
    )
    assert proc.returncode == 0, proc.stderr


def test_import_ckptwise_is_lazy_and_every_name_resolves() -> None:
    proc = _python(
        "-c",
        "import sys, ckptwise as cw\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'ckptwise.manager' not in sys.modules\n"
        "cw.every(5)\n"  # a policy needs no torch
        "assert 'torch' not in sys.modules\n"
        "missing = [n for n in cw.__all__ if not hasattr(cw, n)]\n"
        "assert not missing, missing\n"
        "assert 'torch' in sys.modules\n",
    )
    assert proc.returncode == 0, proc.stderr


def test_the_lazy_namespace_is_the_modules_own() -> None:
    from ckptwise.manager import CheckpointManager
    from ckptwise.policy import keep_last
    from ckptwise.read.run import Run

    assert cw.CheckpointManager is CheckpointManager
    assert cw.Run is Run
    assert cw.keep_last is keep_last
    assert set(cw.__all__) <= set(dir(cw))
    with pytest.raises(AttributeError, match="no_such_name"):
        cw.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_ls_du_and_verify_of_a_run_import_no_torch(tmp_path: Path) -> None:
    """Through the real console entry, with Python's own import log (``-X importtime``)."""
    root = tmp_path / "run"
    save = cw.every(1) | cw.on_improvement("eval_loss")
    with cw.CheckpointManager(root, save=save, keep=cw.keep_last(2)) as manager:
        for step in (1, 2, 3):
            manager.step(
                step, {"w": torch.full((4,), float(step))}, metrics={"eval_loss": 1 / step}
            )
    commands = (["--help"], ["ls", str(root)], ["du", str(root)], ["verify", str(root)])
    for command in (*commands, ["ls", str(root), "--json"]):
        proc = _python("-X", "importtime", "-m", "ckptwise", *command)
        assert proc.returncode == 0, proc.stderr
        imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
        assert "ckptwise.cli.main" in imported  # the log is there
        banned = ("torch",) if command[0] == "verify" else ("torch", "numpy")
        assert not [m for m in imported if m.split(".")[0] in banned], command
    # and the log does show torch when a command needs it
    proc = _python("-X", "importtime", "-m", "ckptwise", "diff", str(root), "2", "3")
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert [m for m in imported if m.split(".")[0] == "torch"]


#: what ``ckptwise --help`` must not import: the heavy libraries, and the machinery the
#: commands use only when they run (a run, the store, the policies, the tables)
HELP_BANNED = (
    "torch",
    "numpy",
    "fsspec",
    "transformers",
    "safetensors",
    "yaml",
    "rich.console",
    "ckptwise.store",
    "ckptwise.read.run",
    "ckptwise.policy",
    "ckptwise.config",
    "ckptwise.simulate",
    "ckptwise.manager",
)


@pytest.mark.parametrize("args", [["--help"], ["simulate", "--help"], ["export", "--help"]])
def test_help_imports_only_the_command_line(args: list[str]) -> None:
    """``ckptwise --help`` answers from click and the command definitions alone (the
    console script runs the same ``ckptwise.cli.main:main``)."""
    proc = _python("-X", "importtime", "-m", "ckptwise", *args)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert "ckptwise.cli.main" in imported  # the log is there
    heavy = [m for m in imported if m.startswith(HELP_BANNED)]
    assert not heavy, heavy


def test_the_torch_free_dtype_table_matches_torch() -> None:
    assert set(DTYPES) == set(ITEMSIZES)  # this torch has every dtype of the format
    for name, dtype in DTYPES.items():
        assert dtype.itemsize == ITEMSIZES[name], name
        assert dtype == getattr(torch, name)
