"""A tiny model and training state built from code (nothing is downloaded), for any test."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Tiny(nn.Module):
    """A two-part model: a frozen ``backbone`` and a trainable ``head``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def make_state(width: int = 32, *, freeze: bool = False, seed: int = 0) -> dict[str, Any]:
    """Model, optimizer and scheduler for ``Tiny``, with the backbone optionally frozen."""
    torch.manual_seed(seed)
    model = Tiny(width)
    if freeze:
        model.backbone.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return {"model": model, "optimizer": opt, "scheduler": sched}


def train_step(state: dict[str, Any], width: int = 32) -> float:
    """One optimizer step on random data; returns the loss."""
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    x = torch.randn(8, width)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.item())
