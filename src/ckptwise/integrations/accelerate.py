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

On another number of processes than saved the run, ``manager.restore`` puts back the
weights, optimizer and scheduler exactly on every process, and the sampler's position,
which is one for all processes (it moves by the batches of all). With
``DataLoaderConfiguration(split_batches=True)`` every step trains on the same samples
whatever the number of processes, and the losses follow an uninterrupted run on the new
number up to float rounding (the gradients of the parts are summed in another order);
otherwise a step's batch grows or shrinks with the number of processes.
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
