"""What the framework adapters share: their run's manager, the metric "best" means, and the
scratch folders they resume through.

A notebook builds a trainer, attaches, trains, then builds another and attaches again to the
same run. The first manager must not keep the run's lock from its own process: an adapter
opens its manager with :func:`open_manager`, which first closes the manager this process
opened earlier on the same run, and closes it itself when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import threading
import weakref
from pathlib import Path
from typing import Any, Literal

from ckptwise.config import policy_ranking
from ckptwise.manager import CheckpointManager
from ckptwise.policy import RetentionPolicy, Trigger
from ckptwise.read.formats import resume_scratch

__all__ = [
    "Metric",
    "open_manager",
    "policy_metric",
    "remove_scratch",
    "scratch_folder",
]

log = logging.getLogger("ckptwise")

Metric = tuple[str, Literal["min", "max"]]

_opened: dict[str, weakref.ref[CheckpointManager]] = {}
_opened_lock = threading.Lock()


def _run_key(root: str | os.PathLike[str]) -> str:
    text = os.fspath(root)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return text.rstrip("/") if "://" in text else os.path.realpath(text)


def open_manager(root: str | os.PathLike[str], **options: Any) -> CheckpointManager:
    """A new writing manager of ``root``, after closing the one this process opened there
    through this function earlier and still holds (its adapter reopens one when it trains
    again)."""
    key = _run_key(root)
    with _opened_lock:
        earlier = _opened.pop(key, None)
    previous = earlier() if earlier is not None else None
    if previous is not None and not previous.closed:
        log.info(
            "closing the CheckpointManager an earlier adapter opened on %s in this process, "
            "so this one can take the run's lock",
            previous.run.url,
        )
        previous.close()
    manager = CheckpointManager(root, **options)
    with _opened_lock:
        _opened[key] = weakref.ref(manager)
    return manager


def policy_metric(save: Trigger | None, keep: RetentionPolicy | None) -> Metric | None:
    """The metric a policy ranks by (see :func:`ckptwise.config.policy_ranking`), and its
    direction."""
    ranked = policy_ranking(save, keep)
    return None if ranked is None else (ranked.metric, ranked.mode)


# -- scratch folders -----------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
# mkdtemp's random tail: eight characters of [a-z0-9_]
_SCRATCH = re.compile(r"^(?:ckptwise-)?(?P<kind>[a-z-]+)-(?P<pid>[0-9]+)@(?P<host>[^@]+)-\w{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def scratch_folder(run_url: str, kind: str) -> Path:
    """A new, empty folder for the files a framework resumes from (see
    :func:`ckptwise.read.formats.resume_scratch`), named after this process.

    Folders of the same ``kind`` next to it that a process of this host that is gone left
    (it was killed before training removed them), or that this process left (training
    failed before its first step), are removed: one adapter per run writes in a process.
    Under DeepSpeed the lowest rank of each node makes the node's folder (see
    :meth:`ckptwise.integrations.transformers.CheckpointCallback.resume_checkpoint`).
    """
    folder = resume_scratch(run_url, f"{kind}-{os.getpid()}@{_HOST}")
    with contextlib.suppress(OSError):
        for sibling in folder.parent.iterdir():
            match = _SCRATCH.match(sibling.name)
            if (
                match is None
                or sibling == folder
                or match["kind"] != kind
                or match["host"] != _HOST
                or (int(match["pid"]) != os.getpid() and _alive(int(match["pid"])))
                or sibling.is_symlink()
                or not sibling.is_dir()
            ):
                continue
            log.info("removing %s, left by a resume that never trained", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
    return folder


def remove_scratch(folder: Path | None) -> None:
    """Remove a scratch folder (``None``: nothing to do)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
