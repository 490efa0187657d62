"""The Hugging Face ``Trainer`` integration with a real ``Trainer`` on a tiny MiniCPM-V-shaped
model (nothing downloaded): saved steps, retention, resume after kill -9, bytes, exports."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from minicpmv_tiny import (
    CPMTrainer,
    MiniCPMVLike,
    SyntheticImageText,
    build_model,
    build_tokenizer,
)
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import ckptwise as cw
from ckptwise.cli.main import cli
from ckptwise.integrations.transformers import (
    CkptwiseArguments,
    attach,
    policy_from_training_args,
)

pytestmark = pytest.mark.integration
#: from_pretrained's defaults: transformers 5 takes config.json's dtype; 4.x loads fp32 unless
#: told to read it
AUTO: dict[str, Any] = (
    {} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
)

SCRIPT = Path(__file__).parents[2] / "examples" / "finetune_minicpmv.py"
#: what a run folder holds (docs/FORMAT.md); anything else was left behind by someone
RUN_FILES = {"ckptwise.lock", "run.json", "checkpoints", "objects", "pins", "pruning", "branches"}


def make_trainer(out: Path, **overrides: Any) -> CPMTrainer:
    options: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 20,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 5,
        "save_strategy": "steps",
        "save_steps": 5,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return CPMTrainer(
        model=build_model(),
        args=TrainingArguments(**options),
        train_dataset=SyntheticImageText(128, seed=1),
        eval_dataset=SyntheticImageText(32, seed=2),
    )


def test_policy_owns_every_save_and_the_trainer_writes_none(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out")
    callback = attach(
        trainer, tmp_path / "run", save=cw.every(7) | cw.on_final(), keep=cw.keep_last(2)
    )
    trainer.train()
    assert [s for s, _ in callback.saved] == [7, 14, 20]
    assert callback.saved[-1][1] == ("final",)
    assert [c.step for c in callback.manager.run.checkpoints()] == [14, 20]
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # not even at max_steps


def test_eval_metrics_of_the_same_step_drive_on_improvement(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out", eval_steps=4)
    callback = attach(
        trainer,
        tmp_path / "run",
        save=cw.on_improvement("eval_loss"),
        keep=cw.keep_best(1, "eval_loss"),
        final=False,
    )
    trainer.train()
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    expected, best = [], float("inf")
    for step, value in evals:
        if value < best:
            expected.append(step)
            best = value
    assert [s for s, _ in callback.saved] == expected
    (info,) = callback.manager.run.checkpoints()
    assert info.metrics["eval_loss"] == min(v for _, v in evals)
    assert "loss" in info.metrics  # the training loss logged at that step travels too


def test_default_policy_mirrors_the_trainer_arguments(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out", save_steps=6, save_total_limit=2)
    policy = policy_from_training_args(trainer.args)
    assert policy.save == cw.every(6) | cw.on_final()
    assert policy.keep == cw.keep_last(2)
    callback = attach(trainer)
    trainer.train()
    assert [s for s, _ in callback.saved] == [6, 12, 18, 20]
    assert [c.step for c in callback.manager.run.checkpoints()] == [18, 20]
    assert (tmp_path / "out" / "ckptwise" / "checkpoints").is_dir()


def test_retention_alone_saves_as_the_training_arguments_say(tmp_path: Path) -> None:
    from ckptwise.integrations.transformers.arguments import resolve_policy

    args = TrainingArguments(output_dir=str(tmp_path), save_steps=7, use_cpu=True)
    policy = resolve_policy(args, None, cw.keep_last(1), None, CkptwiseArguments())
    assert policy.save == cw.every(7) | cw.on_final()
    assert policy.keep == cw.keep_last(1)


def test_policy_from_the_command_line_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataclasses: Any = (TrainingArguments, CkptwiseArguments)
    parser = HfArgumentParser(dataclasses)
    _, ckpt = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--ckptwise_save",
            "every(3, start=9)",
            "--ckptwise_keep",
            "last(1)",
            "--ckptwise_dir",
            str(tmp_path / "cli-run"),
        ]
    )
    trainer = make_trainer(tmp_path / "out", max_steps=12)
    callback = attach(trainer, args=ckpt)
    trainer.train()
    assert [s for s, _ in callback.saved] == [9, 12]
    assert callback.manager.run.url == str(tmp_path / "cli-run")

    monkeypatch.setenv("CKPTWISE_SAVE", "at_steps([2, 4])")
    trainer = make_trainer(tmp_path / "out2", max_steps=6)
    assert _trained(attach(trainer), trainer) == [
        (2, ("at_steps",)),
        (4, ("at_steps",)),
        (6, ("final",)),
    ]


def test_the_last_step_of_training_is_saved_unless_final_is_false(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out", max_steps=5, eval_strategy="no")
    callback = attach(trainer, tmp_path / "a", save=cw.every(2), keep=cw.keep_last(2))
    trainer.train()
    assert callback.saved == [(2, ("every(2)",)), (4, ("every(2)",)), (5, ("final",))]
    assert [c.step for c in callback.manager.run.checkpoints()] == [4, 5]

    class StopAt3(TrainerCallback):  # as EarlyStoppingCallback stops a run
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            control.should_training_stop = state.global_step == 3
            return control

    trainer = make_trainer(tmp_path / "out", max_steps=5, eval_strategy="no")
    trainer.add_callback(StopAt3())
    callback = attach(trainer, tmp_path / "b", save=cw.every(2), keep=cw.keep_all())
    trainer.train()
    assert callback.saved == [(2, ("every(2)",)), (3, ("final",))]
    assert callback.manager.run.load(3)["trainer_state"]["global_step"] == 3

    trainer = make_trainer(tmp_path / "out", max_steps=3, eval_strategy="no")
    callback = attach(trainer, tmp_path / "c", save=cw.every(2), final=False)
    trainer.train()
    assert [c.step for c in callback.manager.run.checkpoints()] == [2]


def test_training_releases_the_run_and_attach_again_in_the_same_process_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    policy: dict[str, Any] = {"save": cw.every(2), "keep": cw.keep_last(2)}
    first = make_trainer(tmp_path / "out", max_steps=2, eval_strategy="no")
    with caplog.at_level(logging.INFO, logger="ckptwise"):
        callback = attach(first, run, **policy)
    assert f"ckptwise ls {run}" in caplog.text  # where the checkpoints go, and how to look
    first.train()
    # the lock is released: any writer may take the run now
    cw.CheckpointManager(run, save=cw.every(1)).close()
    assert [c.step for c in callback.manager.run.checkpoints()] == [2]  # closed, still reads

    # a new Trainer attached to the same run while the first (and its callback) live on
    second = make_trainer(tmp_path / "out", max_steps=4, eval_strategy="no")
    again = attach(second, run, **policy)
    second.train(resume_from_checkpoint=again.resume_checkpoint())
    assert again.saved == [(4, ("every(2)",))]

    # attached twice before training: the first attach's manager is closed for the second
    third = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    unused = attach(third, run, **policy)
    fourth = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    latest = attach(fourth, run, **policy)
    with pytest.raises(cw.CheckpointError, match="closed"):
        unused.manager.save(99, {})
    fourth.train(resume_from_checkpoint=latest.resume_checkpoint())
    assert latest.saved == [(6, ("every(2)",))]

    # the same trainer trains on: its callback opens a new manager
    fourth.args.max_steps = 8
    fourth.train(resume_from_checkpoint=latest.resume_checkpoint())
    assert latest.saved[-1] == (8, ("every(2)",))
    assert [c.step for c in latest.manager.run.checkpoints()] == [6, 8]
    cw.CheckpointManager(run, save=cw.every(1)).close()


def test_a_requeued_finished_job_ends_at_once_without_a_step_or_a_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduler requeues a job that had finished: the same script resumes from the
    checkpoint at max_steps. ``Trainer`` alone would take one more step there (6 is not a
    whole number of epochs, so the loop resumes mid-epoch and checks max_steps only after a
    step) and ckptwise would save it as ``final``; instead training ends at once."""
    run = tmp_path / "run"
    policy: dict[str, Any] = {"save": cw.every(4), "keep": cw.keep_last(2)}
    first = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    attach(first, run, **policy)
    first.train()
    assert [c.step for c in cw.open_run(run).checkpoints()] == [4, 6]

    requeued = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    callback = attach(requeued, run, **policy)
    with caplog.at_level(logging.INFO, logger="ckptwise"):
        requeued.train(resume_from_checkpoint=callback.resume_checkpoint())
    assert "checkpoint 6 is at max_steps (6): training is already finished" in caplog.text
    assert requeued.state.global_step == 6
    assert callback.saved == []
    assert [c.step for c in cw.open_run(run).checkpoints()] == [4, 6]
    assert first.model is not None
    assert requeued.model is not None
    trained, resumed = first.model.state_dict(), requeued.model.state_dict()
    assert all(torch.equal(trained[name], resumed[name]) for name in trained)  # no step taken
    assert "get_batch_samples" not in vars(requeued)  # the Trainer is itself again

    # asked for more steps, the same trainer trains on as usual
    requeued.args.max_steps = 8
    requeued.train(resume_from_checkpoint=callback.resume_checkpoint())
    assert callback.saved == [(8, ("every(4)",))]


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_train_and_resume_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The resume folder is removed, from the run folder or (remote runs) the temp dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    # torch's compiler cache folder is torch's own, not something ckptwise creates
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run = str(tmp_path / "run") if where == "folder" else f"memory://hf-{uuid.uuid4().hex}"
    policy: dict[str, Any] = {"save": cw.every(2), "keep": cw.keep_last(2)}
    trainer = make_trainer(tmp_path / "out", max_steps=2, eval_strategy="no")
    attach(trainer, run, **policy)
    trainer.train()
    trainer = make_trainer(tmp_path / "out", max_steps=4, eval_strategy="no")
    callback = attach(trainer, run, **policy)
    folder = callback.resume_checkpoint()
    assert folder is not None
    assert Path(folder).is_dir()
    if where == "memory":
        assert Path(folder).is_relative_to(temp)
    trainer.train(resume_from_checkpoint=folder)
    assert callback.saved == [(4, ("every(2)",))]
    assert not Path(folder).exists()
    assert list(temp.iterdir()) == []
    assert list((tmp_path / "out").iterdir()) == []
    if where == "memory":
        return
    assert set(os.listdir(run)) <= RUN_FILES
    # resumed, then training failed before its first step: the next resume removes it
    trainer = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    callback = attach(trainer, run, **policy)
    folder = callback.resume_checkpoint()
    assert folder is not None
    callback = attach(trainer, run, **policy)
    assert callback.resume_checkpoint() is not None
    assert not Path(folder).exists()


def _trained(callback: Any, trainer: CPMTrainer) -> list[tuple[int, tuple[str, ...]]]:
    trainer.train()
    saved: list[tuple[int, tuple[str, ...]]] = callback.saved
    return saved


def run_script(out: Path, *extra: str, sleep: float = 0.0) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        str(SCRIPT),
        "--output_dir",
        str(out),
        "--max_steps",
        "30",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "10",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--seed",
        "0",
        "--full_determinism",
        "--disable_tqdm",
        "true",
        "--losses_file",
        f"{out}.losses",
        "--summary_file",
        f"{out}.json",
        "--step_sleep",
        str(sleep),
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run overwrites the steps it redoes
    return out


def test_kill_9_after_a_save_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    policy = ["--ckptwise_save", "every(5)", "--ckptwise_keep", "last(2)"]
    straight = run_script(tmp_path / "a", *policy)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    victim = run_script(tmp_path / "b", *policy, sleep=0.15)
    # saves commit in the background: step 15 counts once its manifest is there (the commit),
    # not when step() returned; kill -9 then loses at most the save in flight
    manifest = tmp_path / "b" / "ckptwise" / "checkpoints" / "000000000015.json"
    deadline = time.monotonic() + 240
    while not manifest.exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "b.json").exists()  # it really died mid-run

    resumed = run_script(tmp_path / "b", *policy, "--resume", "true")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = losses(tmp_path / "a.losses"), losses(tmp_path / "b.losses")
    assert sorted(a) == list(range(1, 31))
    assert a == b
    summary_a = json.loads((tmp_path / "a.json").read_text())
    summary_b = json.loads((tmp_path / "b.json").read_text())
    assert summary_a["weights_digest"] == summary_b["weights_digest"]
    assert [s["step"] for s in summary_b["saves"]] == [20, 25, 30]  # resumed from 15
    assert set(os.listdir(tmp_path / "b" / "ckptwise")) <= RUN_FILES


def test_ten_saves_write_under_a_third_of_what_the_trainer_writes(tmp_path: Path) -> None:
    """MiniCPM-V's layout (frozen LLM, ~6 % trainable), 10 saves, everything kept."""
    common = ["--max_steps", "50", "--eval_strategy", "no", "--save_steps", "5"]

    def run(out: Path, *extra: str) -> dict[str, Any]:
        proc = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--output_dir",
                str(out),
                "--logging_steps",
                "1",
                "--per_device_train_batch_size",
                "8",
                "--disable_tqdm",
                "true",
                "--summary_file",
                f"{out}.json",
                *common,
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        summary: dict[str, Any] = json.loads(Path(f"{out}.json").read_text())
        return summary

    ours = run(tmp_path / "ours", "--ckptwise_save", "every(5)", "--ckptwise_keep", "all")
    theirs = run(tmp_path / "theirs", "--use_ckptwise", "false")
    assert 0.05 < ours["trainable_fraction"] < 0.07
    assert len(ours["saves"]) == len(theirs["saves"]) == 10
    assert ours["bytes_written"] * 3 <= theirs["bytes_written"], (ours, theirs)


def test_trainable_only_checkpoints_resume_and_export_the_best(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "out", max_steps=12, eval_steps=4)
    callback = attach(
        trainer,
        tmp_path / "run",
        save=cw.on_improvement("eval_loss") | cw.on_final(),
        keep=cw.keep_all(),
        weights="trainable",
    )
    trainer.train()
    model: Any = trainer.model
    latest = callback.manager.run.load()["model"]
    assert set(latest) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("llm.") for name in latest)

    out = callback.export(tmp_path / "best", "best")
    loaded = MiniCPMVLike.from_pretrained(out)
    best = callback.best_step()
    saved_best = callback.manager.run.load(best)["model"]
    for name, tensor in saved_best.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for name, tensor in model.llm.state_dict().items():
        assert torch.equal(loaded.llm.state_dict()[name], tensor)  # frozen part from the base


def test_final_export_loads_with_from_pretrained_and_gives_the_same_outputs(
    tmp_path: Path,
) -> None:
    trainer = make_trainer(tmp_path / "out", max_steps=6, eval_strategy="no")
    callback = attach(trainer, tmp_path / "run", save=cw.on_final(), keep=cw.keep_last(1))
    trainer.train()
    out = callback.export(tmp_path / "final", "latest")
    loaded: Any = MiniCPMVLike.from_pretrained(out)
    loaded.eval()
    model: Any = trainer.model
    model.eval()
    batch = SyntheticImageText(4, seed=9)
    inputs = {
        k: torch.stack([batch[i][k] for i in range(4)]) for k in ("pixel_values", "input_ids")
    }
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_export_of_a_trainer_run_loads_as_trained_with_its_tokenizer(tmp_path: Path) -> None:
    """The checkpoint records the config, the dtype the model trained in and the tokenizer:
    ``ckptwise export RUN OUT`` alone makes a folder that ``from_pretrained`` loads as it was
    trained. Here a bf16 model whose config says nothing of its dtype (so only the record
    knows it), and ``callback.export(..., dtype="fp32")`` for an fp32 folder."""
    # its own config (4 LLM layers, not the config class's 2) and bf16 weights, which its
    # config does not say (.to() leaves config.dtype unset): only the record knows both
    model: Any = build_model()
    model.to(torch.bfloat16)
    # (transformers 5 calls it config.dtype, 4.x config.torch_dtype)
    assert getattr(model.config, "dtype", None) is None
    assert getattr(model.config, "torch_dtype", None) is None
    trainer = CPMTrainer(
        model=model,
        args=make_trainer(tmp_path / "out", max_steps=3, eval_strategy="no", bf16=True).args,
        train_dataset=SyntheticImageText(64, seed=1),
        processing_class=build_tokenizer(),
        data_collator=default_data_collator,
    )
    callback = attach(trainer, tmp_path / "run", save=cw.on_final(), keep=cw.keep_last(1))
    trainer.train()
    trained = {name: t.detach().clone() for name, t in model.state_dict().items()}
    initial = build_model().resampler.query.bfloat16()
    assert not torch.equal(trained["resampler.query"], initial)

    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    for folder, dtype in (
        (out, torch.bfloat16),
        (callback.export(tmp_path / "fp32", "latest", dtype="fp32"), torch.float32),
    ):
        found: Any = MiniCPMVLike.from_pretrained(folder, output_loading_info=True, **AUTO)
        loaded, info = found
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        state = loaded.state_dict()
        assert state.keys() == trained.keys()
        for name, tensor in trained.items():
            assert state[name].dtype == dtype, name
            assert torch.equal(state[name], tensor.to(dtype)), name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("w3 w200 nothing")["input_ids"] == [3, 200, 255]


def test_a_trained_only_run_exports_only_with_the_frozen_weights_of_its_base(
    tmp_path: Path,
) -> None:
    """``weights="trainable"`` never saves the frozen LLM: ``ckptwise export`` refuses to
    write a folder that would load with it newly initialized, and takes it from ``--base``
    (the model the run fine-tuned); ``callback.export`` takes it from the live model."""
    base = tmp_path / "base"
    build_model().save_pretrained(base)  # the model before fine-tuning
    model = build_model()
    trainer = CPMTrainer(
        model=model,
        args=make_trainer(tmp_path / "out", max_steps=3, eval_strategy="no").args,
        train_dataset=SyntheticImageText(64, seed=1),
    )
    callback = attach(
        trainer, tmp_path / "run", save=cw.on_final(), keep=cw.keep_last(1), weights="trainable"
    )
    trainer.train()
    trained = {name: t.detach().clone() for name, t in model.state_dict().items()}
    assert not any(name.startswith("llm.") for name in callback.manager.run.load(3)["model"])

    refused = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "x")])
    assert refused.exit_code == 1
    assert "step 3 holds the trained weights only" in refused.output
    assert "--base MODEL_DIR" in refused.output
    assert not (tmp_path / "x" / "model.safetensors").exists()

    out = tmp_path / "export"
    args = ["export", str(tmp_path / "run"), str(out), "--base", str(base)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for folder in (out, callback.export(tmp_path / "live", "latest")):
        found: Any = MiniCPMVLike.from_pretrained(folder, output_loading_info=True, **AUTO)
        loaded, info = found
        assert not any(info.values()), info  # nothing newly initialized
        state = loaded.state_dict()
        assert state.keys() == trained.keys()
        for name, tensor in trained.items():
            assert torch.equal(state[name], tensor), name


def test_lora_adapter_with_modules_to_save_exports_for_peft(tmp_path: Path) -> None:
    base = build_model()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"]
    )
    model = peft.get_peft_model(base, config)
    trainer = make_trainer(tmp_path / "out", max_steps=8, eval_strategy="no")
    trainer = CPMTrainer(
        model=model, args=trainer.args, train_dataset=SyntheticImageText(64, seed=1)
    )
    callback = attach(
        trainer, tmp_path / "run", save=cw.every(4), keep=cw.keep_all(), weights="trainable"
    )
    trainer.train()
    saved = callback.manager.run.load(8)["model"]
    assert any("lora_A" in name for name in saved)
    assert any("resampler.modules_to_save" in name for name in saved)
    assert not any(".llm." in name and "lora" not in name for name in saved)

    out = callback.export(tmp_path / "adapter", 8)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"], modes
    reloaded = peft.PeftModel.from_pretrained(build_model(), out).eval()
    batch = SyntheticImageText(4, seed=9)
    inputs = {
        k: torch.stack([batch[i][k] for i in range(4)]) for k in ("pixel_values", "input_ids")
    }
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)


def test_the_trainers_fsdp_is_refused_clearly() -> None:
    from types import SimpleNamespace

    trainer: Any = SimpleNamespace(args=SimpleNamespace(world_size=2), is_fsdp_enabled=True)
    with pytest.raises(cw.ConfigError, match=r"does not support the Trainer's FSDP yet"):
        attach(trainer, "unused", save=cw.every(1))
