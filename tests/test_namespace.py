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
    "ckptwise.read.formats",
    "ckptwise.read.hf_model",  # the model a Trainer checkpoint records, and export's dtypes
    "ckptwise.integrations.transformers.deepspeed",  # `ckptwise export` of a DeepSpeed run
    "ckptwise.jsonvalues",
    "ckptwise.manager",
    "ckptwise.decide.metrics",
    "ckptwise.policy",
    "ckptwise.records",
    "ckptwise.read.run",
    "ckptwise.simulate",
    "ckptwise.snapshot",
}
#: need a framework or an extra that the core does not install
OPTIONAL = ("ckptwise.integrations.", "ckptwise.cli")

STORE = "ckptwise.store"
#: the modules outside ``store/`` that may import :mod:`ckptwise.store` (the package, and
#: only what its ``__all__`` offers): the store is private to the writing manager, the
#: read-only run and the machinery under them. The command line and the adapters are not
#: here: they go through ``Run`` and ``CheckpointManager``.
STORE_USERS = {
    "ckptwise.read.archive",
    "ckptwise.distributed.confirm",
    "ckptwise.config.options",
    "ckptwise.distributed.restore",
    "ckptwise.distributed.save",
    "ckptwise.distributed.shards",
    "ckptwise.manager",
    "ckptwise.save.pipeline",
    "ckptwise.read.restoring",
    "ckptwise.read.run",
    "ckptwise.save.upkeep",
    "ckptwise.read.usage",
}
#: private modules every package may use: ``_lazy`` imports torch on first use, in every
#: layer (see its docstring); it is no API
SHARED_PRIVATE = {"ckptwise._lazy"}


def _files() -> set[str]:
    """Every module the source tree holds, named from its ``.py`` file."""
    names = set()
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(("ckptwise", *parts)))
    return names


def _walked() -> set[str]:
    """Every module ``pkgutil`` finds from the package (a folder without ``__init__.py``
    and the modules in it would be missing)."""
    found = {info.name for info in pkgutil.walk_packages([str(SRC)], prefix="ckptwise.")}
    return {"ckptwise", *found}


def _modules() -> list[str]:
    return sorted(_walked())


def _source(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = SRC / relative / "__init__.py"
    return package if package.exists() else SRC / relative.with_suffix(".py")


def _is_module(name: str) -> bool:
    return name.split(".")[0] == "ckptwise" and _source(name).exists()


def _package(name: str) -> str:
    """The package a module belongs to (a package is its own)."""
    return name if _source(name).name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from ckptwise... import`` in ``name``'s source; a
    name that is itself a module (``from ckptwise.store import layout``) comes as that
    module, ``(ckptwise.store.layout, [])``."""
    tree = ast.parse(_source(name).read_text())
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name} has a relative import; write it absolute"
            if node.module and node.module.split(".")[0] == "ckptwise":
                names = []
                for alias in node.names:
                    if _is_module(f"{node.module}.{alias.name}"):
                        out.append((f"{node.module}.{alias.name}", []))
                    else:
                        names.append(alias.name)
                out.append((node.module, names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptwise":
                    out.append((alias.name, []))
    return out


def _is_store(module: str) -> bool:
    return module == STORE or module.startswith(STORE + ".")


def _private_part(module: str) -> str | None:
    """The part of a dotted module name that is private (``_common``), if any."""
    return next((p for p in module.split(".") if p.startswith("_") and p[:2] != "__"), None)


MODULES = _modules()
#: importing ``__main__`` runs the command line
IMPORTABLE = [m for m in MODULES if not m.endswith("__main__")]


def test_the_walk_finds_every_source_file() -> None:
    """A folder without ``__init__.py`` hides its modules from ``pkgutil`` and so from every
    check below (``integrations/`` once did)."""
    assert _walked() == _files()


@pytest.mark.parametrize("name", IMPORTABLE)
def test_every_module_declares_what_it_exports(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not name.startswith(OPTIONAL) or (exc.name or "").startswith("ckptwise"):
            raise
        pytest.skip(f"{name} needs {exc.name}, which is not installed")
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
    """A private name, or a private module, belongs to its package: neither its parent nor
    its subpackages reach it."""
    for module, names in _imports(name):
        private_module = _private_part(module)
        if private_module is not None and module not in SHARED_PRIVATE:
            owner = module[: module.index("." + private_module)]
            assert owner == _package(name), f"{name} imports private module {module}"
        if _package(module) == _package(name):
            continue
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private {private} from {module}"


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(OPTIONAL)])
def test_cli_and_adapters_use_only_the_public_objects(name: str) -> None:
    own = "ckptwise.cli" if name.startswith("ckptwise.cli") else "ckptwise.integrations"
    for module, _ in _imports(name):
        if module.startswith(own):
            continue
        assert module in PUBLIC, f"{name} imports {module}, which is not public API"


@pytest.mark.parametrize("name", [m for m in MODULES if not _is_store(m)])
def test_only_the_store_users_import_the_store(name: str) -> None:
    for module, _ in _imports(name):
        if not _is_store(module):
            continue
        assert name in STORE_USERS, (
            f"{name} imports {module}: the store is private to the manager and the run; "
            "go through CheckpointManager or Run (or add a method to them)"
        )
        assert module == STORE, (
            f"{name} imports {module}: outside store/, import only what ckptwise.store "
            "offers in its __all__"
        )


def test_the_store_allow_list_holds_no_stale_entries() -> None:
    """Each entry still stands, so a module that stops using the store leaves the list."""
    for name in STORE_USERS:
        assert any(_is_store(m) for m, _ in _imports(name)), (
            f"{name} no longer imports the store: remove it from STORE_USERS"
        )


def test_the_store_is_not_exported() -> None:
    assert not [n for n in ckptwise.__all__ if "Store" in n or n == "store"]
