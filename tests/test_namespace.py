"""The package's namespace: curated ``__all__`` lists, and no layer reaching into another.

In the spirit of httpx's ``test_exported_members.py``: every module says what it exports
and exports what it defines; no module imports another package's private names; the
command line and the framework adapters use only the public objects (the writing
``CheckpointManager`` and the read-only ``Run``), never the store.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import ckptwise

SRC = Path(ckptwise.__file__).parent
#: modules the command line and the framework adapters may import (besides their own package)
PUBLIC = {
    "ckptwise",
    "ckptwise.config",
    "ckptwise.data",
    "ckptwise.errors",
    "ckptwise.formats",
    "ckptwise.integrations.transformers.deepspeed",  # `ckptwise export` of a DeepSpeed run
    "ckptwise.manager",
    "ckptwise.metrics",
    "ckptwise.policy",
    "ckptwise.records",
    "ckptwise.run",
    "ckptwise.simulate",
    "ckptwise.snapshot",
}
#: need a framework or an extra that the core does not install
OPTIONAL = ("ckptwise.integrations.", "ckptwise.cli")


def _modules() -> list[str]:
    names = ["ckptwise"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="ckptwise."):
        if not info.name.endswith("__main__"):  # importing it runs the command line
            names.append(info.name)
    return sorted(names)


def _source(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = SRC / relative / "__init__.py"
    return package if package.exists() else SRC / relative.with_suffix(".py")


def _package(name: str) -> str:
    """The package a module belongs to (a package is its own)."""
    return name if _source(name).name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from ckptwise... import`` in ``name``'s source."""
    tree = ast.parse(_source(name).read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "ckptwise":
                out.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptwise":
                    out.append((alias.name, []))
    return out


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_what_it_exports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__"
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ names {member!r}, which is missing"
    for member, value in vars(module).items():
        defined_here = getattr(value, "__module__", None) == name
        if (
            defined_here
            and not member.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
        ):
            assert member in exported, (
                f"{name} defines public {member!r} but leaves it out of __all__"
            )


@pytest.mark.parametrize("name", MODULES)
def test_no_module_imports_private_names_of_another_package(name: str) -> None:
    for module, names in _imports(name):
        if _package(module) == _package(name) or module.startswith(_package(name) + "."):
            continue
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private {private} from {module}"


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(OPTIONAL)])
def test_cli_and_adapters_use_only_the_public_objects(name: str) -> None:
    own = "ckptwise.cli" if name.startswith("ckptwise.cli") else _package(name)
    for module, _ in _imports(name):
        if module.startswith(own):
            continue
        assert module in PUBLIC, f"{name} imports {module}, which is not public API"


def test_the_store_is_not_exported() -> None:
    assert not [n for n in ckptwise.__all__ if "Store" in n or n == "store"]
