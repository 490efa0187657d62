"""What makes a checkpoint not fit the live state it is restored into, found before anything
is written into that state.

A restore checks the whole state first and raises one error listing every problem, so it
either completes or changes nothing. What is compared:

- modules (``nn.Module``): the state dict's keys both ways, and each tensor's shape and
  dtype (``load_state_dict`` would cast another dtype silently);
- optimizers: their class (``"class"`` in the saved tree, see :func:`optimizer_class`;
  checkpoints written before it was recorded have none, and then only the next point
  decides), and the hyper-parameter names of each parameter group, where the classes differ
  or the saved one is unknown: loading AdamW's groups into an ``SGD(momentum=0.9)`` raised
  nothing and its next ``step()`` failed with ``KeyError: 'momentum'`` (one class's names
  are not compared, since torch adds names between versions and fills them in itself when
  it loads older groups);
- optimizers: the number of parameter groups, the parameters in each, and the shape of each
  parameter's saved state against that parameter and against the live state it already has.
  ``Optimizer.load_state_dict`` checks none of the shapes, so an optimizer built over another
  model's parameters loaded without a word and failed at its next step. A parameter's saved
  state fits when one of its tensors (of one dimension or more) has the parameter's shape, or
  when each has the parameter's number of dimensions with every size equal or 1 (factored
  states such as Adafactor's); scalars such as ``step`` are not compared;
- plain tensors: shape and dtype (any non-tensor placeholder, such as ``None``, takes the
  saved tensor as it is);
- every entry: stateful (``load_state_dict``) now as when saved, and with ``strict`` present
  in the checkpoint.

Other stateful objects (schedulers, samplers, your own classes) are checked for their kind
only: what their ``load_state_dict`` accepts is theirs to say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:
    from ckptwise._lazy import torch

__all__ = ["Saved", "is_stateful", "optimizer_class", "problems"]

#: one saved top-level entry: its kind (``"stateful"`` or ``"value"``) and its value, whose
#: tensors need only carry the saved shape and dtype (meta tensors do)
Saved = tuple[str, Any]

#: problems listed per entry before the rest are only counted
_MOST = 6


def is_stateful(value: object) -> bool:
    """Whether ``value`` saves and loads itself (``state_dict``/``load_state_dict``)."""
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def optimizer_class(value: object) -> str | None:
    """The class name of the optimizer ``value`` is or wraps (accelerate's and Lightning's
    wrappers hold it as ``.optimizer``), e.g. ``"AdamW"``; ``None`` for anything else."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = getattr(value, "optimizer", None)
        if inner is None or inner is value or not isinstance(inner, torch.optim.Optimizer):
            break
        value = inner
    return type(value).__qualname__ if isinstance(value, torch.optim.Optimizer) else None


def problems(
    state: Mapping[str, Any],
    saved: Mapping[str, Saved],
    *,
    strict: bool,
    blamed: list[Any] | None = None,
    classes: Mapping[str, str] | None = None,
) -> list[str]:
    """Every way ``saved`` does not fit ``state``, one line each; empty when it fits.

    ``classes`` holds the optimizer class each entry was saved from, where the checkpoint
    recorded it. The saved tensors whose shape or dtype disagrees are appended to ``blamed``.
    """
    blamed = [] if blamed is None else blamed
    found: list[str] = []
    missing = [k for k in state if k not in saved]
    if missing and strict:
        found.append(
            f"no entry for {_names(missing)} (it has {_names(saved)}); pass strict=False to "
            "restore only what it holds"
        )
    for key, value in state.items():
        if key not in saved:
            continue
        kind, old = saved[key]
        what = f"{key!r} ({type(value).__name__})"
        stateful = is_stateful(value)
        if kind == "stateful" and not stateful:
            found.append(
                f"{key!r} was saved from an object with load_state_dict(), but the state now "
                f"holds a {type(value).__name__}"
            )
        elif kind != "stateful" and stateful:
            found.append(
                f"{what} has load_state_dict(), but the checkpoint holds a plain "
                f"{type(old).__name__} for it"
            )
        elif isinstance(value, torch.nn.Module):
            found += _limit(what, _module(value, old, blamed))
        elif isinstance(value, torch.optim.Optimizer):
            saved_class = (classes or {}).get(key)
            found += _limit(what, _optimizer(value, old, blamed, saved_class, key))
        elif _differ(value, old):
            blamed.append(old)
            found.append(
                f"{key!r}: saved as {_describe(old)}, the live tensor is {_describe(value)}"
            )
    return found


def _module(module: torch.nn.Module, saved: Any, blamed: list[Any]) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"the checkpoint holds a {type(saved).__name__}, not a state dict"]
    live = module.state_dict()
    out = []
    lacks = [k for k in live if k not in saved]
    if lacks:
        out.append(f"the checkpoint lacks {_names(lacks)}")
    extra = [k for k in saved if k not in live]
    if extra:
        out.append(f"the checkpoint has {_names(extra)}, which the live one lacks")
    for name, tensor in live.items():
        old = saved.get(name)
        if _differ(tensor, old):
            blamed.append(old)
            out.append(f"{name!r} saved as {_describe(old)}, the live one is {_describe(tensor)}")
    return out


def _optimizer(
    optimizer: torch.optim.Optimizer,
    saved: Any,
    blamed: list[Any],
    saved_class: str | None,
    key: str,
) -> list[str]:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    states = saved.get("state", {}) if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not isinstance(states, Mapping):
        return ["the checkpoint holds no optimizer state dict (param_groups and state)"]
    live_groups = optimizer.param_groups
    if len(groups) != len(live_groups):
        return [f"saved with {len(groups)} parameter group(s), the live one has {len(live_groups)}"]
    out = _optimizer_kind(live_groups, groups, optimizer_class(optimizer), saved_class, key)
    for i, (group, live_group) in enumerate(zip(groups, live_groups, strict=True)):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(live_group["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            out.append(
                f"group {i} was saved with {count} parameter(s), the live one has "
                f"{len(live_group['params'])}"
            )
    if out:
        return out
    params = {
        pid: (i, p)
        for i, (group, live_group) in enumerate(zip(groups, live_groups, strict=True))
        for pid, p in zip(group["params"], live_group["params"], strict=True)
    }
    live_state = getattr(optimizer, "state", {})
    for pid, kept in states.items():
        if pid not in params or not isinstance(kept, Mapping):
            continue
        i, param = params[pid]
        shaped = {n: t for n, t in kept.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
        where = f"parameter {pid} (group {i}, shape {_shape(param)})"
        if not _fits_param([tuple(t.shape) for t in shaped.values()], tuple(param.shape)):
            shapes = ", ".join(f"{n} {_shape(t)}" for n, t in shaped.items())
            blamed.extend(shaped.values())
            out.append(
                f"the state of {where} is shaped for another parameter ({shapes}): an "
                "optimizer built over another model's parameters?"
            )
            continue
        now = live_state.get(param, {}) if isinstance(live_state, Mapping) else {}
        for n, t in shaped.items():
            live = now.get(n) if isinstance(now, Mapping) else None
            if isinstance(live, torch.Tensor) and live.dim() > 0 and live.shape != t.shape:
                blamed.append(t)
                out.append(
                    f"{where}: state {n!r} saved as {_shape(t)}, the live one is {_shape(live)}"
                )
    return out


def _optimizer_kind(
    live_groups: Sequence[Mapping[str, Any]],
    groups: Sequence[Any],
    live_class: str | None,
    saved_class: str | None,
    key: str,
) -> list[str]:
    """Whether the saved optimizer is of the live one's kind: its class, and its groups'
    hyper-parameter names where the classes differ or the saved one is unknown."""
    out: list[str] = []
    article = "an" if (saved_class or "x")[0] in "AEIOUaeiou" else "a"
    kind = f"{article} {saved_class} optimizer" if saved_class else "the optimizer that was saved"
    fix = f"build {kind} to restore into, or leave {key!r} out of the state passed to restore"
    if saved_class is not None and live_class is not None and saved_class != live_class:
        out.append(f"saved from {saved_class}, the live optimizer is {live_class}: {fix}")
    if saved_class is not None and saved_class == live_class:
        return out
    for i, (group, live_group) in enumerate(zip(groups, live_groups, strict=True)):
        if not isinstance(group, Mapping):
            continue
        names, live = set(group) - {"params"}, set(live_group) - {"params"}
        if names == live:
            continue
        lacks, extra = sorted(live - names), sorted(names - live)
        parts = [f"lack {_names(lacks)}"] if lacks else []
        parts += [f"have {_names(extra)}, which the live one's lack"] if extra else []
        out.append(
            f"group {i}'s saved hyper-parameters {' and '.join(parts)} (another kind of "
            f"optimizer?): {fix}"
        )
    return out


def _fits_param(shapes: Sequence[tuple[int, ...]], param: tuple[int, ...]) -> bool:
    """Whether per-parameter state tensors of ``shapes`` can belong to a parameter of
    shape ``param`` (see the module doc)."""
    if not shapes or param in shapes:
        return True
    return all(
        len(s) == len(param) and all(a in (b, 1) for a, b in zip(s, param, strict=True))
        for s in shapes
    )


def _differ(live: Any, saved: Any) -> bool:
    """Whether both are tensors, of another shape or dtype."""
    if not (isinstance(live, torch.Tensor) and isinstance(saved, torch.Tensor)):
        return False
    return tuple(live.shape) != tuple(saved.shape) or live.dtype != saved.dtype


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def _describe(tensor: Any) -> str:
    return f"{_shape(tensor)} {str(tensor.dtype).removeprefix('torch.')}"


def _names(keys: Any) -> str:
    listed = [repr(k) for k in keys]
    if len(listed) > _MOST:
        return ", ".join(listed[:_MOST]) + f" and {len(listed) - _MOST} more"
    return ", ".join(listed)


def _limit(what: str, found: list[str]) -> list[str]:
    """One entry's problems, each prefixed by the entry, the first few in full."""
    lines = [f"{what}: {line}" for line in found[:_MOST]]
    if len(found) > _MOST:
        lines.append(f"{what}: and {len(found) - _MOST} more like these")
    return lines
