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
import random
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptwise.errors import CheckpointError, ConfigError, CorruptCheckpointError, SnapshotError
from ckptwise.jsonvalues import TAG, Decode, Encode, ValueType, decode_value, encode_value
from ckptwise.snapshot.mismatch import Saved, is_stateful, optimizer_class, problems

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

#: the state entry that holds the RNG states of the process (reserved in users' states)
RNG_KEY = "__rng__"


@dataclass(frozen=True)
class Snapshot:
    """The tensors of a state by name, and the JSON tree that places them."""

    tensors: dict[str, torch.Tensor]
    tree: dict[str, Any]


class _Tensors:
    """The tensors of a tree by name: filled while a state is encoded (each tensor and
    numpy array under a unique name), read while a tree is decoded."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor] | None = None, *, arrays: bool = True
    ) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.arrays = arrays

    def _name(self, path: str) -> str:
        name, n = path, 1
        while name in self.tensors:
            n += 1
            name = f"{path}#{n}"
        return name

    def _tensor(self, value: torch.Tensor, path: str, encode: Encode) -> dict[str, Any]:
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            raise SnapshotError(
                f"{path}: {value.layout} / quantized / meta tensors cannot be saved; "
                "convert it to a dense tensor (e.g. .to_dense()) first"
            )
        name = self._name(path)
        self.tensors[name] = value
        return {"name": name}

    def _ndarray(self, value: Any, path: str, encode: Encode) -> dict[str, Any]:
        if value.dtype.byteorder == ">" or value.dtype.kind not in "biufc":
            raise SnapshotError(
                f"{path}: numpy arrays of dtype {value.dtype} cannot be saved; use a "
                "little-endian numeric dtype"
            )
        name = self._name(path)
        self.tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {"name": name}

    def _named(self, fields: Mapping[str, Any], where: str) -> torch.Tensor:
        name = fields.get("name")
        if not isinstance(name, str) or name not in self.tensors:
            raise CorruptCheckpointError(
                f"{where}: the state tree names tensor {name!r}, which is missing"
            )
        return self.tensors[name]

    def _read_tensor(self, fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        return self._named(fields, where)

    def _read_ndarray(self, fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
        t = self._named(fields, where)
        return t.numpy().copy() if self.arrays else t

    def types(self) -> tuple[ValueType, ...]:
        """What the snapshot's tree holds beyond JSON: tensors, numpy arrays and scalars."""
        return (
            ValueType(
                "tensor", lambda v: isinstance(v, torch.Tensor), self._tensor, self._read_tensor
            ),
            ValueType(
                "ndarray", lambda v: isinstance(v, np.ndarray), self._ndarray, self._read_ndarray
            ),
            _NPSCALAR,
        )


def _npscalar_to_json(value: Any, path: str, encode: Encode) -> dict[str, Any]:
    return {"dtype": value.dtype.str, "value": encode(value.item(), path)}


def _npscalar_from_json(fields: Mapping[str, Any], where: str, decode: Decode) -> Any:
    return np.dtype(fields["dtype"]).type(decode(fields["value"], where))


#: numpy scalars; ``float64`` and ``str_`` subclass ``float`` and ``str``, and stay plain
_NPSCALAR = ValueType(
    "npscalar",
    lambda v: isinstance(v, np.generic) and not isinstance(v, (float, str)),
    _npscalar_to_json,
    _npscalar_from_json,
)


def capture(state: Mapping[str, Any]) -> Snapshot:
    """Walk ``state`` and return its tensors (not copied) and the tree that places them.

    The tensors still alias the live state: a writer must finish with them, or copy them,
    before training mutates them again.
    """
    found = _Tensors()
    types = found.types()
    tree: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise SnapshotError(
                f"state keys must be non-empty strings without '/', got {key!r}; "
                "e.g. {'model': model, 'optimizer': optimizer}"
            )
        if is_stateful(value):
            state_dict = value.state_dict()
            tree[key] = {"kind": "stateful", "state": encode_value(state_dict, key, types=types)}
            kind = optimizer_class(value)
            if kind is not None:  # what the fit check compares before a restore
                tree[key]["class"] = kind
        else:
            tree[key] = {"kind": "value", "value": encode_value(value, key, types=types)}
    return Snapshot(found.tensors, tree)


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
    return decode_value(value, key, types=_Tensors(tensors, arrays=arrays).types())


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
    """Every way the saved ``tree`` does not fit ``state`` (see :mod:`ckptwise.snapshot.mismatch`),
    one line each, and the names of the saved tensors whose shape or dtype disagrees;
    ``tensors`` need only carry shapes and dtypes."""
    saved: dict[str, Saved] = {}
    for key in state:
        if key in tree:
            value = rebuild(tree, tensors, key, arrays=False)  # checks the node's form
            saved[key] = (tree[key]["kind"], value)
    classes = {
        k: v["class"]
        for k, v in tree.items()
        if k in state and isinstance(v, dict) and isinstance(v.get("class"), str)
    }
    blamed: list[Any] = []
    found = problems(
        state,
        {**dict.fromkeys(tree, ("", None)), **saved},
        strict=strict,
        blamed=blamed,
        classes=classes,
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
    when CUDA is initialised, every CUDA device's generator. Loading a state that holds only
    some of them (``"python"``, ``"numpy"``, ``"torch"``, ``"cuda"``) leaves the others as
    they are: a rank that did not exist when a checkpoint was saved keeps its own
    generators where the saved ranks' differed (see :func:`ckptwise.distributed.restore.plan_rank`).
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
        if "python" in state:
            random.setstate(state["python"])
        if "numpy" in state:
            np.random.set_state(state["numpy"])
        if "torch" in state:
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
