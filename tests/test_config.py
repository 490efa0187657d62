"""Tests for :mod:`ckptwise.config`: policies as dicts, YAML/TOML/JSON files and one-liners.

The central property: :func:`to_config` of any built-in policy, fed back to
:func:`policy_from_config` (directly, or through JSON, YAML or TOML text), rebuilds policy
objects equal to the originals.
"""

from __future__ import annotations

import functools
import json
import operator
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
from ckptwise.config import (
    Policy,
    format_duration,
    parse_bytes,
    parse_duration,
    parse_keep,
    parse_save,
    policy_from_config,
    to_config,
)
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.policy import Decision, RetentionContext, RetentionPolicy, TrainingState, Trigger

# -- helpers ---------------------------------------------------------------------------------


def any_of(*triggers: Trigger) -> Trigger:
    """``a | b | ...`` (the Protocol ``Trigger`` does not declare the operators)."""
    result: Trigger = functools.reduce(operator.or_, triggers)
    return result


def all_of(*triggers: Trigger) -> Trigger:
    """``a & b & ...``."""
    result: Trigger = functools.reduce(operator.and_, triggers)
    return result


def keep_any(*policies: RetentionPolicy) -> RetentionPolicy:
    """``a | b | ...`` for retention policies."""
    result: RetentionPolicy = functools.reduce(operator.or_, policies)
    return result


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


# -- 2. the issue's example and the short forms ----------------------------------------------

EXAMPLE: dict[str, Any] = {
    "save": {
        "every": 1000,
        "start": 200,
        "on_improvement": {"metric": "eval_loss", "mode": "min"},
    },
    "keep": {"last": 3, "best": {"n": 1, "metric": "eval_loss"}},
}
EXAMPLE_POLICY = Policy(
    any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss", "min")),
    keep_any(cw.keep_last(3), cw.keep_best(1, "eval_loss")),
)


def test_the_issue_example_parses_to_the_python_objects() -> None:
    assert policy_from_config(EXAMPLE) == EXAMPLE_POLICY


def test_start_may_come_before_every() -> None:
    config = {"save": {"start": 200, "every": 1000}}
    assert policy_from_config(config) == Policy(cw.every(1000, start=200))


SHORT_FORMS: list[tuple[str, dict[str, Any], Policy]] = [
    ("best-metric", {"keep": {"best": "eval_loss"}}, Policy(keep=cw.keep_best(1, "eval_loss"))),
    ("on_signal-true", {"save": {"on_signal": True}}, Policy(cw.on_signal())),
    ("on_signal-name", {"save": {"on_signal": "SIGUSR1"}}, Policy(cw.on_signal("SIGUSR1"))),
    (
        "on_signal-list",
        {"save": {"on_signal": ["SIGTERM", "SIGINT"]}},
        Policy(cw.on_signal(["SIGTERM", "SIGINT"])),
    ),
    (
        "on_signal-then",
        {"save": {"on_signal": {"then": "continue"}}},
        Policy(cw.on_signal(then="continue")),
    ),
    ("final-true", {"save": {"final": True}}, Policy(cw.on_final())),
    ("on_final-alias", {"save": {"on_final": True}}, Policy(cw.on_final())),
    ("never-true", {"save": {"never": True}}, Policy(cw.never())),
    ("on_file-name", {"save": {"on_file": "SAVE_NOW"}}, Policy(cw.on_file("SAVE_NOW"))),
    (
        "every_duration-30m",
        {"save": {"every_duration": "30m"}},
        Policy(cw.every_duration(timedelta(minutes=30))),
    ),
    (
        "every_duration-seconds",
        {"save": {"every_duration": 90}},
        Policy(cw.every_duration(timedelta(seconds=90))),
    ),
    ("budget-22GB", {"keep": {"budget": "22GB"}}, Policy(keep=cw.keep_budget(22_000_000_000))),
    ("within-2h", {"keep": {"within": "2h"}}, Policy(keep=cw.keep_within(timedelta(hours=2)))),
    ("keep-alias", {"keep": {"keep_last": 4}}, Policy(keep=cw.keep_last(4))),
    ("every_steps-alias", {"save": {"every_steps": 250}}, Policy(cw.every(250))),
    ("every-string-int", {"save": {"every": "250"}}, Policy(cw.every(250))),
    ("at_steps-list", {"save": {"at_steps": [100, 200]}}, Policy(cw.at_steps([100, 200]))),
    (
        "schedule-intervals",
        {"save": {"schedule": {"intervals": {0: 2000, 10_000: 500}}}},
        Policy(cw.schedule({0: 2000, 10_000: 500})),
    ),
    (
        "schedule-string-keys",
        {"save": {"schedule": {"intervals": {"0": 2000, "10000": 500}}}},
        Policy(cw.schedule({0: 2000, 10_000: 500})),
    ),
    (
        "overhead_budget-fraction",
        {"save": {"overhead_budget": 0.02}},
        Policy(cw.overhead_budget(0.02)),
    ),
    (
        "optimal_interval-mtbf",
        {"save": {"optimal_interval": "24h"}},
        Policy(cw.optimal_interval(timedelta(hours=24))),
    ),
    (
        "geometric-params",
        {"save": {"geometric": {"first": 50}}},
        Policy(cw.geometric(first=50)),
    ),
    (
        "any-list",
        {"save": {"any": [{"every": 10}, {"every": 20, "start": 40}]}},
        Policy(any_of(cw.every(10), cw.every(20, start=40))),
    ),
    (
        "all-list",
        {"save": {"all": [{"every": 10}, {"on_improvement": "eval_loss"}]}},
        Policy(all_of(cw.every(10), cw.on_improvement("eval_loss"))),
    ),
    (
        "keep-any-list",
        {"keep": {"any": [{"last": 3}, {"last": 10}]}},
        Policy(keep=keep_any(cw.keep_last(3), cw.keep_last(10))),
    ),
]


@pytest.mark.parametrize(
    ("name", "config", "expected"), SHORT_FORMS, ids=[n for n, _, _ in SHORT_FORMS]
)
def test_short_forms(name: str, config: dict[str, Any], expected: Policy) -> None:
    assert policy_from_config(config) == expected


def test_schedule_as_a_plain_mapping_of_thresholds() -> None:
    config = {"save": {"schedule": {0: 2000, 10_000: 500}}}
    assert policy_from_config(config) == Policy(cw.schedule({0: 2000, 10_000: 500}))


def test_schedule_thresholds_as_toml_keys() -> None:
    doc = tomllib.loads("[save.schedule]\n0 = 2000\n10000 = 500\n")
    assert policy_from_config(doc) == Policy(cw.schedule({0: 2000, 10_000: 500}))


def test_schedule_intervals_as_toml_keys() -> None:
    doc = tomllib.loads("[save.schedule.intervals]\n0 = 2000\n10000 = 500\n")
    assert doc == {"save": {"schedule": {"intervals": {"0": 2000, "10000": 500}}}}
    assert policy_from_config(doc) == Policy(cw.schedule({0: 2000, 10_000: 500}))


MODULE_DOC_YAML = """\
save:
  every: 1000
  start: 200                       # belongs to `every`
  on_improvement: {metric: eval_loss, mode: min}
  on_signal: true
keep:
  last: 3
  best: {n: 1, metric: eval_loss}
"""


def test_the_module_docstring_yaml_parses() -> None:
    expected = Policy(
        any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss"), cw.on_signal()),
        keep_any(cw.keep_last(3), cw.keep_best(1, "eval_loss")),
    )
    assert policy_from_config(yaml.safe_load(MODULE_DOC_YAML)) == expected


# -- 3. files ----------------------------------------------------------------------------------

EXAMPLE_YAML = """\
save:
  every: 1000
  start: 200
  on_improvement: {metric: eval_loss, mode: min}
keep:
  last: 3
  best: {n: 1, metric: eval_loss}
"""

EXAMPLE_TOML = """\
[save]
every = 1000
start = 200
on_improvement = { metric = "eval_loss", mode = "min" }

[keep]
last = 3
best = { n = 1, metric = "eval_loss" }
"""


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("policy.yaml", EXAMPLE_YAML),
        ("policy.yml", EXAMPLE_YAML),
        ("policy.YAML", EXAMPLE_YAML),
        ("policy.toml", EXAMPLE_TOML),
        ("policy.json", json.dumps(EXAMPLE)),
    ],
)
def test_policy_files(tmp_path: Path, filename: str, text: str) -> None:
    path = tmp_path / filename
    path.write_text(text)
    assert policy_from_config(path) == EXAMPLE_POLICY
    assert policy_from_config(str(path)) == EXAMPLE_POLICY


def test_hand_written_toml_with_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        """\
[ckptwise.save]
every_duration = "30m"
final = true

[ckptwise.save.on_signal]
signals = ["SIGUSR1"]
then = "continue"

[ckptwise.save.schedule.intervals]
0 = 2000
"10000" = 500

[ckptwise.keep]
last = 2
within = "1h30m"
budget = "1.5GiB"

[ckptwise.keep.best]
n = 2
metric = "accuracy"
mode = "max"

[trainer]
lr = 0.001
"""
    )
    expected = Policy(
        any_of(
            cw.every_duration(timedelta(minutes=30)),
            cw.on_final(),
            cw.on_signal(["SIGUSR1"], then="continue"),
            cw.schedule({0: 2000, 10_000: 500}),
        ),
        keep_any(
            cw.keep_last(2),
            cw.keep_within(timedelta(hours=1, minutes=30)),
            cw.keep_budget(1_610_612_736),
            cw.keep_best(2, "accuracy", "max"),
        ),
    )
    assert policy_from_config(path) == expected


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_config_nested_under_a_ckptwise_key(tmp_path: Path, suffix: str) -> None:
    doc = {"ckptwise": EXAMPLE, "optimizer": {"lr": 0.001}}
    path = tmp_path / f"train{suffix}"
    if suffix == ".yaml":
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    elif suffix == ".toml":
        path.write_text(
            EXAMPLE_TOML.replace("[save]", "[ckptwise.save]").replace("[keep]", "[ckptwise.keep]")
        )
    else:
        path.write_text(json.dumps(doc))
    assert policy_from_config(path) == EXAMPLE_POLICY
    assert policy_from_config(doc) == EXAMPLE_POLICY


@pytest.mark.parametrize(
    ("name", "save", "keep"),
    [
        ("example", EXAMPLE_POLICY.save, EXAMPLE_POLICY.keep),
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


def test_unsupported_suffix_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.ini"
    path.write_text("[save]\nevery = 1000\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        policy_from_config(path)
    assert ".yaml, .yml, .toml or .json" in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read policy file .*nope\.yaml"):
        policy_from_config(path)


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("bad.yaml", "save:\n  every: [1000\n"),
        ("bad.yml", "save: {every: 1000\nkeep: ]\n"),
        ("bad.toml", "[save]\nevery = \n"),
        ("bad.toml", "[save\nevery = 1000\n"),
        ("bad.json", '{"save": {"every": 1000,}}'),
        ("bad.json", ""),
    ],
)
def test_file_that_does_not_parse_names_the_file(tmp_path: Path, filename: str, text: str) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path} does not parse")):
        policy_from_config(path)


def test_errors_inside_a_file_name_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("save:\n  evry: 1000\n")
    with pytest.raises(ConfigError, match=r"save\.evry: unknown trigger"):
        policy_from_config(path)


# -- 4. error messages -----------------------------------------------------------------------

CONFIG_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-trigger",
        {"save": {"evry": 1000}},
        r"save\.evry: unknown trigger; allowed: every, at_steps, schedule, geometric, "
        r"every_duration, overhead_budget, optimal_interval, on_improvement, on_signal, "
        r"on_file, final, never, any, all",
    ),
    (
        "unknown-parameter",
        {"save": {"on_improvement": {"metrc": "eval_loss"}}},
        r"save\.on_improvement\.metrc: unknown parameter; on_improvement takes metric, mode, "
        r"min_delta, patience",
    ),
    (
        "unknown-parameter-of-flag",
        {"save": {"final": {"when": "now"}}},
        r"save\.final\.when: unknown parameter; final takes no parameters",
    ),
    (
        "bad-mode",
        {"save": {"on_improvement": {"metric": "eval_loss", "mode": "lowest"}}},
        r"save\.on_improvement: mode must be 'min' .* or 'max' .*got 'lowest'",
    ),
    (
        "bad-keep-mode",
        {"keep": {"best": {"n": 1, "metric": "acc", "mode": "up"}}},
        r"keep\.best: mode must be 'min' .* or 'max' .*got 'up'",
    ),
    (
        "bad-then",
        {"save": {"on_signal": {"then": "stop"}}},
        r"save\.on_signal: on_signal\(then=\) must be 'exit' or 'continue', got 'stop'",
    ),
    (
        "start-without-every",
        {"save": {"start": 200, "on_final": True}},
        r"save\.start: 'start' only goes with 'every'",
    ),
    ("start-alone", {"save": {"start": 200}}, r"save\.start: 'start' only goes with 'every'"),
    (
        "unknown-section",
        {"save": {"every": 10}, "kep": {"last": 3}},
        r"kep: unknown section; a policy config has 'save' and 'keep'",
    ),
    ("missing-best-metric", {"keep": {"best": {"n": 2}}}, r"keep\.best: best needs 'metric'"),
    ("missing-best-n", {"keep": {"best": {"metric": "x"}}}, r"keep\.best: best needs 'n'"),
    ("missing-interval", {"save": {"every": {"start": 5}}}, r"save\.every: every needs 'interval'"),
    (
        "best-not-mapping",
        {"keep": {"best": 2}},
        r"keep\.best: 2 is not a mapping; give \{n, metric, mode\}",
    ),
    (
        "bad-duration",
        {"save": {"every_duration": "30 minutes please"}},
        r"save\.every_duration\.interval: '30 minutes please' is not a duration; write e\.g\. "
        r"'90s', '30m', '1h30m', '2d'",
    ),
    (
        "bad-keep-duration",
        {"keep": {"within": "soon"}},
        r"keep\.within\.age: 'soon' is not a duration",
    ),
    (
        "bad-size",
        {"keep": {"budget": "lots"}},
        r"keep\.budget\.max_bytes: 'lots' is not a size; write e\.g\. '22GB', '1\.5GiB'",
    ),
    (
        "save-not-mapping",
        {"save": 1000},
        r"save: expected a mapping of triggers such as \{every: 1000\}, got 1000",
    ),
    ("save-empty", {"save": {}}, r"save: expected a mapping of triggers"),
    ("save-list", {"save": [{"every": 10}]}, r"save: expected a mapping of triggers"),
    ("keep-not-mapping", {"keep": 3}, r"keep: expected a mapping such as \{last: 3\}, got 3"),
    (
        "any-not-list",
        {"save": {"any": {"every": 10}}},
        r"save\.any: expected a non-empty list of trigger mappings",
    ),
    ("any-empty", {"save": {"any": []}}, r"save\.any: expected a non-empty list"),
    (
        "all-not-list",
        {"save": {"all": "every"}},
        r"save\.all: expected a non-empty list of trigger mappings",
    ),
    (
        "keep-any-not-list",
        {"keep": {"any": {"last": 3}}},
        r"keep\.any: expected a non-empty list of retention mappings",
    ),
    (
        "nested-path",
        {"save": {"any": [{"every": 10}, {"evry": 5}]}},
        r"save\.any\[1\]\.evry: unknown trigger",
    ),
    (
        "unknown-retention",
        {"keep": {"newest": 3}},
        r"keep\.newest: unknown retention policy; allowed: last, best, every, within, budget, all",
    ),
    (
        "flag-not-true",
        {"save": {"final": "yes"}},
        r"save\.final: write `final: true` \(got 'yes'\)",
    ),
    (
        "not-an-integer",
        {"save": {"every": "ten"}},
        r"save\.every\.interval: 'ten' is not an integer",
    ),
    ("bool-not-integer", {"keep": {"last": True}}, r"keep\.last\.n: True is not an integer"),
    (
        "bad-step-in-list",
        {"save": {"at_steps": [100, "x"]}},
        r"save\.at_steps\.steps\[1\]: 'x' is not an integer",
    ),
    ("at_steps-not-list", {"save": {"at_steps": 100}}, r"save\.at_steps\.steps: 100 is not a list"),
    (
        "schedule-not-mapping",
        {"save": {"schedule": {"intervals": [1, 2]}}},
        r"save\.schedule\.intervals: \[1, 2\] is not a mapping of step -> interval",
    ),
    (
        "not-a-number",
        {"save": {"overhead_budget": "two percent"}},
        r"save\.overhead_budget\.fraction: 'two percent' is not a number",
    ),
    (
        "not-a-string",
        {"save": {"on_improvement": {"metric": 3}}},
        r"save\.on_improvement\.metric: 3 is not a string",
    ),
    (
        "bad-signal",
        {"save": {"on_signal": 15}},
        r"save\.on_signal\.signals: 15 is not a signal name or a list of them",
    ),
    (
        "factory-rejects",
        {"save": {"every": 0}},
        r"save\.every: every\(interval\) must be a positive integer, got 0",
    ),
    (
        "keep-factory-rejects",
        {"keep": {"last": 0}},
        r"keep\.last: keep_last\(n\) must be a positive integer, got 0",
    ),
]


@pytest.mark.parametrize(
    ("name", "config", "pattern"), CONFIG_ERRORS, ids=[n for n, _, _ in CONFIG_ERRORS]
)
def test_config_errors_name_the_key_and_what_is_allowed(
    name: str, config: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        policy_from_config(config)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown trigger"):
        policy_from_config({"save": {"evry": 1}})


# -- 5. the one-line form --------------------------------------------------------------------

SAVE_LINES: list[tuple[str, Trigger]] = [
    (
        "every(1000, start=200) | on_improvement(eval_loss, mode=min)",
        any_of(cw.every(1000, start=200), cw.on_improvement("eval_loss", "min")),
    ),
    ("every(1000)", cw.every(1000)),
    ("every(1000, 200)", cw.every(1000, start=200)),
    ("every(interval=1000)", cw.every(1000)),
    ("  every( 1000 ,start = 200 )|final  ", any_of(cw.every(1000, start=200), cw.on_final())),
    ("every(10_000)", cw.every(10_000)),
    # & binds tighter than |
    (
        "every(10) | every(20) & final",
        any_of(cw.every(10), all_of(cw.every(20), cw.on_final())),
    ),
    (
        "every(10) & every(20) | final",
        any_of(all_of(cw.every(10), cw.every(20)), cw.on_final()),
    ),
    (
        "every(10) & on_improvement(loss) | on_signal & final | never",
        any_of(
            all_of(cw.every(10), cw.on_improvement("loss")),
            all_of(cw.on_signal(), cw.on_final()),
            cw.never(),
        ),
    ),
    # parentheses
    (
        "(every(10) | every(20)) & final",
        all_of(any_of(cw.every(10), cw.every(20)), cw.on_final()),
    ),
    (
        "every(10) & (every(20) | (final))",
        all_of(cw.every(10), any_of(cw.every(20), cw.on_final())),
    ),
    (
        "((every(1000) & on_improvement(eval_loss)) | on_signal)",
        any_of(all_of(cw.every(1000), cw.on_improvement("eval_loss")), cw.on_signal()),
    ),
    # quoted strings
    ('on_improvement("eval/loss", "max")', cw.on_improvement("eval/loss", "max")),
    ("on_improvement('val acc', mode='max')", cw.on_improvement("val acc", "max")),
    ('on_file("1000")', cw.on_file("1000")),
    ("on_file('STOP NOW')", cw.on_file("STOP NOW")),
    # lists, variadic values and mappings
    ("at_steps(100, 200)", cw.at_steps([100, 200])),
    ("at_steps(100)", cw.at_steps([100])),
    ("at_steps(steps=[100, 200])", cw.at_steps([100, 200])),
    ("schedule({0: 2000, 10000: 500})", cw.schedule({0: 2000, 10_000: 500})),
    ("schedule(intervals={0: 2000})", cw.schedule({0: 2000})),
    ("on_signal(SIGTERM, SIGINT)", cw.on_signal(["SIGTERM", "SIGINT"])),
    ("on_signal(signals=[SIGTERM, SIGINT])", cw.on_signal(["SIGTERM", "SIGINT"])),
    ("on_signal(SIGUSR2, then=continue)", cw.on_signal("SIGUSR2", then="continue")),
    ("on_signal(then=continue)", cw.on_signal(then="continue")),
    # durations and numbers
    ("every_duration(30m)", cw.every_duration(timedelta(minutes=30))),
    ("every_duration(1h30m)", cw.every_duration(timedelta(hours=1, minutes=30))),
    ("every_duration(90)", cw.every_duration(timedelta(seconds=90))),
    ("every_duration('45m')", cw.every_duration(timedelta(minutes=45))),
    (
        "overhead_budget(0.02, first_after=5m)",
        cw.overhead_budget(0.02, first_after=timedelta(minutes=5)),
    ),
    ("optimal_interval(24h)", cw.optimal_interval(timedelta(hours=24))),
    (
        "optimal_interval(mtbf=2d, first_after=90s)",
        cw.optimal_interval(timedelta(days=2), first_after=timedelta(seconds=90)),
    ),
    ("geometric(100, 2.0, 5000)", cw.geometric(100, 2.0, 5000)),
    ("geometric(first=50, factor=1.5)", cw.geometric(50, 1.5)),
    (
        "on_improvement(accuracy, max, min_delta=0.01, patience=3)",
        cw.on_improvement("accuracy", "max", min_delta=0.01, patience=3),
    ),
    # flags without parentheses, and aliases
    ("on_signal", cw.on_signal()),
    ("final", cw.on_final()),
    ("final()", cw.on_final()),
    ("on_final", cw.on_final()),
    ("never", cw.never()),
    ("on_file", cw.on_file()),
    ("on_file(STOP)", cw.on_file("STOP")),
    ("geometric", cw.geometric()),
    ("every_steps(500)", cw.every(500)),
]


@pytest.mark.parametrize(("text", "expected"), SAVE_LINES, ids=[t for t, _ in SAVE_LINES])
def test_parse_save(text: str, expected: Trigger) -> None:
    assert parse_save(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("at_steps([100, 200])", cw.at_steps([100, 200])),
        ("on_signal([SIGTERM, SIGINT])", cw.on_signal(["SIGTERM", "SIGINT"])),
    ],
)
def test_parse_save_with_a_list_argument(text: str, expected: Trigger) -> None:
    assert parse_save(text) == expected


def test_one_line_form_equals_the_config_form() -> None:
    line = "every(1000, start=200) | on_improvement(eval_loss, mode=min)"
    assert Policy(parse_save(line), parse_keep("last(3) | best(1, eval_loss)")) == (
        policy_from_config(EXAMPLE)
    )


KEEP_LINES: list[tuple[str, RetentionPolicy]] = [
    (
        "last(3) | best(1, eval_loss) | within(2h) | budget(1.5GiB)",
        keep_any(
            cw.keep_last(3),
            cw.keep_best(1, "eval_loss"),
            cw.keep_within(timedelta(hours=2)),
            cw.keep_budget(1_610_612_736),
        ),
    ),
    ("last(3)", cw.keep_last(3)),
    ("keep_last(3)", cw.keep_last(3)),
    ("keep_best(2, accuracy, max)", cw.keep_best(2, "accuracy", "max")),
    ("best(n=1, metric='eval/loss')", cw.keep_best(1, "eval/loss")),
    ("every(10000)", cw.keep_every(10_000)),
    ("keep_every(interval=500)", cw.keep_every(500)),
    ("within(1d12h)", cw.keep_within(timedelta(days=1, hours=12))),
    ("budget(22GB)", cw.keep_budget(22_000_000_000)),
    ("budget(1048576)", cw.keep_budget(2**20)),
    ("all", cw.keep_all()),
    ("keep_all", cw.keep_all()),
    ("(last(3) | all)", keep_any(cw.keep_last(3), cw.keep_all())),
    (
        "last(3) | (best(1, loss) | every(100))",
        keep_any(cw.keep_last(3), cw.keep_best(1, "loss"), cw.keep_every(100)),
    ),
]


@pytest.mark.parametrize(("text", "expected"), KEEP_LINES, ids=[t for t, _ in KEEP_LINES])
def test_parse_keep(text: str, expected: RetentionPolicy) -> None:
    assert parse_keep(text) == expected


ONE_LINE_ERRORS: list[tuple[Callable[[str], object], str, str]] = [
    (parse_save, "evry(1000)", r"unknown policy 'evry'; allowed: every, at_steps"),
    (parse_save, "every(10) | keep_last(3)", r"unknown policy 'keep_last'"),
    (parse_keep, "first(3)", r"unknown policy 'first'; allowed: last, best, every"),
    (parse_save, "every(1, 2, 3)", r"every takes at most 2 positional values"),
    (parse_save, "final(1)", r"final takes at most 0 positional values"),
    (parse_keep, "last(3, 4)", r"last takes at most 1 positional values"),
    (parse_save, "every(1000", r"expected ',' or '\)'"),
    (parse_save, "every(1000,", r"expected more, found the end"),
    (parse_save, "(every(10) | final", r"expected \), found the end"),
    (parse_save, "every(10))", r"unexpected '\)'"),
    (parse_save, "every(10) final", r"unexpected 'final'"),
    (parse_save, "at_steps([1, 2)", r"found the end"),
    (parse_save, "schedule({0: 2000)", r"found the end"),
    (parse_keep, "(last(3)", r"expected \), found the end"),
    (parse_save, "", r"expected more, found the end"),
    (parse_save, "every(10) |", r"expected more, found the end"),
    (parse_keep, "last(3) & best(1, eval_loss)", r"retention policies combine with '\|' only"),
    (parse_save, "every(10) ; final", r"cannot read .* at position"),
]


@pytest.mark.parametrize(
    ("parse", "text", "pattern"),
    ONE_LINE_ERRORS,
    ids=[f"{p.__name__}:{t}" for p, t, _ in ONE_LINE_ERRORS],
)
def test_one_line_errors_quote_the_input(
    parse: Callable[[str], object], text: str, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        parse(text)
    assert repr(text.rstrip()) in str(info.value)


def test_nested_and_in_a_keep_expression_quotes_the_input() -> None:
    text = "(last(3) & best(1, eval_loss)) | every(10)"
    with pytest.raises(ConfigError, match=r"retention policies combine with '\|' only") as info:
        parse_keep(text)
    assert repr(text) in str(info.value)


def test_one_line_value_errors_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"save\.every_duration\.interval: '30minutes'"):
        parse_save("every_duration(30minutes)")
    with pytest.raises(ConfigError, match=r"keep\.budget\.max_bytes: 'lots' is not a size"):
        parse_keep("budget(lots)")
    with pytest.raises(ConfigError, match=r"save\.every\.speed: unknown parameter"):
        parse_save("every(10, speed=3)")


# -- 6. durations and sizes ------------------------------------------------------------------

DURATIONS: list[tuple[object, timedelta]] = [
    ("90s", timedelta(seconds=90)),
    ("30m", timedelta(minutes=30)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h 30m", timedelta(hours=1, minutes=30)),
    ("1H30M", timedelta(hours=1, minutes=30)),
    ("2d", timedelta(days=2)),
    ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("1.5h", timedelta(minutes=90)),
    ("250ms", timedelta(milliseconds=250)),
    ("1s500ms", timedelta(seconds=1.5)),
    ("0.5s", timedelta(milliseconds=500)),
    (" 45m ", timedelta(minutes=45)),
    ("45", timedelta(seconds=45)),
    ("2.5", timedelta(seconds=2.5)),
    (90, timedelta(seconds=90)),
    (1.5, timedelta(seconds=1.5)),
    (0, timedelta(0)),
    (timedelta(hours=3), timedelta(hours=3)),
]


@pytest.mark.parametrize(("value", "expected"), DURATIONS, ids=[repr(v) for v, _ in DURATIONS])
def test_parse_duration(value: object, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value", ["30 minutes please", "", "h", "1x", "1h30", "-5s", "soon", True, None, [30]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"where\.it: .* is not a duration; write e\.g\. '90s'"):
        parse_duration(value, where="where.it")


FORMATTED: list[tuple[timedelta, str]] = [
    (timedelta(seconds=1), "1s"),
    (timedelta(seconds=90), "1m30s"),
    (timedelta(minutes=30), "30m"),
    (timedelta(hours=1), "1h"),
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(days=2), "2d"),
    (timedelta(days=1, seconds=1), "1d1s"),
    (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d2h3m4s"),
    (timedelta(days=400), "400d"),
    (timedelta(seconds=1.5), "1.5s"),
    (timedelta(milliseconds=250), "0.25s"),
    (timedelta(minutes=1, milliseconds=1), "60.001s"),
]


@pytest.mark.parametrize(("delta", "text"), FORMATTED, ids=[t for _, t in FORMATTED])
def test_format_duration(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text
    assert parse_duration(text) == delta


def test_format_duration_of_zero_reads_back() -> None:
    assert parse_duration(format_duration(timedelta(0))) == timedelta(0)


@given(st.integers(min_value=0, max_value=10**12))
def test_format_then_parse_whole_seconds(seconds: int) -> None:
    delta = timedelta(seconds=seconds)
    text = format_duration(delta)
    assert parse_duration(text) == delta
    assert format_duration(parse_duration(text)) == text
    if seconds:
        assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?(\d+s)?", text)


@given(st.integers(min_value=0, max_value=10**11))
def test_format_then_parse_whole_milliseconds(milliseconds: int) -> None:
    delta = timedelta(milliseconds=milliseconds)
    assert parse_duration(format_duration(delta)) == delta


@pytest.mark.parametrize("microseconds", [1, 50])
def test_format_then_parse_tiny_durations(microseconds: int) -> None:
    delta = timedelta(microseconds=microseconds)
    assert parse_duration(format_duration(delta)) == delta


SIZES: list[tuple[object, int]] = [
    (1024, 1024),
    (5.0, 5),
    ("100", 100),
    ("100B", 100),
    ("1kb", 1000),
    ("1K", 1000),
    ("1KiB", 1024),
    ("1Ki", 1024),
    ("10KiB", 10_240),
    ("1.5KiB", 1536),
    ("500MB", 500_000_000),
    ("500mb", 500_000_000),
    ("22GB", 22_000_000_000),
    (" 7 GB ", 7_000_000_000),
    ("1.5GiB", 1_610_612_736),
    ("2TB", 2 * 10**12),
    ("1TiB", 2**40),
    ("1PiB", 2**50),
    ("3PB", 3 * 10**15),
    ("0.5KB", 500),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[repr(v) for v, _ in SIZES])
def test_parse_bytes(value: object, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "", "GB", "1XB", "-5GB", "1 0GB", True, 1.5, None])
def test_parse_bytes_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"keep\.budget: .* is not a size; write e\.g\. '22GB'"):
        parse_bytes(value, where="keep.budget")


@pytest.mark.parametrize(
    ("value", "expected"), [("2.01KB", 2010), ("2.01GB", 2_010_000_000), ("2.03MB", 2_030_000)]
)
def test_parse_bytes_decimal_fractions_are_exact(value: str, expected: int) -> None:
    assert parse_bytes(value) == expected
