"""The one table of built-in policies that config files and the one-line form can name.

Each :class:`Spec` ties a config name to its class, its factory and its parameters, and each
:class:`Param` knows how a config value becomes an argument and how the object's attribute
becomes a config value again. Reading (:mod:`~ckptwise.config.mapping`,
:mod:`~ckptwise.config.oneline`) and writing back (:func:`~ckptwise.config.to_config`) both
go through :data:`SAVE` and :data:`KEEP`, so a new built-in policy needs one entry here.

An error about a value ends with an example of the policy in the form the user wrote it
(:data:`Spelling`): ``every: 1000`` in a file, ``every(1000)`` on a command line. The
readers check what the factories check for counts, durations and sizes, because the
factories' own messages show the Python spelling (``cw.every(1000)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckptwise.config.values import (
    closest,
    format_duration,
    read_duration,
    read_float,
    read_int,
    read_int_list,
    read_mode,
    read_positive_duration,
    read_positive_int,
    read_positive_size,
    read_schedule,
    read_signals,
    read_str,
)
from ckptwise.errors import ConfigError
from ckptwise.policy.requests import OnFile, OnSignal, on_file, on_signal
from ckptwise.policy.retention import (
    KeepAll,
    KeepBest,
    KeepBudget,
    KeepEvery,
    KeepLast,
    KeepWithin,
    keep_all,
    keep_best,
    keep_budget,
    keep_every,
    keep_last,
    keep_within,
)
from ckptwise.policy.timing import (
    EveryDuration,
    OptimalInterval,
    OverheadBudget,
    every_duration,
    optimal_interval,
    overhead_budget,
)
from ckptwise.policy.triggers import (
    AtSteps,
    Every,
    Geometric,
    Never,
    OnFinal,
    OnImprovement,
    Schedule,
    at_steps,
    every,
    geometric,
    never,
    on_final,
    on_improvement,
    schedule,
)

__all__ = ["KEEP", "SAVE", "Param", "Registry", "Spec", "Spelling", "flow"]

#: how the user wrote a policy, so an example in a message is written the same way:
#: ``"file"``, a mapping in a YAML, TOML or JSON file (``every: 1000``); ``"line"``, the
#: one-line form of flags and environment variables (``every(1000)``)
Spelling = Literal["file", "line"]

_PLAIN = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def _same(value: Any) -> Any:
    return value


def flow(value: object) -> str:
    """``value`` (config data) as YAML flow text, which the one-line form reads too:
    ``{n: 2, metric: eval_loss}``, ``[1000, 5000]``, ``30m``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    text = str(value)
    return text if _PLAIN.match(text) else repr(text)


@dataclass(frozen=True)
class Param:
    """One parameter: the factory's keyword and the object's attribute of the same name."""

    name: str
    read: Callable[[object, str], Any]
    #: the attribute's value as config data (JSON, YAML and TOML can all hold it)
    write: Callable[[Any], Any] = _same
    required: bool = False


@dataclass(frozen=True)
class Spec:
    """One built-in policy under one config name.

    ``params`` are in the factory's positional order (the one-line form fills them from
    positional values). ``bare`` is the parameter a bare value fills (``every: 1000``), or
    ``""`` for a flag written ``final: true``. ``variadic``: the one-line form's positional
    values make one list (``at_steps(100, 200)``). ``takes_mapping``: the bare value may itself
    be a mapping (``schedule: {0: 2000}``). ``shorthand`` turns some other bare value into
    parameters (``best: eval_loss``). ``siblings`` may also stand beside the bare value in the
    enclosing mapping (``every: 1000`` and ``start: 200``). The factory's own name (``on_final``,
    ``keep_last``) is always accepted besides ``name`` and ``aliases``. ``example`` is a value
    that :meth:`build` accepts, shown in error messages (see :meth:`example_in`).
    """

    name: str
    cls: type
    factory: Callable[..., Any]
    params: tuple[Param, ...] = ()
    bare: str | None = None
    aliases: tuple[str, ...] = ()
    variadic: bool = False
    takes_mapping: bool = False
    shorthand: Callable[[object], dict[str, object] | None] | None = None
    siblings: tuple[str, ...] = ()
    example: object = True

    def build(self, value: object, where: str, spelling: Spelling = "file") -> Any:
        """The policy that the config ``value`` found at ``where`` describes; a bad value's
        error ends with :meth:`example_in` ``spelling``."""
        known = {p.name: p for p in self.params}
        params = self._params(value, where, known)
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: unknown parameter; {closest(unknown[0], known)}"
                f"{self.name} takes {', '.join(known) or 'no parameters'}"
            )
        kwargs = {}
        try:
            for param in self.params:
                if param.name in params:
                    kwargs[param.name] = param.read(params[param.name], f"{where}.{param.name}")
                elif param.required:
                    raise ConfigError(f"{where}: {self.name} needs {param.name!r}")
            try:
                return self.factory(**kwargs)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        except ConfigError as exc:
            if "e.g." in str(exc):  # the message has its own example
                raise
            raise ConfigError(f"{exc}; e.g. {self.example_in(spelling)}") from exc

    def example_in(self, spelling: Spelling) -> str:
        """:attr:`example` as the user would write it: ``every: 1000`` in a file,
        ``every(1000)`` on a command line."""
        if spelling == "file":
            return f"{self.name}: {flow(self.example)}"
        if self.bare == "":
            return self.name
        if self.variadic and isinstance(self.example, (list, tuple)):
            return f"{self.name}({', '.join(flow(v) for v in self.example)})"
        if not isinstance(self.example, Mapping) or self.takes_mapping:
            return f"{self.name}({flow(self.example)})"
        required = [p.name for p in self.params if p.required]
        items = list(self.example.items())
        lead = 0
        while lead < len(items) and lead < len(required) and items[lead][0] == required[lead]:
            lead += 1
        args = [flow(v) for _, v in items[:lead]]
        args += [f"{k}={flow(v)}" for k, v in items[lead:]]
        return f"{self.name}({', '.join(args)})"

    def _params(self, value: object, where: str, known: Mapping[str, Param]) -> dict[str, object]:
        if self.shorthand is not None:
            expanded = self.shorthand(value)
            if expanded is not None:
                return expanded
        if isinstance(value, Mapping) and not (
            self.takes_mapping and not any(str(k) in known for k in value)
        ):
            return {str(k): v for k, v in value.items()}
        if self.bare == "":
            if value is not True:
                raise ConfigError(f"{where}: write `{self.name}: true` (got {value!r})")
            return {}
        if self.bare is not None:
            return {self.bare: value}
        raise ConfigError(f"{where}: {value!r} is not a mapping; give {{{', '.join(known)}}}")

    def dump(self, policy: object) -> object:
        """``policy`` (of :attr:`cls`) as config data, in the shortest form :meth:`build`
        reads back equal."""
        if not self.params:
            return True
        values = {p.name: p.write(getattr(policy, p.name)) for p in self.params}
        if len(self.params) == 1 and self.bare == self.params[0].name:
            return values[self.bare]
        return values


class Registry:
    """The specs of one kind of policy (triggers or retention), by name and by class."""

    def __init__(self, kind: str, specs: Iterable[Spec]) -> None:
        self.kind = kind
        self.specs: dict[str, Spec] = {}
        self._names: dict[str, Spec] = {}
        self._classes: dict[type, Spec] = {}
        for spec in specs:
            self.specs[spec.name] = spec
            for name in dict.fromkeys((spec.name, spec.factory.__name__, *spec.aliases)):
                if name in self._names:
                    raise ValueError(f"two {kind} specs are both called {name!r}")
                self._names[name] = spec
            if spec.cls in self._classes:
                raise ValueError(f"two {kind} specs are both for {spec.cls.__name__}")
            self._classes[spec.cls] = spec

    @property
    def names(self) -> list[str]:
        """The config names, in table order (as error messages list them)."""
        return list(self.specs)

    @property
    def aliases(self) -> dict[str, str]:
        """Every other accepted name, mapped to the config name it stands for."""
        return {alias: spec.name for alias, spec in self._names.items() if alias != spec.name}

    def get(self, name: str) -> Spec | None:
        """The spec called ``name`` (or one of its aliases)."""
        return self._names.get(name)

    def of(self, policy: object) -> Spec | None:
        """The spec whose class ``policy`` is an instance of."""
        for cls in type(policy).__mro__:
            if cls in self._classes:
                return self._classes[cls]
        return None


def _best_metric(value: object) -> dict[str, object] | None:
    return {"n": 1, "metric": value} if isinstance(value, str) else None


SAVE = Registry(
    "trigger",
    [
        Spec(
            "every",
            Every,
            every,
            (Param("interval", read_positive_int, required=True), Param("start", read_int)),
            bare="interval",
            aliases=("every_steps",),
            siblings=("start",),
            example=1000,
        ),
        Spec(
            "at_steps",
            AtSteps,
            at_steps,
            (Param("steps", read_int_list, sorted, required=True),),
            bare="steps",
            variadic=True,
            example=[1000, 5000],
        ),
        Spec(
            "schedule",
            Schedule,
            schedule,
            (Param("intervals", read_schedule, dict, required=True),),
            bare="intervals",
            takes_mapping=True,
            example={0: 2000, 10000: 500},
        ),
        Spec(
            "geometric",
            Geometric,
            geometric,
            (
                Param("first", read_positive_int),
                Param("factor", read_float),
                Param("max_interval", read_positive_int),
            ),
            example={"first": 100, "factor": 2.0, "max_interval": 5000},
        ),
        Spec(
            "every_duration",
            EveryDuration,
            every_duration,
            (Param("interval", read_positive_duration, format_duration, required=True),),
            bare="interval",
            example="30m",
        ),
        Spec(
            "overhead_budget",
            OverheadBudget,
            overhead_budget,
            (
                Param("fraction", read_float, required=True),
                Param("first_after", read_duration, format_duration),
            ),
            bare="fraction",
            example=0.02,
        ),
        Spec(
            "optimal_interval",
            OptimalInterval,
            optimal_interval,
            (
                Param("mtbf", read_positive_duration, format_duration, required=True),
                Param("first_after", read_duration, format_duration),
            ),
            bare="mtbf",
            example="4h",
        ),
        Spec(
            "on_improvement",
            OnImprovement,
            on_improvement,
            (
                Param("metric", read_str, required=True),
                Param("mode", read_mode),
                Param("min_delta", read_float),
                Param("patience", read_int),
            ),
            bare="metric",
            example={"metric": "eval_loss", "mode": "min"},
        ),
        Spec(
            "on_signal",
            OnSignal,
            on_signal,
            (Param("signals", read_signals, list), Param("then", read_str)),
            bare="signals",
            variadic=True,
            example=["SIGTERM", "SIGUSR1"],
        ),
        Spec(
            "on_file", OnFile, on_file, (Param("name", read_str),), bare="name", example="SAVE_NOW"
        ),
        Spec("final", OnFinal, on_final, bare=""),
        Spec("never", Never, never, bare=""),
    ],
)

KEEP = Registry(
    "retention policy",
    [
        Spec(
            "last",
            KeepLast,
            keep_last,
            (Param("n", read_positive_int, required=True),),
            bare="n",
            example=3,
        ),
        Spec(
            "best",
            KeepBest,
            keep_best,
            (
                Param("n", read_positive_int, required=True),
                Param("metric", read_str, required=True),
                Param("mode", read_mode),
            ),
            shorthand=_best_metric,
            example={"n": 2, "metric": "eval_loss", "mode": "min"},
        ),
        Spec(
            "every",
            KeepEvery,
            keep_every,
            (Param("interval", read_positive_int, required=True),),
            bare="interval",
            example=10000,
        ),
        Spec(
            "within",
            KeepWithin,
            keep_within,
            (Param("age", read_positive_duration, format_duration, required=True),),
            bare="age",
            example="7d",
        ),
        Spec(
            "budget",
            KeepBudget,
            keep_budget,
            (Param("max_bytes", read_positive_size, required=True),),
            bare="max_bytes",
            example="200GB",
        ),
        Spec("all", KeepAll, keep_all, bare=""),
    ],
)
