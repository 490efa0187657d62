"""Turning a training state into named tensors plus a JSON tree, and back, without pickle.

A *state* is a dict whose values are objects with ``state_dict()``/``load_state_dict()``
(models, optimizers, schedulers, grad scalers, samplers, your own classes), tensors, or JSON
values. :func:`capture` walks it and returns every tensor under a stable name together with a
JSON tree that records where each tensor goes; :func:`apply` rebuilds the state dicts from
such a tree and loads them back into the live objects.

Everything that is not a tensor must be JSON-like: ``None``, ``bool``, ``int``, ``float``
(NaN and infinities included), ``str``, lists, tuples, dicts with str/int/float/bool/None
keys, numpy arrays and numpy scalars. Anything else raises :class:`SnapshotError` naming
where it sits, rather than being pickled.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptwise.errors import CheckpointError, ConfigError, CorruptCheckpointError, SnapshotError
from ckptwise.mismatch import Saved, is_stateful, problems

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    from ckptwise._lazy import np, torch

__all__ = [
    "RNG_KEY",
    "ModelWeights",
    "RngState",
    "Snapshot",
    "apply",
    "capture",
    "check_fits",
    "fit_problems",
    "misfit_message",
    "rebuild",
    "tensor_names",
]

log = logging.getLogger("ckptwise")

TAG = "__ckptwise__"
#: the state entry that holds the RNG states of the process (reserved in users' states)
RNG_KEY = "__rng__"


@dataclass(frozen=True)
class Snapshot:
    """The tensors of a state by name, and the JSON tree that places them."""

    tensors: dict[str, torch.Tensor]
    tree: dict[str, Any]


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _name(self, path: str) -> str:
        name, n = path, 1
        while name in self.tensors:
            n += 1
            name = f"{path}#{n}"
        return name

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized or value.is_meta:
                raise SnapshotError(
                    f"{path}: {value.layout} / quantized / meta tensors cannot be saved; "
                    "convert it to a dense tensor (e.g. .to_dense()) first"
                )
            name = self._name(path)
            self.tensors[name] = value
            return {TAG: "tensor", "name": name}
        if isinstance(value, np.ndarray):
            if value.dtype.byteorder == ">" or value.dtype.kind not in "biufc":
                raise SnapshotError(
                    f"{path}: numpy arrays of dtype {value.dtype} cannot be saved; use a "
                    "little-endian numeric dtype"
                )
            name = self._name(path)
            self.tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
            return {TAG: "ndarray", "name": name}
        if isinstance(value, np.generic):
            return {
                TAG: "npscalar",
                "dtype": value.dtype.str,
                "value": self.encode(value.item(), path),
            }
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) for k in value) and TAG not in value
            if plain:
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise SnapshotError(
                        f"{path}: dict key {k!r} of type {type(k).__name__} cannot be saved; "
                        "use str, int, float, bool or None keys"
                    )
                items.append([self.encode(k, path), self.encode(v, f"{path}/{k}")])
            return {TAG: "dict", "items": items}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {
                TAG: "tuple",
                "items": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)],
            }
        raise SnapshotError(
            f"{path}: cannot save a value of type {type(value).__module__}.{type(value).__qualname__} "
            "without pickling it; give the object state_dict()/load_state_dict() methods that "
            "return tensors and JSON values, or leave it out of the state"
        )


def capture(state: Mapping[str, Any]) -> Snapshot:
    """Walk ``state`` and return its tensors (not copied) and the tree that places them.

    The tensors still alias the live state: a writer must finish with them, or copy them,
    before training mutates them again.
    """
    encoder = _Encoder()
    tree: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise SnapshotError(
                f"state keys must be non-empty strings without '/', got {key!r}; "
                "e.g. {'model': model, 'optimizer': optimizer}"
            )
        if is_stateful(value):
            tree[key] = {"kind": "stateful", "state": encoder.encode(value.state_dict(), key)}
        else:
            tree[key] = {"kind": "value", "value": encoder.encode(value, key)}
    return Snapshot(encoder.tensors, tree)


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], where: str, arrays: bool = True) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where, arrays) for v in node]
    if not isinstance(node, dict):
        raise CorruptCheckpointError(f"{where}: unexpected node {node!r} in the state tree")
    tag = node.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors, where, arrays) for k, v in node.items()}
    if tag in ("tensor", "ndarray"):
        name = node.get("name")
        if not isinstance(name, str) or name not in tensors:
            raise CorruptCheckpointError(
                f"{where}: the state tree names tensor {name!r}, which is missing"
            )
        t = tensors[name]
        return t.numpy().copy() if tag == "ndarray" and arrays else t
    if tag == "float":
        text = node.get("value")
        if text not in ("nan", "inf", "-inf"):
            raise CorruptCheckpointError(f"{where}: bad float literal {text!r}")
        return float(text)
    if tag == "npscalar":
        try:
            return np.dtype(node["dtype"]).type(_decode(node["value"], tensors, where, arrays))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: bad numpy scalar {node!r}") from exc
    if tag == "tuple":
        return tuple(_decode(v, tensors, where, arrays) for v in node.get("items", []))
    if tag == "dict":
        out = {}
        for pair in node.get("items", []):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError(f"{where}: bad dict item {pair!r}")
            out[_decode(pair[0], tensors, where, arrays)] = _decode(pair[1], tensors, where, arrays)
        return out
    raise CorruptCheckpointError(
        f"{where}: unknown node type {tag!r}; it may be written by a newer ckptwise"
    )


def rebuild(
    tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key: str, *, arrays: bool = True
) -> Any:
    """The saved value (for stateful entries: the state dict) of one top-level key.

    ``arrays=False`` leaves saved numpy arrays as the tensors that hold them (so ``tensors``
    may be meta tensors that only carry shapes and dtypes).
    """
    node = tree[key]
    if not isinstance(node, dict) or node.get("kind") not in ("stateful", "value"):
        raise CorruptCheckpointError(f"state entry {key!r} is malformed")
    value = node.get("state" if node["kind"] == "stateful" else "value")
    return _decode(value, tensors, key, arrays)


def tensor_names(tree: Mapping[str, Any], keys: Iterable[str]) -> set[str]:
    """The names of the tensors the entries ``keys`` of a saved tree place."""
    names: set[str] = set()
    stack = [tree[k] for k in keys if k in tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get(TAG) in ("tensor", "ndarray") and isinstance(node.get("name"), str):
                names.add(node["name"])
            else:
                stack.extend(node.values())
    return names


def fit_problems(
    state: Mapping[str, Any],
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Every way the saved ``tree`` does not fit ``state`` (see :mod:`ckptwise.mismatch`),
    one line each, and the names of the saved tensors whose shape or dtype disagrees;
    ``tensors`` need only carry shapes and dtypes."""
    saved: dict[str, Saved] = {}
    for key in state:
        if key in tree:
            value = rebuild(tree, tensors, key, arrays=False)  # checks the node's form
            saved[key] = (tree[key]["kind"], value)
    blamed: list[Any] = []
    found = problems(
        state, {**dict.fromkeys(tree, ("", None)), **saved}, strict=strict, blamed=blamed
    )
    named = {id(t): name for name, t in tensors.items()}
    return found, sorted({named[id(t)] for t in blamed if id(t) in named})


def misfit_message(where: str, found: list[str]) -> str:
    """The one error message for a state that does not fit ``where``."""
    lines = "\n".join(f"  - {line}" for line in found)
    return (
        f"{where} does not fit the state passed to restore, which was left unchanged:\n"
        f"{lines}\nBuild each object as the one that was saved (the same model, dtype and "
        "optimizer over the same parameters), or leave the entry out of the state"
    )


def check_fits(
    state: Mapping[str, Any],
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    where: str = "checkpoint",
) -> None:
    """Raise unless the saved ``tree`` loads into ``state`` (see :func:`fit_problems`).

    Raises:
        ConfigError: one error naming every entry, key and shape that does not fit.
    """
    found, _ = fit_problems(state, tree, tensors, strict=strict)
    if found:
        raise ConfigError(misfit_message(where, found))


def apply(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    where: str = "checkpoint",
) -> None:
    """Load a captured tree back into ``state``, after :func:`check_fits` passed.

    Objects with ``load_state_dict`` get their saved state dict; tensors are copied in place
    (so references held elsewhere see the restored values); other values are replaced in
    ``state``, as is a tensor where a non-tensor placeholder stood. With ``strict``, a key
    of ``state`` that the checkpoint lacks is an error.

    Raises:
        ConfigError: the checkpoint does not fit the state (nothing is loaded then), or an
            object the check cannot see into (a scheduler, your own class) refused what was
            saved for it; entries before it are already loaded.
    """
    check_fits(state, tree, tensors, strict=strict, where=where)
    for key, value in state.items():
        if key not in tree:
            continue
        saved = rebuild(tree, tensors, key)
        if tree[key]["kind"] == "stateful":
            try:
                value.load_state_dict(saved)
            except CheckpointError:
                raise
            except Exception as exc:  # the object's own refusal, e.g. torch's size mismatch
                raise ConfigError(
                    f"{where}: {key!r} ({type(value).__name__}) refused the state saved for it "
                    f"({type(exc).__name__}: {exc}); build the object as the one that was "
                    "saved (same model, same parameters in the optimizer), or leave it out of "
                    "the state passed to restore"
                ) from exc
        elif isinstance(value, torch.Tensor) and isinstance(saved, torch.Tensor):
            if saved is not value:  # not read straight into it
                with torch.no_grad():
                    value.copy_(saved)
        else:
            state[key] = saved


class RngState:
    """The random number generators of this process as a stateful object.

    Covers Python's ``random``, numpy's legacy global generator, torch's CPU generator and,
    when CUDA is initialised, every CUDA device's generator.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(legacy=False),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            states = state["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
            else:
                log.warning(
                    "checkpoint holds CUDA RNG states for %d devices but %d are visible; "
                    "CUDA RNG not restored",
                    len(states),
                    torch.cuda.device_count(),
                )


class ModelWeights:
    """A model's tensors as a stateful entry: all of them, or only trainable parameters,
    optionally cast to another floating-point dtype for storage.

    Loading back into the model accepts a partial set (trainable only) and casts back to
    the model's own dtypes.
    """

    def __init__(
        self, model: Any, *, trainable_only: bool = False, cast: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.trainable_only = trainable_only
        self.cast = cast

    def state_dict(self) -> dict[str, Any]:
        if self.trainable_only:
            if not isinstance(self.model, torch.nn.Module):
                raise SnapshotError(
                    f"trainable-only saves need an nn.Module, got {type(self.model).__name__}"
                )
            tensors: dict[str, Any] = {
                n: p for n, p in self.model.named_parameters() if p.requires_grad
            }
        else:
            tensors = dict(self.model.state_dict())
        if self.cast is not None:
            tensors = {
                k: v.detach().to(self.cast)
                if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v
                for k, v in tensors.items()
            }
        return tensors

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(dict(state), strict=not self.trainable_only)
