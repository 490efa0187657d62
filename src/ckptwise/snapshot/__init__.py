"""The state, taken: a training state as named tensors plus a JSON tree and back
(:mod:`~ckptwise.snapshot.capture`), whether a state fits a checkpoint
(:mod:`~ckptwise.snapshot.mismatch`), and the private copies a background save reads
(:mod:`~ckptwise.snapshot.copying`).

The names below are what the rest of ckptwise and its adapters use; nothing is pickled.
"""

from ckptwise.snapshot.capture import (
    RNG_KEY,
    ModelWeights,
    RngState,
    Snapshot,
    apply,
    capture,
    check_fits,
    fit_problems,
    misfit_message,
    rebuild,
    tensor_names,
)

__all__ = [
    "RNG_KEY",
    "ModelWeights",
    "RngState",
    "Snapshot",
    "apply",
    "capture",
    "check_fits",
    "fit_problems",
    "misfit_message",
    "rebuild",
    "tensor_names",
]
