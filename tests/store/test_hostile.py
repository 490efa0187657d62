"""Hostile run folders: links, FIFOs, devices, huge or deeply nested files, wrong types,
folders where files belong, planted pickles.

Each case damages the newest of two checkpoints (or the run's layout) and checks that only
:class:`~ckptwise.CheckpointError` subclasses escape opening, listing, verifying and
restoring, within a time limit; that a file outside the run is neither read into a result
nor changed; and that the older, intact checkpoint still restores.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptwise as cw
from ckptwise.errors import CheckpointError
from ckptwise.store.manifest import MAX_MANIFEST_BYTES, manifest_digest

NEWEST = "checkpoints/000000000002.json"
LIMIT_S = 30


@dataclass
class Scene:
    """A run of two checkpoints, and a folder outside it holding a file to protect."""

    root: Path
    outside: Path
    target: Path
    saved: dict[int, dict[str, torch.Tensor]]

    def objects(self, step: int) -> set[str]:
        return {e.object for e in cw.open_run(self.root).manifest(step).tensors.values()}

    def only_newest(self) -> list[str]:
        """Objects of the newest checkpoint the older one does not use, as paths."""
        return sorted(f"objects/{o[:2]}/{o}" for o in self.objects(2) - self.objects(1))


class Planted:
    """Unpickling this creates ``path``: proof that a planted pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def model() -> torch.nn.Linear:
    return torch.nn.Linear(4, 3)


def build(tmp_path: Path) -> Scene:
    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    target = outside / "target.json"
    target.write_text('{"precious": true}')
    torch.manual_seed(0)
    net = model()
    saved = {}
    manager = cw.CheckpointManager(root, save=cw.every(1), codec="bytegroup")
    for step in (1, 2):
        with torch.no_grad():
            net.weight.add_(1.0)
        manager.step(step, {"model": net, "epoch": step})
        saved[step] = {k: v.clone() for k, v in net.state_dict().items()}
    manager.close()
    return Scene(root, outside, target, saved)


def edit(scene: Scene, change: Callable[[dict[str, Any]], None], *, sign: bool) -> None:
    """Edit the newest manifest's JSON; ``sign`` recomputes its digest, as a buggy or hostile
    writer would, so the validators behind the digest are what must catch the edit."""
    path = scene.root / NEWEST
    doc = json.loads(path.read_text())
    change(doc)
    if sign:
        doc.pop("digest")
        doc["digest"] = manifest_digest(doc)
    path.write_text(json.dumps(doc))


def replace(scene: Scene, rel: str, make: Callable[[Path], object]) -> None:
    path = scene.root / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    make(path)


def link_folder_outside(scene: Scene, rel: str) -> None:
    """Move folder ``rel`` of the run outside it and leave a link in its place."""
    moved = scene.outside / rel.replace("/", "_")
    shutil.move(scene.root / rel, moved)
    (scene.root / rel).symlink_to(moved, target_is_directory=True)


def zstd_bomb_header() -> bytes:
    # a zstd frame whose header claims 2**40 bytes, holding an empty raw block
    return struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 2**40) + b"\x01\0\0"


def nested(depth: int) -> Any:
    node: Any = 0
    for _ in range(depth):
        node = [node]
    return node


def set_in(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


DELETE = object()


def first_tensor(doc: dict[str, Any]) -> str:
    return next(str(n) for n in doc["tensors"] if n.startswith("model/"))


def on_tensor(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["tensors"][first_tensor(doc)][key] = value

    return change


def huge_shape(doc: dict[str, Any]) -> None:
    entry = doc["tensors"][first_tensor(doc)]
    entry["shape"] = [10**5, 10**5, 10**5]
    entry["nbytes"] = 4 * 10**15  # consistent: only the object's size can tell


def tree_names_a_number(doc: dict[str, Any]) -> None:
    state = doc["tree"]["model"]["state"]
    state[next(iter(state))]["name"] = 7


def bytegroup_object(scene: Scene) -> str:
    for rel in scene.only_newest():
        if (scene.root / rel).read_bytes()[:4] == b"CKBG":
            return rel
    raise AssertionError("no byte-grouped object only the newest checkpoint uses")


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.touch()
        os.truncate(path, size)  # no disk used: a hole

    return make


def unique_folder(scene: Scene) -> str:
    """An object folder only the newest checkpoint uses."""
    older = {f"objects/{o[:2]}" for o in scene.objects(1)}
    for rel in scene.only_newest():
        if rel.rsplit("/", 1)[0] not in older:
            return rel.rsplit("/", 1)[0]
    raise AssertionError("every object folder of the newest checkpoint is shared")


def write_bytes(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


#: (name, damage, whether the older checkpoint must still restore)
CASES: list[tuple[str, Callable[[Scene], None], bool]] = [
    (
        "manifest links outside",
        lambda s: replace(s, NEWEST, lambda p: p.symlink_to(s.target)),
        True,
    ),
    (
        "manifest links to /dev/zero",
        lambda s: replace(s, NEWEST, lambda p: p.symlink_to("/dev/zero")),
        True,
    ),
    ("manifest is a FIFO", lambda s: replace(s, NEWEST, os.mkfifo), True),
    ("manifest is a folder", lambda s: replace(s, NEWEST, lambda p: p.mkdir()), True),
    ("manifest is huge", lambda s: replace(s, NEWEST, sparse(MAX_MANIFEST_BYTES + 1)), True),
    (
        "manifest nests 100,000 deep",
        lambda s: replace(s, NEWEST, write_bytes(b"[" * 100_000)),
        True,
    ),
    (
        "manifest is not UTF-8",
        lambda s: replace(s, NEWEST, write_bytes(b'{"format": "\xff\xfe"}')),
        True,
    ),
    (
        "manifest is a pickle",
        lambda s: replace(s, NEWEST, write_bytes(pickle.dumps(Planted(s.outside / "pwned")))),
        True,
    ),
    ("edited dtype, same width", lambda s: edit(s, on_tensor("dtype", "int32"), sign=False), True),
    (
        "edited tree value",
        lambda s: edit(s, set_in(["tree", "epoch", "value"], 99), sign=False),
        True,
    ),
    ("tree deleted", lambda s: edit(s, set_in(["tree"], DELETE), sign=False), True),
    ("digest deleted", lambda s: edit(s, set_in(["digest"], DELETE), sign=False), True),
    (
        "400-digit metric",
        lambda s: edit(s, set_in(["metrics"], {"loss": 10**400}), sign=True),
        True,
    ),
    ("400-digit time", lambda s: edit(s, set_in(["time"], 10**400), sign=True), True),
    ("time past year 9999", lambda s: edit(s, set_in(["time"], 1e300), sign=True), True),
    ("dtype is a list", lambda s: edit(s, on_tensor("dtype", ["float32"]), sign=True), True),
    ("shape of 10**15 elements", lambda s: edit(s, huge_shape, sign=True), True),
    ("tree is a list", lambda s: edit(s, set_in(["tree"], [1, 2]), sign=True), True),
    (
        "tree nests 500 deep",
        lambda s: edit(s, set_in(["tree", "epoch", "value"], nested(500)), sign=True),
        True,
    ),
    ("tree names a number", lambda s: edit(s, tree_names_a_number, sign=True), True),
    (
        "tree names a missing tensor",
        lambda s: edit(
            s,
            set_in(["tree", "epoch", "value"], {"__ckptwise__": "tensor", "name": "nope"}),
            sign=True,
        ),
        True,
    ),
    (
        "metric_history malformed",
        lambda s: edit(s, set_in(["extra", "metric_history"], {"loss": {"count": "x"}}), sign=True),
        True,
    ),
    (
        "save_costs huge",
        lambda s: edit(s, set_in(["extra", "save_costs"], [1e300]), sign=True),
        True,
    ),
    (
        "bases huge",
        lambda s: edit(s, on_tensor("bases", [["ab" * 32, "raw", 1]] * 100_000), sign=True),
        True,
    ),
    (
        "object links outside",
        lambda s: replace(s, s.only_newest()[0], lambda p: p.symlink_to(s.target)),
        True,
    ),
    ("object is a FIFO", lambda s: replace(s, s.only_newest()[0], os.mkfifo), True),
    ("object is a folder", lambda s: replace(s, s.only_newest()[0], lambda p: p.mkdir()), True),
    (
        "object is a pickle",
        lambda s: replace(
            s, s.only_newest()[0], write_bytes(pickle.dumps(Planted(s.outside / "pwned")))
        ),
        True,
    ),
    (
        "object is a zstd bomb",
        lambda s: replace(s, s.only_newest()[0], write_bytes(zstd_bomb_header())),
        True,
    ),
    (
        "object truncated",
        lambda s: truncate(s.root / bytegroup_object(s), 20),
        True,
    ),
    ("object folder links outside", lambda s: link_folder_outside(s, unique_folder(s)), True),
    ("checkpoints/ links outside", lambda s: link_folder_outside(s, "checkpoints"), False),
    ("objects/ links outside", lambda s: link_folder_outside(s, "objects"), False),
]


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s: a read hung or exhausted something")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outside_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def exercise(scene: Scene) -> int | None:
    """Open, list, verify and restore the run as a reader, then open it as a writer (which
    cleans and collects garbage); the step restored, if any."""
    restored = None
    try:
        run = cw.open_run(scene.root)
        run.checkpoints()
        run.verify()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = run.restore({"model": model(), "epoch": 0})
    except CheckpointError:
        pass
    with contextlib.suppress(CheckpointError):
        cw.CheckpointManager(scene.root, save=cw.every(1)).close()
    return restored


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return build(tmp_path_factory.mktemp("hostile"))


def fresh(template: Scene, tmp_path: Path) -> Scene:
    shutil.copytree(template.root, tmp_path / "run", symlinks=True)
    shutil.copytree(template.outside, tmp_path / "outside")
    return Scene(
        tmp_path / "run", tmp_path / "outside", tmp_path / "outside" / "target.json", template.saved
    )


@pytest.mark.parametrize(("name", "damage", "older_restores"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_run_raises_only_checkpoint_errors_and_touches_nothing_outside(
    template: Scene,
    tmp_path: Path,
    name: str,
    damage: Callable[[Scene], None],
    older_restores: bool,
) -> None:
    scene = fresh(template, tmp_path)
    damage(scene)
    before = outside_state(scene.outside)
    with time_limit(LIMIT_S):
        restored = exercise(scene)
    assert outside_state(scene.outside) == before, "a file outside the run changed"
    assert not (scene.outside / "pwned").exists(), "a planted pickle was loaded"
    if older_restores:
        assert restored == 1, f"{name}: the older, intact checkpoint did not restore"
        net = model()
        cw.open_run(scene.root).restore({"model": net, "epoch": 0}, step=1)
        for key, value in net.state_dict().items():
            assert torch.equal(value, scene.saved[1][key])


def test_the_cases_damage_what_they_say(template: Scene, tmp_path: Path) -> None:
    """The table's damage is real: each case makes the newest checkpoint unusable."""
    for name, damage, _ in CASES:
        scene = fresh(template, tmp_path / name.replace(" ", "_").replace("/", "_"))
        damage(scene)
        with time_limit(LIMIT_S):
            try:
                run = cw.open_run(scene.root)
            except CheckpointError:
                continue
            problems = run.verify()
            assert problems or 2 not in run.steps(), name
