"""Policy files carry every manager option a script sets, so one file configures a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import ckptwise as cw
from ckptwise.config import Policy, policy_from_config, to_config
from ckptwise.config.options import dump_content, read_content
from ckptwise.errors import CheckpointError, ConfigError
from ckptwise.integrations.transformers.arguments import CkptwiseArguments, resolve_policy
from ckptwise.manager import CheckpointManager
from ckptwise.policy import ContentPolicy, Decision, TrainingState, Variant, after

WHOLE_RUN = """\
save:
  after: 2
  every: 1
keep:
  last: 2
content: {full_every: 4, otherwise: {weights_only: {cast: bfloat16}}}
codec: zstd
async_save: true
on_busy: wait
rng: false
"""

WHOLE_RUN_POLICY = Policy(
    save=after(2, cw.every(1)),
    keep=cw.keep_last(2),
    content=cw.full_every(4, otherwise=cw.weights_only(cast="bfloat16")),
    codec="zstd",
    async_save=True,
    on_busy="wait",
    rng=False,
)


def test_a_policy_file_sets_every_manager_option(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(WHOLE_RUN)
    assert policy_from_config(path) == WHOLE_RUN_POLICY
    assert WHOLE_RUN_POLICY.manager_options() == {
        "save": WHOLE_RUN_POLICY.save,
        "keep": WHOLE_RUN_POLICY.keep,
        "content": WHOLE_RUN_POLICY.content,
        "codec": "zstd",
        "async_save": True,
        "on_busy": "wait",
        "rng": False,
    }


def test_from_config_builds_the_manager_the_file_describes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(WHOLE_RUN)
    model = torch.nn.Linear(64, 64)
    with CheckpointManager.from_config(tmp_path / "run", path) as manager:
        assert manager.save(1, {"model": model}) is None  # async_save: it returns at once
        manager.wait()
        for step in range(2, 6):
            manager.step(step, {"model": model})
        manager.wait()
        run = manager.run
        assert run.steps() == [4, 5]  # after(2) | every(1), then keep_last(2)
        assert run.info(4).variant == "full"  # full_every(4)
        assert run.info(5).variant == "weights/bfloat16"
        assert {e.codec for e in run.manifest(4).tensors.values()} == {"zstd"}
        assert "__rng__" not in run.manifest(4).tree  # rng: false


def test_arguments_given_to_from_config_win_over_the_file(tmp_path: Path) -> None:
    config = {"save": {"every": 1}, "codec": "zstd", "async_save": True}
    with CheckpointManager.from_config(
        tmp_path, config, codec="raw", async_save=False, rng=False
    ) as manager:
        info = manager.save(1, {"w": torch.ones(1 << 15)})
        assert info is not None  # synchronous
        assert manager.run.manifest(1).tensors["w"].codec == "raw"


@pytest.mark.parametrize(
    ("value", "content"),
    [
        ("full", cw.full()),
        ("weights_only", cw.weights_only()),
        ("weights", cw.weights_only()),
        ({"weights_only": {"cast": "bfloat16"}}, cw.weights_only(cast="bfloat16")),
        ({"trainable_only": {"key": "net"}}, cw.trainable_only("net")),
        ({"trainable_only": True}, cw.trainable_only()),
        ({"full_every": 5000}, cw.full_every(5000)),
        (
            {"full_every": 5000, "otherwise": "trainable_only"},
            cw.full_every(5000, otherwise=cw.trainable_only()),
        ),
        (
            {"full_every": {"interval": 10, "otherwise": {"weights_only": {"cast": "float16"}}}},
            cw.full_every(10, otherwise=cw.weights_only(cast="float16")),
        ),
    ],
)
def test_content_forms(value: object, content: ContentPolicy) -> None:
    assert read_content(value, "content") == content
    assert read_content(dump_content(content), "content") == content


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (
            {"content": "slim"},
            r"content: unknown content policy 'slim'; allowed: full, weights_only, "
            r"trainable_only, full_every",
        ),
        ({"content": {"weights_only": {"dtype": "x"}}}, r"content\.weights_only\.dtype: unknown"),
        ({"content": {"weights_only": {"cast": "int8"}}}, r"content\.weights_only: cast must be"),
        (
            {"content": {"full": {"key": "m"}}},
            r"content\.full\.key: unknown parameter; full takes no",
        ),
        (
            {"content": {"full_every": {"otherwise": "full"}}},
            r"content\.full_every: full_every needs",
        ),
        (
            {"content": {"full_every": "often"}},
            r"content\.full_every\.interval: 'often' is not an int",
        ),
        (
            {"content": {"full_every": 5, "every": 2}},
            r"content\.full_every\.every: unknown parameter",
        ),
        ({"content": 3}, r"content: 3 is not a content variant"),
        ({"codec": "lz4"}, r"codec: unknown codec 'lz4'; allowed: auto, bytegroup, raw, zstd"),
        ({"deltas": 0}, r"deltas: 0 is not a keyframe interval"),
        ({"async_save": "yes"}, r"async_save: 'yes' is not true or false"),
        ({"on_busy": "drop"}, r"on_busy: 'drop' is not 'wait' or 'skip'"),
        ({"rng": 1}, r"rng: 1 is not true or false"),
    ],
)
def test_option_errors_name_the_key(config: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        policy_from_config(config)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"full_evry": 5000},
            "content.full_evry: unknown content policy 'full_evry'; did you mean "
            "'full_every'? allowed: full, weights_only, trainable_only, full_every",
        ),
        (
            "weights_onyl",
            "content: unknown content policy 'weights_onyl'; did you mean 'weights_only'?",
        ),
        (
            {"full_every": 10, "otherwise": "trainable_onl"},
            "content.full_every.otherwise: unknown content policy 'trainable_onl'; did you mean "
            "'trainable_only'? allowed: full, weights_only, trainable_only",
        ),
        (
            {"full_every": {"intervl": 10}},
            "content.full_every.intervl: unknown parameter; did you mean 'interval'?",
        ),
        (
            {"weights_only": {"cst": "bfloat16"}},
            "content.weights_only.cst: unknown parameter; did you mean 'cast'?",
        ),
        (
            {"full_every": 0},
            "content.full_every.interval: 0 is not a positive integer; e.g. full_every: 5000",
        ),
    ],
)
def test_a_misspelt_content_key_is_named_with_the_closest_one(
    content: object, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_config({"content": content})
    assert str(info.value).startswith(message)


def test_options_round_trip_through_to_config(tmp_path: Path) -> None:
    policy = Policy(
        save=cw.every(10),
        content=cw.full_every(100, otherwise=cw.trainable_only(cast="bfloat16")),
        codec="bytegroup",
        deltas=8,
        async_save=False,
        on_busy="skip",
    )
    config = to_config(policy)
    assert config == {
        "save": {"every": {"interval": 10, "start": 0}},
        "content": {"full_every": 100, "otherwise": {"trainable_only": {"cast": "bfloat16"}}},
        "codec": "bytegroup",
        "deltas": 8,
        "async_save": False,
        "on_busy": "skip",
    }
    assert policy_from_config(json.loads(json.dumps(config))) == policy
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert policy_from_config(path) == policy
    toml = tmp_path / "policy.toml"
    toml.write_text(
        'codec = "bytegroup"\ndeltas = 8\non_busy = "skip"\nasync_save = false\n'
        "[save]\nevery = 10\n[content]\nfull_every = 100\n"
        '[content.otherwise.trainable_only]\ncast = "bfloat16"\n'
    )
    assert policy_from_config(toml) == policy


@pytest.mark.parametrize("deltas", [None, False])
def test_no_deltas_may_be_written_out(deltas: object) -> None:
    assert policy_from_config({"deltas": deltas}).options() == {}


class _Custom:
    def choose(self, state: TrainingState, decision: Decision) -> Variant:
        return cw.full()


def test_a_content_policy_that_is_not_built_in_has_no_config_form() -> None:
    with pytest.raises(CheckpointError, match="has no config form"):
        to_config(Policy(content=_Custom()))


def test_the_trainer_adapter_reads_every_option_from_ckptwise_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(WHOLE_RUN)
    monkeypatch.setenv("CKPTWISE_CONFIG", str(path))
    monkeypatch.setenv("CKPTWISE_KEEP", "last(5)")
    policy = resolve_policy(None, None, None, None, CkptwiseArguments.from_env())
    assert policy.options() == WHOLE_RUN_POLICY.options()
    assert policy.save == WHOLE_RUN_POLICY.save
    assert policy.keep == cw.keep_last(5)  # the one-line setting replaces the file's


@pytest.mark.parametrize(
    ("variable", "value", "pattern"),
    [
        (
            "CKPTWISE_SAVE",
            "every(1000",
            r"^CKPTWISE_SAVE='every\(1000': in 'every\(1000': expected",
        ),
        (
            "CKPTWISE_KEEP",
            "on_improvement(x)",
            r"^CKPTWISE_KEEP='on_improvement\(x\)': .* save trigger",
        ),
        ("CKPTWISE_CONFIG", "nowhere.yaml", r"^CKPTWISE_CONFIG='nowhere.yaml': cannot read"),
    ],
)
def test_errors_from_environment_variables_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, pattern: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=pattern):
        resolve_policy(None, None, None, None, CkptwiseArguments.from_env())


def test_errors_from_command_line_flags_name_the_flag() -> None:
    options = CkptwiseArguments(ckptwise_save="evry(3)", ckptwise_weights="some")
    with pytest.raises(ConfigError, match=r"^--ckptwise_save='evry\(3\)': .* unknown policy"):
        resolve_policy(None, None, None, None, options)
    with pytest.raises(ConfigError, match=r"^--ckptwise_weights='some': weights must be"):
        options.weights()
    env = CkptwiseArguments.from_env()
    env.ckptwise_weights = "some"
    with pytest.raises(ConfigError, match=r"^CKPTWISE_WEIGHTS='some'"):
        env.weights()
