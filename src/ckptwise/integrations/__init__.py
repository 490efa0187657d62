"""Thin adapters from framework hooks to :class:`~ckptwise.CheckpointManager`.

Each adapter needs its framework, so this package imports none of them; import the one you
use:

- :mod:`ckptwise.integrations.transformers`: a ``TrainerCallback`` for the Hugging Face
  ``Trainer`` (``attach(trainer, "runs/exp1")``), DeepSpeed included;
- :mod:`ckptwise.integrations.lightning`: a Lightning ``Callback``;
- :mod:`ckptwise.integrations.accelerate`: the state of an ``Accelerator`` loop.

:mod:`ckptwise.integrations.common` holds what the adapters share (their manager, the
metric a policy ranks by, the scratch folders they resume through).
"""

__all__: list[str] = []
