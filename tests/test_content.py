"""Slim checkpoints: weights-only, trainable-only and cast saves, chosen by a content policy."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.policy import Decision, Request, TrainingState, Variant
from tiny_state import make_state, train_step

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("step", "final", "decision", "expected"),
    [
        (5000, False, Decision.yes("every(1000)"), "full"),
        (1000, False, Decision.yes("every(1000)"), "weights"),
        (1234, True, Decision.yes("final"), "full"),
        (
            1234,
            False,
            Decision.yes("on_signal(SIGTERM)", requests=[Request("signal", "SIGTERM")]),
            "full",
        ),
        (
            1234,
            False,
            Decision.yes("on_file(SAVE_NOW)", requests=[Request("file", "SAVE_NOW")]),
            "full",
        ),
        # what counts is the request the save answers, not how its reason reads
        (1234, False, Decision.yes("on_signal(SIGTERM)"), "weights"),
    ],
)
def test_full_every_chooses_full_at_multiples_and_before_an_end(
    step: int, final: bool, decision: Decision, expected: str
) -> None:
    policy = cw.full_every(5000)
    state = TrainingState(step=step, now=NOW, final=final)
    assert policy.choose(state, decision).kind == expected


def test_full_every_answers_a_request_with_a_full_save() -> None:
    """The variant follows from what the triggers answered, end to end."""
    trigger = cw.every(1000) | cw.on_signal() | cw.on_file()
    content = cw.full_every(5000)
    for request in (Request("signal", "SIGUSR1"), Request("file", "SAVE_NOW")):
        state = TrainingState(step=1234, now=NOW, requests=frozenset({request}))
        assert content.choose(state, trigger.decide(state)).kind == "full"
    state = TrainingState(step=2000, now=NOW)
    assert content.choose(state, trigger.decide(state)).kind == "weights"


VARIANTS = [
    cw.full(),
    Variant("full", "net"),
    cw.weights_only(),
    cw.weights_only("net", cast="float16"),
    cw.trainable_only(cast="bfloat16"),
    cw.trainable_only("backbone"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v.label}-{v.key}" for v in VARIANTS])
def test_variant_json_round_trips(variant: Variant) -> None:
    data = variant.to_json()
    assert data == {"kind": variant.kind, "key": variant.key, "cast": variant.cast}
    assert Variant.from_json(data) == variant
    assert Variant.from_json(json.loads(json.dumps(data))) == variant


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, cw.full()),  # manifests from before slim saves
        ("weights", cw.full()),
        ([], cw.full()),
        ({}, cw.full()),
        ({"kind": "lora"}, cw.full()),
        ({"kind": 3}, cw.full()),
        ({"kind": "full", "cast": "bfloat16"}, cw.full()),
        # a slim kind stays slim: a slim checkpoint must never be taken for a full one
        ({"kind": "weights"}, cw.weights_only()),
        ({"kind": "weights", "key": "", "cast": "int4"}, cw.weights_only()),
        ({"kind": "trainable", "key": 7, "cast": "float16"}, cw.trainable_only(cast="float16")),
    ],
)
def test_variant_from_json_is_lenient(data: object, expected: Variant) -> None:
    assert Variant.from_json(data) == expected


@pytest.mark.parametrize(
    ("variant", "label"),
    [
        (cw.full(), "full"),
        (cw.weights_only(), "weights"),
        (cw.trainable_only(cast="bfloat16"), "trainable/bfloat16"),
    ],
)
def test_variant_label(variant: Variant, label: str) -> None:
    assert variant.label == label
    assert Variant.from_json(variant.to_json()).label == label


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Variant("half"), "variant kind"),  # type: ignore[arg-type]
        (lambda: cw.weights_only(cast="int8"), "cast must be one of"),
        (lambda: Variant("full", cast="bfloat16"), "never cast"),
        (lambda: cw.full_every(0), r"full_every\(interval\)"),
        (lambda: cw.full_every(10, otherwise="weights"), "takes a variant"),  # type: ignore[arg-type]
    ],
)
def test_bad_content_policies(make: Callable[[], object], message: str) -> None:
    with pytest.raises(cw.ConfigError, match=message):
        make()


def test_slim_saves_between_full_ones_and_restore_skips_them(tmp_path: Path) -> None:
    state = make_state(64, freeze=True)
    content = cw.full_every(4, otherwise=cw.trainable_only(cast="bfloat16"))
    with cw.CheckpointManager(tmp_path, save=cw.every(1), content=content) as manager:
        for step in range(1, 7):
            train_step(state, 64)
            manager.step(step, state)
        manager.wait()
        infos = {c.step: c for c in manager.run.checkpoints()}
    assert {s: i.variant for s, i in infos.items()} == {
        1: "trainable/bfloat16",
        2: "trainable/bfloat16",
        3: "trainable/bfloat16",
        4: "full",
        5: "trainable/bfloat16",
        6: "trainable/bfloat16",
    }
    assert infos[5].logical_bytes < infos[4].logical_bytes / 10
    slim = cw.open_run(tmp_path).load(6)["model"]
    assert set(slim) == {"head.weight", "head.bias"}
    assert slim["head.weight"].dtype == torch.bfloat16
    assert torch.equal(slim["head.weight"], state["model"].head.weight.to(torch.bfloat16))
    fresh = make_state(64, freeze=True, seed=5)
    assert cw.open_run(tmp_path).restore(fresh, rng=True) == 4
    with pytest.raises(cw.CheckpointError, match="holds trainable only and cannot resume"):
        cw.open_run(tmp_path).restore(fresh, rng=True, step=6)


def test_weights_only_exports_like_a_full_checkpoint(tmp_path: Path) -> None:
    state = make_state(16)
    train_step(state, 16)
    with cw.CheckpointManager(
        tmp_path / "run", save=cw.every(1), content=cw.weights_only()
    ) as manager:
        manager.step(1, state)
        path = manager.run.export(1, tmp_path / "out")
        assert set(manager.run.load(1)) == {"model"}
    from safetensors.torch import load_file

    weights = load_file(str(path))
    assert set(weights) == set(state["model"].state_dict())


def test_slim_save_without_the_model_entry_is_a_clear_error(tmp_path: Path) -> None:
    m = cw.CheckpointManager(tmp_path, save=cw.every(1), content=cw.weights_only("net"))
    with pytest.raises(cw.ConfigError, match="needs the model under 'net'"):
        m.step(1, {"model": torch.nn.Linear(2, 2)})
    m.close()
