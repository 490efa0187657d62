"""The ``checkpoint-N`` folder one node's ranks resume a DeepSpeed engine from: which files
each rank and the node's leader write, and which saved ranks the leader reads for them
(the real jobs are in :mod:`test_deepspeed`)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ckptwise.errors import CheckpointError, ConfigError

pytest.importorskip("deepspeed")

from ckptwise.integrations.transformers.deepspeed import (
    deepspeed_configs,
    per_rank_file,
    set_load_universal,
    to_universal,
)
from ckptwise.integrations.transformers.folder import write_deepspeed_node, write_deepspeed_own

TAG = "global_step5"
SCHEDULER = {"last_batch_iteration": 4, "warmup_num_steps": 5}


def engine(rank: int, stage: int) -> dict[str, Any]:
    """One saved rank's DeepSpeed entry, as a checkpoint gives it back (plain values)."""
    files: dict[str, Any] = {
        f"{TAG}/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": {
            "optimizer_state_dict": {"partition": torch.full((2,), float(rank))}
        }
    }
    states = {"module": {"w": torch.ones(2)}, "lr_scheduler": SCHEDULER, "global_steps": 5}
    if stage == 3:
        files[f"{TAG}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = states
    elif rank == 0:  # ZeRO-1/2: data-parallel rank 0 alone saves the model states
        files[f"{TAG}/mp_rank_00_model_states.pt"] = states
    return {"files": files}


def values(rank: int, stage: int) -> dict[str, Any]:
    return {"deepspeed": engine(rank, stage), "trainer_state": {"global_step": 5}}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class Reads:
    """``engine_of`` for the leader: the saved ranks it asked for."""

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.asked: list[int] = []

    def __call__(self, rank: int) -> Mapping[str, Any]:
        self.asked.append(rank)
        return engine(rank, self.stage)


@pytest.mark.parametrize(
    ("name", "own"),
    [
        (f"{TAG}/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", True),
        (f"{TAG}/zero_pp_rank_3_mp_rank_00_optim_states.pt", True),  # fp16
        (f"{TAG}/zero_pp_rank_3_mp_rank_00_model_states.pt", True),  # ZeRO-3
        (f"{TAG}/mp_rank_00_model_states.pt", False),  # ZeRO-1/2: every rank loads it
    ],
)
def test_per_rank_files_are_those_only_their_own_rank_loads(name: str, own: bool) -> None:
    assert per_rank_file(name) is own


@pytest.mark.parametrize("stage", [2, 3])
def test_a_leader_of_a_node_without_rank_0_writes_what_its_ranks_load(
    tmp_path: Path, stage: int
) -> None:
    folder = tmp_path / "checkpoint-5"
    reads = Reads(stage)
    write_deepspeed_own(folder, engine(1, stage))
    write_deepspeed_node(
        folder, values(1, stage), reads, rank=1, saved_by=2, all_ranks=False, universal=False
    )
    states = (
        f"{TAG}/mp_rank_00_model_states.pt"
        if stage == 2
        else f"{TAG}/zero_pp_rank_1_mp_rank_00_model_states.pt"
    )
    assert listing(folder) == sorted(
        [
            f"{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            states,
            "latest",
            "scheduler.pt",
            "trainer_state.json",
        ]
    )
    # ZeRO-2's model states are saved rank 0's; under ZeRO-3 no other rank's file is needed
    assert reads.asked == ([0] if stage == 2 else [])
    assert (folder / "latest").read_text() == TAG
    assert torch.load(folder / "scheduler.pt", weights_only=True) == SCHEDULER
    assert json.loads((folder / "trainer_state.json").read_text()) == {"global_step": 5}


def test_rank_0_leads_its_node_from_its_own_files(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    reads = Reads(2)
    write_deepspeed_own(folder, engine(0, 2))
    write_deepspeed_node(
        folder, values(0, 2), reads, rank=0, saved_by=2, all_ranks=False, universal=False
    )
    assert reads.asked == []
    assert f"{TAG}/mp_rank_00_model_states.pt" in listing(folder)
    assert f"{TAG}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" not in listing(folder)


def test_an_elastic_zero2_checkpoint_gets_every_saved_ranks_partitions(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    reads = Reads(2)
    write_deepspeed_node(
        folder, values(1, 2), reads, rank=1, saved_by=2, all_ranks=True, universal=False
    )
    assert reads.asked == [0]
    for rank in (0, 1):
        assert f"{TAG}/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in listing(folder)


def test_the_load_universal_switch_goes_into_every_config_the_trainer_holds() -> None:
    plugin_config: dict[str, Any] = {"zero_optimization": {"stage": 3}}
    args_config: dict[str, Any] = {"checkpoint": {"tag_validation": "Warn"}}
    plugin = SimpleNamespace(
        deepspeed_config=plugin_config, hf_ds_config=SimpleNamespace(config=plugin_config)
    )
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        args=SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=args_config)),
    )
    configs = deepspeed_configs(trainer)
    assert [id(c) for c in configs] == [id(plugin_config), id(args_config)]
    set_load_universal(configs, True)
    assert plugin_config["checkpoint"] == {"load_universal": True}
    assert args_config["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    set_load_universal(configs, False)
    assert plugin_config["checkpoint"] == {"load_universal": False}


def test_a_deepspeed_without_universal_conversion_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.endswith("ds_to_universal") else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"upgrade DeepSpeed .* or resume on as many"):
        to_universal(tmp_path / TAG, tmp_path / "out" / TAG, ranks=2)


@pytest.mark.integration  # runs DeepSpeed's conversion in a subprocess
def test_a_failed_conversion_says_why_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / TAG).mkdir()  # no files: DeepSpeed's conversion finds nothing to convert
    with pytest.raises(CheckpointError, match=r"(?s)resume on as many processes.*optim_states"):
        to_universal(tmp_path / TAG, tmp_path / "out" / TAG, ranks=2)
