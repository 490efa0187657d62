"""Every I/O call of a save or a prune, failed in turn: the run is never left half-written.

The fixture wraps the ``os`` functions (and ``open``) a store can reach; a call made with a
``ckptwise`` frame on the stack is counted and the k-th one raises. Each case first runs the
operation with counting only, to learn how many calls it makes (N), then, for every k in
1..N, runs it again on a fresh copy of a prepared run with the k-th call failing, and checks
the run from a fresh store: the earlier checkpoints verify and restore, the new step is
whole or absent, no manifest names a missing object, and further saves succeed.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptwise
import ckptwise as cw
from ckptwise.errors import CheckpointError
from ckptwise.store import CheckpointStore, LocalBackend
from ckptwise.store import commit as commit_module

PACKAGE = os.path.dirname(os.path.abspath(ckptwise.__file__)) + os.sep
OS_CALLS = (
    "open",
    "write",
    "fsync",
    "replace",
    "rename",
    "unlink",
    "remove",
    "rmdir",
    "makedirs",
    "mkdir",
    "listdir",
    "scandir",
    "walk",
    "stat",
    "lstat",
    "fstat",
)
ERRNOS = [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS]
#: the store options of the two runs: whole raw objects, and compressed ones with deltas
OPTIONS: dict[str, dict[str, Any]] = {
    "raw": {"codec": "raw"},
    "deltas": {"codec": "bytegroup", "deltas": 4},
}


def _under_ckptwise() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class Faults:
    """Counts the calls made under ckptwise while :attr:`on`; the ``fail_at``-th raises."""

    def __init__(self) -> None:
        self.on = False
        self.calls = 0
        self.fail_at = 0
        self.errno = errno.EIO
        self.failed = ""
        self._lock = threading.Lock()

    def arm(self, fail_at: int, code: int) -> None:
        self.on, self.calls, self.fail_at, self.errno, self.failed = True, 0, fail_at, code, ""

    def check(self, name: str, args: tuple[Any, ...]) -> None:
        if not self.on or not _under_ckptwise():
            return
        with self._lock:
            self.calls += 1
            if self.calls != self.fail_at:
                return
            self.failed = f"os.{name}{args[:2]!r}"
        raise OSError(self.errno, f"{os.strerror(self.errno)} (injected into {name})")

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.check(name, args)
            return real(*args, **kwargs)

        wrapped.__name__ = getattr(real, "__name__", name)
        return wrapped


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Path]:
    """A folder for the many copies of a run: in memory where the system has a tmpfs, since
    what is tested is what each failure leaves behind, not how fast a disk syncs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="ckptwise-faults-") as folder:
        yield Path(folder)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    injector = Faults()
    capabilities = (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks)
    added: list[tuple[set[Any], Any]] = []
    for name in OS_CALLS:
        real = getattr(os, name, None)
        if real is None:
            continue
        wrapped = injector.wrap(name, real)
        monkeypatch.setattr(os, name, wrapped)
        for capability in capabilities:  # os.stat in os.supports_dir_fd must stay true
            if real in capability:
                capability.add(wrapped)
                added.append((capability, wrapped))
    wrapped_open = injector.wrap("open (builtin)", builtins.open)
    monkeypatch.setattr(builtins, "open", wrapped_open)
    monkeypatch.setattr(io, "open", wrapped_open)
    # one writer thread: the k-th call is the same call on every run
    monkeypatch.setattr(commit_module, "WRITERS", 1)
    yield injector
    injector.on = False
    for capability, wrapped in added:
        capability.discard(wrapped)


def tensors_at(step: int) -> dict[str, torch.Tensor]:
    """A frozen tensor (reused by every save), weights that drift, and a small counter."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    w[0, : step + 1] += 1e-3 * step
    return {
        "frozen": torch.arange(512, dtype=torch.float32),
        "w": w,
        "count": torch.tensor([step], dtype=torch.int64),
    }


def prepared(root: Path, options: dict[str, Any]) -> Path:
    template = root / "template"
    store = CheckpointStore(LocalBackend(template), **options)
    for step in (1, 2):
        store.commit(step, tensors_at(step))
    return template


def check_run(
    root: Path,
    *,
    whole: set[int],
    maybe: set[int],
    options: dict[str, Any],
    further: int | None = 9,
) -> None:
    """The run from a fresh store, before and after its debris is cleaned: ``whole`` steps
    all present, ``maybe`` steps present or not; all present ones verify and restore. Then
    the fresh store saves ``further``."""
    store = CheckpointStore(LocalBackend(root), **options)
    assert store.broken == {}
    steps = set(store.steps())
    assert whole <= steps <= whole | maybe, (sorted(steps), whole, maybe)
    assert store.verify() == [], store.verify()
    for step in steps:
        loaded = store.load_tensors(step)
        for name, tensor in tensors_at(step).items():
            assert torch.equal(loaded[name], tensor), (step, name)
    store.clean()  # as a manager does on opening: it must not take what a manifest names
    assert store.verify() == [], store.verify()
    if further is not None:
        store.commit(further, tensors_at(further))
        assert CheckpointStore(LocalBackend(root)).verify() == []


def enumerate_faults(
    folder: Path,
    faults: Faults,
    code: int,
    template: Path,
    operation: Callable[[Path], Callable[[], object]],
    after: Callable[[Path, bool], None],
) -> int:
    """Run ``operation`` once per I/O call it makes, that call failing; returns N.

    ``operation(root)`` prepares (without faults) and returns the call to fault;
    ``after(root, failed)`` checks the run.
    """
    counting = folder / "counting"
    shutil.copytree(template, counting)
    run = operation(counting)
    faults.arm(0, code)
    run()
    faults.on = False
    total = faults.calls
    assert total > 10, "the operation made suspiciously few I/O calls"
    for k in range(1, total + 1):
        root = folder / f"k{k}"
        shutil.copytree(template, root)
        run = operation(root)
        faults.arm(k, code)
        try:
            run()
            failed = False
        except CheckpointError:
            failed = True
        finally:
            faults.on = False
        assert faults.failed, f"call {k} of {total} never came"
        try:
            after(root, failed)
        except AssertionError as exc:
            raise AssertionError(
                f"after failing call {k}/{total} ({faults.failed}): {exc}"
            ) from exc
        shutil.rmtree(root)
    return total


@pytest.mark.parametrize("kind", sorted(OPTIONS))
@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
def test_a_failed_commit_leaves_the_step_whole_or_absent(
    runs: Path, faults: Faults, code: int, kind: str
) -> None:
    options = OPTIONS[kind]
    template = prepared(runs, options)
    stores: dict[Path, CheckpointStore] = {}

    def operation(root: Path) -> Callable[[], object]:
        store = stores[root] = CheckpointStore(LocalBackend(root), **options)
        return lambda: store.commit(3, tensors_at(3))

    def after(root: Path, failed: bool) -> None:
        check_run(root, whole={1, 2} | ({3} if not failed else set()), maybe={3}, options=options)
        # the store that saw the failure goes on saving and pruning
        store = stores.pop(root)
        store.commit(4, tensors_at(4))
        store.delete([1])
        check_run(root, whole={2, 4, 9}, maybe={3}, options=options, further=None)

    enumerate_faults(runs, faults, code, template, operation, after)


@pytest.mark.parametrize("kind", sorted(OPTIONS))
@pytest.mark.parametrize(
    ("code", "async_save"),
    [
        *(pytest.param(code, True, id=errno.errorcode[code]) for code in ERRNOS),
        pytest.param(errno.EIO, False, id="EIO-sync"),
    ],
)
def test_a_failed_save_and_prune_through_the_manager_loses_nothing(
    runs: Path, faults: Faults, code: int, kind: str, async_save: bool
) -> None:
    """Through the default, background save (its failure raised by ``wait()``), and once
    through the synchronous one."""
    options = OPTIONS[kind]
    template = prepared(runs, options)
    managers: dict[Path, cw.CheckpointManager] = {}

    def operation(root: Path) -> Callable[[], object]:
        manager = managers[root] = cw.CheckpointManager(
            root,
            save=cw.every(1),
            keep=cw.keep_last(2),
            rng=False,
            async_save=async_save,
            **options,
        )

        def save() -> None:
            manager.step(3, tensors_at(3))
            manager.wait()

        return save

    def after(root: Path, failed: bool) -> None:
        # keep_last(2) may have pruned step 1, wholly or not at all
        whole = {2} | ({3} if not failed else set())
        check_run(root, whole=whole, maybe={1, 3}, options=options, further=None)
        manager = managers.pop(root)
        manager.step(4, tensors_at(4))
        manager.close()
        check_run(root, whole={4}, maybe={1, 2, 3}, options=options)

    enumerate_faults(runs, faults, code, template, operation, after)


@pytest.mark.parametrize("kind", sorted(OPTIONS))
@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
def test_a_failed_prune_deletes_each_step_wholly_or_not_at_all(
    runs: Path, faults: Faults, code: int, kind: str
) -> None:
    options = OPTIONS[kind]
    template = prepared(runs, options)
    stores: dict[Path, CheckpointStore] = {}

    def operation(root: Path) -> Callable[[], object]:
        store = stores[root] = CheckpointStore(LocalBackend(root), **options)
        return lambda: store.delete([1])

    def after(root: Path, failed: bool) -> None:
        check_run(root, whole={2}, maybe={1} if failed else set(), options=options)
        store = stores.pop(root)
        store.commit(5, tensors_at(5))
        store.delete([1])
        assert CheckpointStore(LocalBackend(root)).verify() == []

    enumerate_faults(runs, faults, code, template, operation, after)
