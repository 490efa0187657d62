"""What the code blocks of the README and ``docs/`` take as given (a model, a trainer, a
finished run), built small and real for :mod:`test_docs`, which runs every block.

The documents call these from invisible setup blocks (``<!-- invisible-code-block: python
... -->``), so a reader sees the code as they would write it and the test runs it as it is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def tiny_trainer_parts() -> tuple[Any, Any, Any, Any]:
    """``model, training_args, train_dataset, CPMTrainer``: MiniCPM-V's fine-tuning script's
    pieces, at the tiny size (a vision tower, a resampler, a frozen LLM) on the CPU."""
    from minicpmv_tiny import CPMTrainer, SyntheticImageText, build_model
    from transformers import TrainingArguments

    training_args = TrainingArguments(
        output_dir="output",
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return build_model(), training_args, SyntheticImageText(64, seed=1), CPMTrainer


def tiny_loop_parts() -> tuple[
    nn.Module, torch.optim.Optimizer, Any, Callable[[], float], Callable[[], dict[str, float]], int
]:
    """``model, optimizer, sampler, train_step, evaluate, total_steps`` of a small regression
    loop whose data position is a :class:`ckptwise.ResumableSampler`."""
    import ckptwise as cw

    torch.manual_seed(0)
    inputs, targets = torch.randn(512, 16), torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = cw.ResumableSampler(len(inputs), seed=0, auto_advance=False)
    order = iter(sampler)

    def train_step() -> float:
        nonlocal order
        batch = []
        for _ in range(8):
            try:
                batch.append(next(order))
            except StopIteration:
                order = iter(sampler)
                batch.append(next(order))
        sampler.advance(len(batch))
        loss: Any = (model(inputs[batch]) - targets[batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.item())

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {"eval_loss": (model(inputs[:64]) - targets[:64]).pow(2).mean().item()}

    return model, optimizer, sampler, train_step, evaluate, 3000


def a_finished_run(root: str) -> None:
    """A run at ``root`` as a short training leaves it: checkpoints with an ``eval_loss``,
    ranked by the run's own policy."""
    from minicpmv_tiny import build_model

    import ckptwise as cw

    model = build_model()
    random.seed(0)
    with cw.CheckpointManager(
        root,
        save=cw.every(1000) | cw.on_final(),
        keep=cw.keep_last(3) | cw.keep_best(1, "eval_loss"),
        async_save=False,
    ) as manager:
        for step in range(1000, 5001, 1000):
            with torch.no_grad():
                model.resampler.query.add_(0.01)  # what training changes; the LLM stays frozen
            loss = 1.0 / step + random.random() * 1e-4
            manager.step(step, {"model": model}, metrics={"eval_loss": loss}, final=step == 5000)


def point_fsspec_at(options: dict[str, Any]) -> Callable[[], None]:
    """Make ``s3://`` URLs reach the S3-compatible server whose storage ``options`` are given,
    as fsspec's configuration does for a user (no code change in the block); returns what
    undoes it."""
    import fsspec.config

    kept = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {
        **kept,
        "endpoint_url": options["endpoint_url"],
        "key": options["key"],
        "secret": options["secret"],
        "client_kwargs": options["client_kwargs"],
    }

    def undo() -> None:
        fsspec.config.conf["s3"] = kept

    return undo


def repo() -> Path:
    """The repository's root folder."""
    return Path(__file__).resolve().parents[1]


def tiny_dataset_parts() -> tuple[Any, ...]:
    """``model, optimizer, scheduler, dataset, train_step, evaluate, total_steps``: a small
    regression whose ``train_step(batch)`` takes a batch of a ``DataLoader`` over
    ``dataset`` (batches of 8: the steps run three epochs)."""
    torch.manual_seed(0)
    total_steps = 3000
    samples = 8 * total_steps // 3
    dataset = torch.utils.data.TensorDataset(torch.randn(samples, 16), torch.randn(samples, 1))
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.5)

    def train_step(batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss: Any = (model(x) - y).pow(2).mean()  # torch's backward() is untyped
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        detached: torch.Tensor = loss.detach()
        return detached

    def evaluate() -> dict[str, float]:
        x, y = dataset[:256]
        with torch.no_grad():
            return {"eval_loss": (model(x) - y).pow(2).mean().item()}

    return model, optimizer, scheduler, dataset, train_step, evaluate, total_steps


def tiny_lightning_parts() -> tuple[Any, Any, Any]:
    """``model, train_set, val_loader``: a small LightningModule that logs ``val_loss``."""
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss: torch.Tensor = (self.net(x) - y).pow(2).mean()
            self.log("loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", (self.net(x) - y).pow(2).mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(512, 16), torch.randn(512, 1))
    val_set = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64, 1))
    return Regression(), train_set, torch.utils.data.DataLoader(val_set, batch_size=64)
