"""Accelerate adapter: the state of a prepared training loop, ready for the manager.

A loop on an ``Accelerator`` needs no callback; it needs the right objects in the state::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = accelerate_state(accelerator, model=model, optimizer=optimizer,
                             scheduler=scheduler, data=sampler)
    start = manager.restore(state)
    for step, batch in enumerate(loader, start + 1):
        ...
        sampler.advance(len(batch[0]))           # ResumableSampler(..., auto_advance=False)
        manager.step(step, state, metrics={"loss": loss.item()})

The model is unwrapped (``DistributedDataParallel`` and the like), so checkpoints hold plain
parameter names that load into the bare model; the grad scaler of mixed precision is
included when there is one. Prepared data loaders fetch a batch ahead, so the
:class:`~ckptwise.ResumableSampler` must not count what it yields: advance it after each step.
"""

from __future__ import annotations

from typing import Any

__all__ = ["accelerate_state"]


def accelerate_state(accelerator: Any, **objects: Any) -> dict[str, Any]:
    """A state dict for :class:`~ckptwise.CheckpointManager` from prepared objects.

    Every keyword becomes an entry; a ``model`` is unwrapped first. ``scaler`` is added
    when the accelerator has a grad scaler (fp16).
    """
    state: dict[str, Any] = {}
    for key, value in objects.items():
        state[key] = accelerator.unwrap_model(value) if key == "model" else value
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        state.setdefault("scaler", scaler)
    return state
