"""Fuzz the read path: mutate copies of a real run and check that reading them fails cleanly.

It builds three small runs through the public API (codecs ``raw``, ``zstd`` and
``bytegroup`` with deltas, three checkpoints each), then per case copies one, mutates it
and opens, lists, verifies and restores the copy, classifying what happened:

- byte edits of any file (flip a bit, insert, delete, truncate, append, empty, random
  bytes, swap two objects);
- JSON-aware edits of a manifest (change a node's type or value, nest it, remove a field),
  left unsigned (the digest must catch them);
- the same JSON edits *forged*: the digest recomputed, as a buggy or hostile writer would,
  so the validators behind it must catch them. Forged edits change what the manifest
  itself describes (its fields, tensor entries, the state tree's structure and
  bookkeeping), not the values inside a saved state dict, whose meaning belongs to the
  object that saved it.

Prints a table of outcomes per kind of mutation and exits 1 if any exception outside
:class:`ckptwise.CheckpointError` escaped, a case ran past its time limit, or a restore of
an unforged copy returned data that differs from what was saved without an error (silent
corruption).

    .venv/bin/python scripts/fuzz_store.py --count 10000 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ckptwise as cw
from ckptwise.store.manifest import manifest_digest

#: how long one case may take before it counts as a hang
LIMIT_S = 20
RUNS = {
    "raw": {"codec": "raw"},
    "zstd": {"codec": "zstd"},
    "deltas": {"codec": "bytegroup", "deltas": 3},
}


@dataclass(frozen=True)
class Pristine:
    """One built run and what each of its checkpoints holds."""

    root: Path
    tensors: dict[int, dict[str, torch.Tensor]]
    trees: dict[int, Any]


def state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return {"model": model, "optimizer": optimizer, "epoch": 0}


def train(live: dict[str, Any]) -> None:
    model, optimizer = live["model"], live["optimizer"]
    loss = model(torch.randn(8, 16)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    live["epoch"] += 1


def build(folder: Path) -> dict[str, Pristine]:
    runs = {}
    for name, options in RUNS.items():
        root = folder / name
        live = state(0)
        manager = cw.CheckpointManager(root, save=cw.every(1), **options)  # type: ignore[arg-type]
        for step in (1, 2, 3):
            train(live)
            manager.step(step, live, metrics={"loss": 1.0 / step})
        manager.close()
        run = cw.open_run(root)
        tensors, trees = {}, {}
        for step in run.steps():
            loaded = run.read(step)
            assert loaded is not None
            tensors[step] = {k: v.clone() for k, v in loaded.tensors.items()}
            trees[step] = loaded.manifest.tree
        runs[name] = Pristine(root, tensors, trees)
    return runs


# -- mutations ---------------------------------------------------------------------------


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def byte_edit(rng: random.Random, root: Path) -> str:
    path = rng.choice(files(root))
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "insert", "delete", "truncate", "append", "empty", "random", "swap"])
    at = rng.randrange(len(data) + 1)
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete" and data:
        del data[at : at + rng.randint(1, 16)]
    elif kind == "truncate":
        del data[at:]
    elif kind == "append":
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == "empty":
        data = bytearray()
    elif kind == "random":
        data = bytearray(rng.randbytes(max(1, len(data))))
    elif kind == "swap":
        objects = [p for p in files(root) if "objects" in p.parts]
        other = rng.choice(objects)
        data = bytearray(other.read_bytes())
    path.write_bytes(bytes(data))
    return f"bytes:{kind}"


#: values a JSON edit puts somewhere
ODD = [
    None,
    True,
    0,
    -1,
    10**400,
    1e308,
    1.5,
    "",
    "x" * 300,
    "float32",
    [],
    [1, [2]],
    {},
    {"__ckptwise__": "tensor", "name": "model/0.weight"},
    {"__ckptwise__": "mystery"},
]


def nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from nodes(v, (*path, i))


def in_state_values(path: tuple[Any, ...], doc: dict[str, Any]) -> bool:
    """Whether ``path`` lies inside a saved state's plain values (not tagged nodes)."""
    if len(path) < 4 or path[0] != "tree":
        return False
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    return not (isinstance(node, dict) and "__ckptwise__" in node)


def json_edit(rng: random.Random, root: Path, *, forge: bool) -> str:
    manifests = [p for p in files(root) if p.parent.name == "checkpoints"]
    path = rng.choice(manifests)
    doc = json.loads(path.read_text())
    doc.pop("digest", None)
    choices = [(p, v) for p, v in nodes(doc) if p and not (forge and in_state_values(p, doc))]
    where, value = rng.choice(choices)
    parent: Any = doc
    for key in where[:-1]:
        parent = parent[key]
    kind = rng.choice(["type", "value", "nest", "remove"])
    if kind == "remove" and isinstance(parent, dict):
        del parent[where[-1]]
    elif kind == "nest":
        parent[where[-1]] = [value] if rng.random() < 0.5 else {"x": value}
    elif kind == "value" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[where[-1]] = rng.choice([value + 1, -value, value * 2**60, 0])
    else:
        parent[where[-1]] = rng.choice(ODD)
    text = json.dumps(doc)
    if forge:
        doc["digest"] = manifest_digest(json.loads(text))
        text = json.dumps(doc)
    path.write_text(text)
    return f"{'forged' if forge else 'json'}:{kind}"


# -- one case ------------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
        )
    return bool(a == b)


def attempt(pristine: Pristine, root: Path) -> str:
    """Open, list, verify and restore ``root``: ``ok``, or what went wrong."""
    run = cw.open_run(root)
    run.checkpoints()
    seen = "detected" if run.verify() else "unnoticed"
    loaded = run.read()
    if loaded is None:
        return f"ok, {seen}, nothing to read"
    want = pristine.tensors[loaded.step]
    if loaded.tensors.keys() != want.keys() or not all(
        same(loaded.tensors[k], want[k]) for k in want
    ):
        return "SILENT: tensors differ"
    if loaded.manifest.tree != pristine.trees[loaded.step]:
        return "SILENT: tree differs"
    live = state(1)
    restored = run.restore(live, rng=True)  # every entry, as read() reads them all
    if restored != loaded.step:
        return "SILENT: restore chose another step"
    newest = max(pristine.tensors)
    return f"ok, {seen}, restored {'the newest' if restored == newest else 'an older'} step"


def classify(pristine: Pristine, root: Path) -> str:
    try:
        with warnings.catch_warnings(), time_limit(LIMIT_S):
            warnings.simplefilter("ignore")
            return attempt(pristine, root)
    except Hang:
        return "HANG"
    except cw.CheckpointError as exc:
        return type(exc).__name__
    except Exception as exc:  # what this script exists to find
        return f"ESCAPED: {type(exc).__name__}: {str(exc)[:80]}"


def bad(outcome: str, mutation: str) -> bool:
    if outcome.startswith(("ESCAPED", "HANG")):
        return True
    return outcome.startswith("SILENT") and not mutation.startswith("forged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    table: Counter[tuple[str, str]] = Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ckptwise-fuzz-") as tmp:
        folder = Path(tmp)
        runs = build(folder / "pristine")
        for case in range(args.count):
            name = rng.choice(sorted(runs))
            copy = folder / "case"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(runs[name].root, copy)
            roll = rng.random()
            if roll < 0.4:
                mutation = byte_edit(rng, copy)
            else:
                mutation = json_edit(rng, copy, forge=roll >= 0.7)
            outcome = classify(runs[name], copy)
            table[(mutation, outcome)] += 1
            if bad(outcome, mutation):
                failures.append(f"case {case} ({name}, {mutation}): {outcome}")
    width = max(len(m) for m, _ in table) + 2
    print(f"{'mutation':<{width}}{'outcome':<60}count")
    for (mutation, outcome), n in sorted(table.items()):
        print(f"{mutation:<{width}}{outcome:<60}{n}")
    print(f"{args.count} cases, seed {args.seed}: {len(failures)} failure(s)")
    for line in failures[:50]:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
