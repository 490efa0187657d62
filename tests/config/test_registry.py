"""Tests for :mod:`ckptwise.config.registry`, the one table of built-in policies.

The central property: :func:`to_config` of any built-in policy, fed back to
:func:`policy_from_config` (directly, or through JSON, YAML or TOML text), rebuilds policy
objects equal to the originals. ``TRIGGERS``, ``SCHEDULES`` and ``RETENTION`` hold a row for
every registry entry (a test checks that), so a new policy is one class, one registry entry
and one row here.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptwise as cw
import ckptwise.policy
from ckptwise.config import Policy, policy_from_config, to_config
from ckptwise.config.registry import KEEP, SAVE, Param, Registry, Spec
from ckptwise.config.values import read_int
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy import (
    Decision,
    RetentionContext,
    RetentionPolicy,
    TrainingState,
    Trigger,
    after,
)
from ckptwise.policy.triggers import Every, Never, OnFinal
from policy_support import all_of, any_of, keep_any

# -- helpers ---------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: object) -> str:
    text = str(key)  # TOML keys are strings: schedule thresholds become "0", "10000"
    return text if _BARE_KEY.match(text) else json.dumps(text)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """A minimal TOML writer: one table per section, inline values below it."""
    lines: list[str] = []
    for section, body in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


def assert_round_trips(save: Trigger | None = None, keep: RetentionPolicy | None = None) -> None:
    """``to_config`` then ``policy_from_config`` is the identity, also through JSON, YAML and
    TOML text."""
    expected = Policy(save, keep)
    config = to_config(save, keep)
    assert policy_from_config(config) == expected
    text = json.dumps(config)  # JSON-serialisable as it stands
    assert policy_from_config(json.loads(text)) == expected
    # sort_keys=False: the order of `|` operands is part of the objects' equality
    dumped = yaml.safe_dump(config, sort_keys=False)
    assert policy_from_config(yaml.safe_load(dumped)) == expected
    assert policy_from_config(tomllib.loads(to_toml(config))) == expected


# -- the built-in policies -------------------------------------------------------------------

TRIGGERS: list[tuple[str, Trigger]] = [
    ("every", cw.every(1000)),
    ("every-start", cw.every(1000, start=200)),
    ("at_steps", cw.at_steps([1500, 0, 500])),
    ("at_steps-one", cw.at_steps([7])),
    ("geometric-default", cw.geometric()),
    ("geometric", cw.geometric(50, 1.5, 3000)),
    ("geometric-int-factor", cw.geometric(10, 3, 800)),
    ("every_duration", cw.every_duration(timedelta(minutes=30))),
    ("every_duration-mixed", cw.every_duration(timedelta(days=1, hours=2, minutes=3, seconds=4))),
    ("every_duration-fraction", cw.every_duration(timedelta(seconds=1.5))),
    ("every_duration-ms", cw.every_duration(timedelta(milliseconds=250))),
    ("overhead_budget", cw.overhead_budget(0.02)),
    ("overhead_budget-first", cw.overhead_budget(0.1, first_after=timedelta(minutes=2))),
    ("overhead_budget-zero", cw.overhead_budget(0.05, first_after=timedelta(0))),
    ("optimal_interval", cw.optimal_interval(timedelta(hours=24))),
    (
        "optimal_interval-first",
        cw.optimal_interval(timedelta(days=2, hours=3), first_after=timedelta(seconds=90)),
    ),
    ("on_improvement", cw.on_improvement("eval_loss")),
    ("on_improvement-mode", cw.on_improvement("accuracy", "max")),
    (
        "on_improvement-all",
        cw.on_improvement("eval/acc", "max", min_delta=0.01, patience=3),
    ),
    ("on_signal", cw.on_signal()),
    ("on_signal-one", cw.on_signal("SIGUSR2")),
    ("on_signal-names-then", cw.on_signal(["SIGTERM", "SIGINT"], then="continue")),
    ("on_file", cw.on_file()),
    ("on_file-name", cw.on_file("STOP_AND_SAVE")),
    ("on_final", cw.on_final()),
    ("never", cw.never()),
]

SCHEDULES: list[tuple[str, Trigger]] = [
    ("schedule", cw.schedule({0: 2000, 10_000: 1000, 50_000: 500})),
    ("schedule-one", cw.schedule({100: 10})),
]

RETENTION: list[tuple[str, RetentionPolicy]] = [
    ("keep_last", cw.keep_last(3)),
    ("keep_best", cw.keep_best(1, "eval_loss")),
    ("keep_best-max", cw.keep_best(5, "accuracy", "max")),
    ("keep_every", cw.keep_every(10_000)),
    ("keep_within", cw.keep_within(timedelta(hours=6))),
    ("keep_within-mixed", cw.keep_within(timedelta(days=1, minutes=1, seconds=0.5))),
    ("keep_budget", cw.keep_budget(200 * 2**30)),
    ("keep_all", cw.keep_all()),
]

COMBINATIONS: list[tuple[str, Callable[[Trigger], Trigger]]] = [
    ("t|every", lambda t: any_of(t, cw.every(7))),
    ("final|t", lambda t: any_of(cw.on_final(), t)),
    ("t|same", lambda t: any_of(t, t)),
    ("t&every", lambda t: all_of(t, cw.every(7))),
    ("signal&t", lambda t: all_of(cw.on_signal(), t)),
    ("(t&every)|file", lambda t: any_of(all_of(t, cw.every(3)), cw.on_file())),
    ("every&(t|never)", lambda t: all_of(cw.every(3), any_of(t, cw.never()))),
    ("(t&final)|(t&every)", lambda t: any_of(all_of(t, cw.on_final()), all_of(t, cw.every(9)))),
    ("after(t)", lambda t: after(100, t)),
    ("after(t|every)", lambda t: after(100, any_of(t, cw.every(7)))),
    ("after(t)|final", lambda t: any_of(after(100, t), cw.on_final())),
    ("after(after(t)|every)", lambda t: after(5, any_of(after(100, t), cw.every(7)))),
    ("after(after(t))", lambda t: after(5, after(100, t))),
]
# -- 1. round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "trigger"), TRIGGERS, ids=[n for n, _ in TRIGGERS])
def test_every_trigger_round_trips_alone(name: str, trigger: Trigger) -> None:
    assert_round_trips(save=trigger)


@pytest.mark.parametrize(("name", "trigger"), TRIGGERS, ids=[n for n, _ in TRIGGERS])
@pytest.mark.parametrize(("how", "combine"), COMBINATIONS, ids=[n for n, _ in COMBINATIONS])
def test_every_trigger_round_trips_combined(
    name: str, trigger: Trigger, how: str, combine: Callable[[Trigger], Trigger]
) -> None:
    assert_round_trips(save=combine(trigger))


@pytest.mark.parametrize(("name", "trigger"), SCHEDULES, ids=[n for n, _ in SCHEDULES])
def test_schedule_round_trips_alone(name: str, trigger: Trigger) -> None:
    assert_round_trips(save=trigger)


@pytest.mark.parametrize(("how", "combine"), COMBINATIONS, ids=[n for n, _ in COMBINATIONS])
def test_schedule_round_trips_combined(how: str, combine: Callable[[Trigger], Trigger]) -> None:
    assert_round_trips(save=combine(cw.schedule({0: 2000, 10_000: 500})))


def test_all_triggers_together_round_trip() -> None:
    triggers = [t for _, t in TRIGGERS]
    assert_round_trips(save=any_of(*triggers))
    assert_round_trips(save=all_of(*triggers))


def test_nested_and_inside_or_round_trips() -> None:
    a, b, c = cw.every(1000), cw.on_improvement("eval_loss"), cw.on_signal()
    nested = any_of(all_of(a, b), c)
    assert_round_trips(save=nested)
    assert_round_trips(save=any_of(c, all_of(a, b)))
    assert_round_trips(save=all_of(any_of(a, b), c))
    assert_round_trips(save=any_of(all_of(a, b), all_of(b, c)))
    assert_round_trips(save=all_of(a, any_of(b, all_of(c, cw.on_final()))))
    assert policy_from_config(to_config(nested)).save == nested


def test_same_kind_twice_round_trips_through_any() -> None:
    save = any_of(cw.every(100), cw.every(7, start=50), cw.on_file("A"), cw.on_file("B"))
    config = to_config(save)
    assert list(config["save"]) == ["any"]
    assert_round_trips(save=save)


@pytest.mark.parametrize(("name", "policy"), RETENTION, ids=[n for n, _ in RETENTION])
def test_every_retention_policy_round_trips_alone(name: str, policy: RetentionPolicy) -> None:
    assert_round_trips(keep=policy)


@pytest.mark.parametrize(("name", "policy"), RETENTION, ids=[n for n, _ in RETENTION])
def test_every_retention_policy_round_trips_in_unions(name: str, policy: RetentionPolicy) -> None:
    assert_round_trips(keep=keep_any(policy, cw.keep_last(2)))
    assert_round_trips(keep=keep_any(cw.keep_best(1, "loss"), policy))
    assert_round_trips(keep=keep_any(policy, policy))
    assert_round_trips(save=cw.every(10), keep=keep_any(policy, cw.keep_every(500)))


def test_all_retention_policies_together_round_trip() -> None:
    assert_round_trips(keep=keep_any(*(p for _, p in RETENTION)))
    assert_round_trips(
        save=any_of(cw.every(1000, start=200), cw.on_final()),
        keep=keep_any(cw.keep_last(3), cw.keep_last(10), cw.keep_best(1, "eval_loss")),
    )


def test_to_config_of_the_example_is_the_short_mapping() -> None:
    config = to_config(
        any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss")),
        keep_any(cw.keep_last(3), cw.keep_best(1, "eval_loss")),
    )
    assert config == {
        "save": {
            "every": {"interval": 1000, "start": 200},
            "on_improvement": {
                "metric": "eval_loss",
                "mode": "min",
                "min_delta": 0.0,
                "patience": 0,
            },
        },
        "keep": {"last": 3, "best": {"n": 1, "metric": "eval_loss", "mode": "min"}},
    }


def test_empty_config_is_an_empty_policy() -> None:
    assert to_config() == {}
    assert policy_from_config({}) == Policy()
    assert policy_from_config({"save": None, "keep": None}) == Policy()
    assert_round_trips(save=cw.every(5))  # keep absent
    assert to_config(keep=cw.keep_all()) == {"keep": {"all": True}}


@dataclass(frozen=True)
class CustomTrigger:
    def decide(self, state: TrainingState) -> Decision:
        return Decision.no()


@dataclass(frozen=True)
class CustomRetention:
    def select(self, context: RetentionContext) -> Mapping[int, tuple[str, ...]]:
        return {}


def test_to_config_refuses_policies_that_are_not_built_in() -> None:
    with pytest.raises(CheckpointError, match="has no config form"):
        to_config(save=CustomTrigger())
    with pytest.raises(CheckpointError, match="has no config form"):
        to_config(save=any_of(cw.every(5), CustomTrigger()))
    with pytest.raises(CheckpointError, match="has no config form"):
        to_config(keep=CustomRetention())


LEAF_TRIGGERS = st.sampled_from([t for _, t in TRIGGERS])
TRIGGER_TREES = st.recursive(
    LEAF_TRIGGERS,
    lambda children: st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda ts: any_of(*ts)),
        st.lists(children, min_size=2, max_size=3).map(lambda ts: all_of(*ts)),
        st.tuples(st.integers(0, 5000), children).map(lambda p: after(*p)),
    ),
    max_leaves=8,
)
RETENTION_UNIONS = st.lists(st.sampled_from([p for _, p in RETENTION]), min_size=1, max_size=5).map(
    lambda ps: keep_any(*ps)
)


@settings(max_examples=60, deadline=None)
@given(save=st.none() | TRIGGER_TREES, keep=st.none() | RETENTION_UNIONS)
def test_random_policy_trees_round_trip(save: Trigger | None, keep: RetentionPolicy | None) -> None:
    assert_round_trips(save=save, keep=keep)


@pytest.mark.parametrize(
    ("name", "save", "keep"),
    [
        (
            "example",
            any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss")),
            keep_any(cw.keep_last(3), cw.keep_best(1, "eval_loss")),
        ),
        ("signals", any_of(cw.on_signal(), cw.on_file()), cw.keep_all()),
        (
            "nested",
            any_of(all_of(cw.every(10), cw.on_improvement("loss")), cw.on_final()),
            keep_any(cw.keep_within(timedelta(hours=2)), cw.keep_budget(10**9)),
        ),
    ],
)
@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json"])
def test_to_config_written_to_a_file_reads_back(
    tmp_path: Path, name: str, save: Trigger, keep: RetentionPolicy, suffix: str
) -> None:
    config = to_config(save, keep)
    path = tmp_path / f"policy{suffix}"
    if suffix == ".toml":
        path.write_text(to_toml(config))
    elif suffix == ".json":
        path.write_text(json.dumps(config, indent=2))
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert policy_from_config(path) == Policy(save, keep)


# -- the registry is the one table -------------------------------------------------------------


def _spec_name(registry: Registry, policy: object) -> str:
    spec = registry.of(policy)
    assert spec is not None, f"{policy!r} has no registry entry"
    return spec.name


def test_every_trigger_in_the_registry_has_a_row() -> None:
    covered = {_spec_name(SAVE, t) for _, t in TRIGGERS + SCHEDULES}
    assert covered == set(SAVE.names)


def test_every_retention_policy_in_the_registry_has_a_row() -> None:
    assert {_spec_name(KEEP, p) for _, p in RETENTION} == set(KEEP.names)


@pytest.mark.parametrize(
    "spec", [*SAVE.specs.values(), *KEEP.specs.values()], ids=lambda s: s.factory.__name__
)
def test_every_registry_factory_is_exported(spec: Spec) -> None:
    name = spec.factory.__name__
    assert name in cw.__all__
    assert getattr(cw, name) is spec.factory
    assert name in ckptwise.policy.__all__
    assert getattr(ckptwise.policy, name) is spec.factory


def test_names_and_aliases_resolve_to_the_same_spec() -> None:
    assert SAVE.get("final") is SAVE.get("on_final")
    assert SAVE.get("every") is SAVE.get("every_steps")
    assert KEEP.get("last") is KEEP.get("keep_last")
    assert SAVE.get("keep_last") is None
    assert KEEP.get("on_final") is None


def test_a_registry_refuses_two_entries_with_one_name_or_class() -> None:
    every = Spec("every", Every, cw.every, (Param("interval", read_int),))
    with pytest.raises(ValueError, match="both called 'every'"):
        Registry("trigger", [every, Spec("every", Never, cw.never)])
    with pytest.raises(ValueError, match="both called 'on_final'"):
        Registry(
            "trigger",
            [Spec("final", OnFinal, cw.on_final), Spec("on_final", int, int)],
        )
    with pytest.raises(ValueError, match="both for Every"):
        Registry("trigger", [every, Spec("often", Every, int)])


def test_a_subclass_of_a_built_in_uses_its_entry() -> None:
    @dataclass(frozen=True)
    class Often(Every):
        pass

    assert to_config(save=Often(5)) == {"save": {"every": {"interval": 5, "start": 0}}}


# -- to_config takes what policy_from_config returns --------------------------------------------


def test_to_config_takes_a_policy() -> None:
    policy = policy_from_config({"save": {"every": 1000, "on_signal": True}, "keep": {"last": 3}})
    assert to_config(policy) == to_config(policy.save, policy.keep)
    assert policy_from_config(to_config(policy)) == policy
    assert to_config(Policy()) == {}
    assert to_config(Policy(keep=cw.keep_all())) == {"keep": {"all": True}}


def test_to_config_takes_a_policy_or_its_parts_not_both() -> None:
    with pytest.raises(ConfigError, match="a Policy or a trigger and a retention policy"):
        to_config(Policy(cw.every(5)), cw.keep_last(2))  # type: ignore[call-overload]


def test_the_old_module_s_tables_are_gone() -> None:
    import ckptwise.config

    for gone in ("SAVE_SPECS", "KEEP_SPECS", "SAVE_ALIASES", "KEEP_ALIASES"):
        assert not hasattr(ckptwise.config, gone), gone
    assert list(SAVE.names)  # the registry holds them
    assert KEEP.aliases["keep_last"] == "last"


def test_after_is_written_beside_the_triggers_it_holds_back() -> None:
    save = after(2000, any_of(cw.every(1000), cw.on_improvement("eval_loss")))
    assert to_config(save)["save"] == {
        "after": 2000,
        "every": {"interval": 1000, "start": 0},
        "on_improvement": {"metric": "eval_loss", "mode": "min", "min_delta": 0.0, "patience": 0},
    }
    # an `after` item beside other triggers is never merged into their mapping
    mixed = any_of(after(10, cw.every(5)), cw.on_final())
    assert to_config(mixed)["save"] == {
        "any": [{"after": 10, "every": {"interval": 5, "start": 0}}, {"final": True}]
    }
    assert_round_trips(save=mixed)


# -- the examples errors show ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "spec"),
    [("save", s) for s in SAVE.specs.values()] + [("keep", s) for s in KEEP.specs.values()],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_every_example_builds_the_same_policy_in_both_spellings(kind: str, spec: Spec) -> None:
    in_file = yaml.safe_load(f"{kind}:\n  {spec.example_in('file')}\n")
    built = getattr(policy_from_config(in_file), kind)
    parse = cw.parse_save if kind == "save" else cw.parse_keep
    assert parse(spec.example_in("line")) == built
    assert isinstance(built, spec.cls)


def test_every_policy_s_record_is_a_manifest_s_json() -> None:
    """Each checkpoint records its policies (``extra["policy"]``): for every built-in
    one the record passes the manifest's own checks, as written and read back."""
    from ckptwise.config import policy_record
    from ckptwise.store.manifest import Manifest, decode_manifest, encode_manifest

    triggers = [t for _, t in TRIGGERS + SCHEDULES]
    keep = keep_any(*(p for _, p in RETENTION))
    for save in (*triggers, any_of(*triggers)):
        record = policy_record(save, keep)
        data = encode_manifest(Manifest(step=1, time=1.0, tensors={}, extra={"policy": record}))
        read = decode_manifest(data, where="test", codecs=frozenset())
        assert read.extra["policy"] == record
        assert policy_from_config(record["config"]).save == save
