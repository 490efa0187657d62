"""What every policy module builds on: the two protocols, their combinators and the
argument checks.

Triggers (:class:`Trigger`) combine with ``|`` into :class:`AnyOf` and with ``&`` into
:class:`AllOf`, and :func:`after` holds any of them back until a step; retention policies (:class:`RetentionPolicy`) combine with ``|`` into
:class:`KeepAny`. A policy class gets the operators by inheriting :class:`TriggerOps` or
:class:`RetentionOps`; every operand is checked with :func:`check_trigger` or
:func:`check_retention`, so ``cw.every(10) | 5`` fails where it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, runtime_checkable

from ckptwise.errors import ConfigError
from ckptwise.policy.state import Decision, Request, RetentionContext, TrainingState

__all__ = [
    "After",
    "AllOf",
    "AnyOf",
    "KeepAny",
    "Kept",
    "Mode",
    "RetentionOps",
    "RetentionPolicy",
    "Trigger",
    "TriggerOps",
    "after",
    "check_mode",
    "check_retention",
    "check_trigger",
    "merge_kept",
    "non_negative_int",
    "positive_int",
    "walk",
]

Mode = Literal["min", "max"]

#: Steps a retention policy keeps, each with its reasons.
Kept = dict[int, tuple[str, ...]]


# -- argument checks ---------------------------------------------------------------------------


def positive_int(name: str, value: object, fix: str) -> int:
    """``value`` if it is an integer >= 1 (not a bool); else a ConfigError ending in ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; {fix}")
    return value


def non_negative_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 0 (not a bool); else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_mode(mode: object) -> Mode:
    """``mode`` if it is ``"min"`` or ``"max"``; else a ConfigError that says which is which."""
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    raise ConfigError(
        f"mode must be 'min' (lower is better, e.g. a loss) or 'max' (e.g. accuracy), got {mode!r}"
    )


# -- the protocols -----------------------------------------------------------------------------


@runtime_checkable
class Trigger(Protocol):
    """Anything that decides whether the step in a :class:`TrainingState` should be saved."""

    def decide(self, state: TrainingState) -> Decision:
        """Return the decision for ``state``; must not depend on anything but ``state``."""
        ...


@runtime_checkable
class RetentionPolicy(Protocol):
    """Anything that picks checkpoints to keep."""

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        """Steps this policy wants kept, each with the reasons; others it does not protect."""
        ...


def check_trigger(value: object) -> Trigger:
    """``value`` if it is a trigger; else the ConfigError a ``save=`` argument gets."""
    if not isinstance(value, Trigger):
        raise ConfigError(
            f"save= expects triggers such as cw.every(1000); got {value!r} "
            f"({type(value).__name__}), which has no decide(state) method"
        )
    return value


def check_retention(value: object) -> RetentionPolicy:
    """``value`` if it is a retention policy; else the ConfigError a ``keep=`` argument gets."""
    if not isinstance(value, RetentionPolicy):
        raise ConfigError(
            f"keep= expects a retention policy such as cw.keep_last(3), got {value!r} "
            f"({type(value).__name__}), which has no select(context) method"
        )
    return value


# -- combinators -------------------------------------------------------------------------------

_P = TypeVar("_P")


def _flatten(
    parts: Iterable[object],
    check: Callable[[object], _P],
    inner: Callable[[_P], tuple[_P, ...] | None],
) -> tuple[_P, ...]:
    """Check every part and splice in the parts of those of the same combinator, so that
    ``(a | b) | c`` and ``a | (b | c)`` are the same value."""
    out: list[_P] = []
    for part in parts:
        checked = check(part)
        nested = inner(checked)
        out.extend(nested if nested is not None else (checked,))
    return tuple(out)


class TriggerOps:
    """Gives a trigger class ``|`` (any) and ``&`` (all)."""

    def __or__(self, other: Trigger) -> AnyOf:
        return AnyOf.of(self, other)

    def __ror__(self, other: Trigger) -> AnyOf:
        return AnyOf.of(other, self)

    def __and__(self, other: Trigger) -> AllOf:
        return AllOf.of(self, other)

    def __rand__(self, other: Trigger) -> AllOf:
        return AllOf.of(other, self)


class RetentionOps:
    """Gives a retention policy class ``|`` (keep what either keeps)."""

    def __or__(self, other: RetentionPolicy) -> KeepAny:
        return KeepAny.of(self, other)

    def __ror__(self, other: RetentionPolicy) -> KeepAny:
        return KeepAny.of(other, self)


@dataclass(frozen=True)
class AnyOf(TriggerOps):
    """Saves when any of its triggers fires; the decision lists every trigger that fired and
    every request they answered."""

    triggers: tuple[Trigger, ...]

    @classmethod
    def of(cls, *triggers: object) -> AnyOf:
        """``triggers[0] | triggers[1] | ...``, flattened."""
        return cls(
            _flatten(triggers, check_trigger, lambda t: t.triggers if isinstance(t, cls) else None)
        )

    def decide(self, state: TrainingState) -> Decision:
        reasons: list[str] = []
        requests: set[Request] = set()
        for trigger in self.triggers:
            decision = trigger.decide(state)
            if decision.save:
                reasons.extend(decision.reasons)
                requests |= decision.requests
        return Decision(bool(reasons), tuple(reasons), frozenset(requests))


@dataclass(frozen=True)
class AllOf(TriggerOps):
    """Saves only when every one of its triggers fires; the reasons and requests of all are
    recorded."""

    triggers: tuple[Trigger, ...]

    @classmethod
    def of(cls, *triggers: object) -> AllOf:
        """``triggers[0] & triggers[1] & ...``, flattened."""
        return cls(
            _flatten(triggers, check_trigger, lambda t: t.triggers if isinstance(t, cls) else None)
        )

    def decide(self, state: TrainingState) -> Decision:
        reasons: list[str] = []
        requests: set[Request] = set()
        for trigger in self.triggers:
            decision = trigger.decide(state)
            if not decision.save:
                return Decision.no()
            reasons.extend(decision.reasons)
            requests |= decision.requests
        return Decision(True, tuple(reasons), frozenset(requests))


@dataclass(frozen=True)
class After(TriggerOps):
    """Lets ``trigger`` save only from step ``start`` on: the run-wide warm-up.

    Before ``start`` it passes on only the decisions that must never be lost: a save of the
    step marked final (``manager.step(..., final=True)``) and a save that answers an outside
    request (``on_signal``, ``on_file``); every other decision of ``trigger`` becomes "no".
    From ``start`` on it is ``trigger`` itself.
    """

    start: int
    trigger: Trigger

    def __post_init__(self) -> None:
        non_negative_int("after(start)", self.start)
        check_trigger(self.trigger)

    def decide(self, state: TrainingState) -> Decision:
        decision = self.trigger.decide(state)
        if state.step >= self.start or not decision.save:
            return decision
        if state.final or decision.requests:
            return decision
        return Decision.no()


def after(start: int, trigger: Trigger) -> After:
    """No saves of ``trigger`` before step ``start``, except the final one and those a signal
    or request file asks for.

    ``after(2000, every(1000) | on_improvement("eval_loss"))`` first saves at step 2000
    (``start=`` of :func:`~ckptwise.every` applies to that one trigger only).
    """
    return After(start, trigger)


def merge_kept(into: Kept, more: Mapping[int, tuple[str, ...]]) -> None:
    """Add the steps of ``more`` to ``into``, appending reasons ``into`` lacks."""
    for step, reasons in more.items():
        have = into.get(step, ())
        into[step] = have + tuple(r for r in reasons if r not in have)


@dataclass(frozen=True)
class KeepAny(RetentionOps):
    """Keeps what any of its policies keeps."""

    policies: tuple[RetentionPolicy, ...]

    @classmethod
    def of(cls, *policies: object) -> KeepAny:
        """``policies[0] | policies[1] | ...``, flattened."""
        return cls(
            _flatten(
                policies, check_retention, lambda p: p.policies if isinstance(p, cls) else None
            )
        )

    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        kept: Kept = {}
        for policy in self.policies:
            merge_kept(kept, policy.select(context))
        return kept


def walk(trigger: Trigger) -> Iterator[Trigger]:
    """Every leaf trigger inside ``trigger`` (through ``|``, ``&`` and :func:`after`), depth
    first."""
    if isinstance(trigger, (AnyOf, AllOf)):
        for inner in trigger.triggers:
            yield from walk(inner)
    elif isinstance(trigger, After):
        yield from walk(trigger.trigger)
    else:
        yield trigger
