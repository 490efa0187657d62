"""Slim checkpoints: weights-only, trainable-only and cast saves, chosen by a content policy."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

import ckptwise as cw
from ckptwise.policy.state import Decision, TrainingState
from conftest import make_state, train_step

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("step", "final", "reasons", "expected"),
    [
        (5000, False, ("every(1000)",), "full"),
        (1000, False, ("every(1000)",), "weights"),
        (1234, True, ("final",), "full"),
        (1234, False, ("on_signal(SIGTERM)",), "full"),
        (1234, False, ("on_file(SAVE_NOW)",), "full"),
    ],
)
def test_full_every_chooses_full_at_multiples_and_before_an_end(
    step: int, final: bool, reasons: tuple[str, ...], expected: str
) -> None:
    policy = cw.full_every(5000)
    state = TrainingState(step=step, now=NOW, final=final)
    assert policy.choose(state, Decision(True, reasons)).kind == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: cw.Variant("half"), "variant kind"),  # type: ignore[arg-type]
        (lambda: cw.weights_only(cast="int8"), "cast must be one of"),
        (lambda: cw.Variant("full", cast="bfloat16"), "never cast"),
        (lambda: cw.full_every(0), r"full_every\(interval\)"),
        (lambda: cw.full_every(10, otherwise="weights"), "takes a variant"),  # type: ignore[arg-type]
    ],
)
def test_bad_content_policies(make: object, message: str) -> None:
    with pytest.raises(cw.ConfigError, match=message):
        make()  # type: ignore[operator]


def test_slim_saves_between_full_ones_and_restore_skips_them(tmp_path: Path) -> None:
    state = make_state(64, freeze=True)
    content = cw.full_every(4, otherwise=cw.trainable_only(cast="bfloat16"))
    with cw.CheckpointManager(tmp_path, save=cw.every(1), content=content) as manager:
        for step in range(1, 7):
            train_step(state, 64)
            manager.step(step, state)
        infos = {c.step: c for c in manager.checkpoints()}
    assert {s: i.variant for s, i in infos.items()} == {
        1: "trainable/bfloat16",
        2: "trainable/bfloat16",
        3: "trainable/bfloat16",
        4: "full",
        5: "trainable/bfloat16",
        6: "trainable/bfloat16",
    }
    assert infos[5].logical_bytes < infos[4].logical_bytes / 10
    slim = cw.CheckpointManager(tmp_path).load(6)["model"]
    assert set(slim) == {"head.weight", "head.bias"}
    assert slim["head.weight"].dtype == torch.bfloat16
    assert torch.equal(slim["head.weight"], state["model"].head.weight.to(torch.bfloat16))
    fresh = make_state(64, freeze=True, seed=5)
    assert cw.CheckpointManager(tmp_path).restore(fresh) == 4
    with pytest.raises(cw.CheckpointError, match="holds trainable only and cannot resume"):
        cw.CheckpointManager(tmp_path).restore(fresh, step=6)


def test_weights_only_exports_like_a_full_checkpoint(tmp_path: Path) -> None:
    state = make_state(16)
    train_step(state, 16)
    with cw.CheckpointManager(
        tmp_path / "run", save=cw.every(1), content=cw.weights_only()
    ) as manager:
        manager.step(1, state)
        path = manager.export(1, tmp_path / "out")
        assert set(manager.load(1)) == {"model"}
    from safetensors.torch import load_file

    weights = load_file(str(path))
    assert set(weights) == set(state["model"].state_dict())


def test_slim_save_without_the_model_entry_is_a_clear_error(tmp_path: Path) -> None:
    m = cw.CheckpointManager(tmp_path, save=cw.every(1), content=cw.weights_only("net"))
    with pytest.raises(cw.ConfigError, match="needs the model under 'net'"):
        m.step(1, {"model": torch.nn.Linear(2, 2)})
    m.close()
