"""torch and numpy, imported on first use, so reading a run's JSON starts fast.

``ckptwise --help``, ``ckptwise ls`` and ``ckptwise du`` read manifests only, yet importing
torch takes seconds. The modules they pass through write::

    if TYPE_CHECKING:
        import torch
    else:
        from ckptwise._lazy import torch

and use ``torch.X`` as before: the first attribute read imports the real module, and every
read returns the real module's current attribute (so a monkeypatch of torch is seen).
Type checkers see the real module.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["LazyModule", "dist", "np", "torch"]


class LazyModule:
    """Stands for the module ``name`` until an attribute of it is read."""

    __slots__ = ("_module_name",)

    def __init__(self, name: str) -> None:
        self._module_name = name

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._module_name)
        if module is None:
            module = importlib.import_module(self._module_name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self._module_name!r}, imported on first use>"


torch = LazyModule("torch")
np = LazyModule("numpy")
dist = LazyModule("torch.distributed")
