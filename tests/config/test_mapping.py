"""Tests for :mod:`ckptwise.config.mapping`: policies from dicts and from YAML, TOML and
JSON files, the short forms people write, and error messages that name the key path."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

import ckptwise as cw
from ckptwise.config import Policy, policy_from_config
from ckptwise.errors import ConfigError
from ckptwise.policy import after
from policy_support import all_of, any_of, keep_any

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
        r"save\.evry: unknown trigger; did you mean 'every'\? allowed: every, at_steps, "
        r"schedule, geometric, "
        r"every_duration, overhead_budget, optimal_interval, on_improvement, on_signal, "
        r"on_file, final, never, after, any, all",
    ),
    (
        "unknown-parameter",
        {"save": {"on_improvement": {"metrc": "eval_loss"}}},
        r"save\.on_improvement\.metrc: unknown parameter; did you mean 'metric'\? "
        r"on_improvement takes metric, mode, "
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
        r"save\.on_improvement\.mode: must be 'min' .* or 'max' .*got 'lowest'",
    ),
    (
        "bad-keep-mode",
        {"keep": {"best": {"n": 1, "metric": "acc", "mode": "up"}}},
        r"keep\.best\.mode: must be 'min' .* or 'max' .*got 'up'",
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
        r"kep: unknown section; did you mean 'keep'\? a policy config has save, keep, "
        r"content, codec, deltas, "
        r"async_save, defer_copy, on_busy, rng",
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
        r"keep\.newest: unknown retention policy; allowed: last, best, every, within, budget, "
        r"all, any",
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
        r"save\.every\.interval: 0 is not a positive integer; e\.g\. every: 1000$",
    ),
    (
        "keep-factory-rejects",
        {"keep": {"last": 0}},
        r"keep\.last\.n: 0 is not a positive integer; e\.g\. last: 3$",
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


# -- after: the run-wide warm-up -----------------------------------------------------------------


def test_after_beside_triggers_holds_them_all_back() -> None:
    policy = policy_from_config(
        {"save": {"after": 2000, "every": 1000, "on_improvement": "eval_loss", "on_signal": True}}
    )
    assert policy.save == after(
        2000, any_of(cw.every(1000), cw.on_improvement("eval_loss"), cw.on_signal())
    )


def test_after_inside_a_list_holds_back_only_its_own_mapping() -> None:
    policy = policy_from_config({"save": {"any": [{"after": 50, "every": 10}, {"final": True}]}})
    assert policy.save == any_of(after(50, cw.every(10)), cw.on_final())


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"save": {"after": 2000}}, r"save\.after: give the triggers it holds back beside it"),
        ({"save": {"after": "soon", "every": 5}}, r"save\.after: 'soon' is not an integer"),
        ({"save": {"after": -5, "every": 5}}, r"save\.after: after\(start\) must be an integer"),
        ({"save": {"after": 5, "evry": 5}}, r"save\.evry: unknown trigger"),
        ({"keep": {"after": 5, "last": 2}}, r"keep\.after: 'after' is a save trigger"),
    ],
)
def test_after_errors_name_the_key(config: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        policy_from_config(config)
