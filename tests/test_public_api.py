"""The public surface: a curated ``__all__`` whose every entry exists and is documented."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import ckptwise as cw


def test_all_is_sorted_unique_and_resolvable() -> None:
    names = [n for n in cw.__all__ if n != "__version__"]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(cw, name), name


def test_every_public_callable_has_a_docstring() -> None:
    for name in cw.__all__:
        obj = getattr(cw, name)
        if callable(obj):
            assert inspect.getdoc(obj), name


def test_errors_inherit_the_matching_builtins() -> None:
    assert issubclass(cw.ConfigError, ValueError)
    assert issubclass(cw.CorruptCheckpointError, ValueError)
    assert issubclass(cw.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(cw.StorageError, OSError)
    assert issubclass(cw.RunLockedError, RuntimeError)
    for name in cw.__all__:
        obj = getattr(cw, name)
        if inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, cw.CheckpointError), name


def test_the_type_checkers_see_exactly_the_lazy_names() -> None:
    """``ckptwise/__init__.py`` lists each name twice, for the lazy import and for type
    checkers (``from module import name as name``): the two lists agree."""
    tree = ast.parse(Path(cw.__file__).read_text())
    checked = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    seen: dict[str, str] = {}
    for node in checked.body:
        assert isinstance(node, ast.ImportFrom), ast.unparse(node)
        assert node.module is not None
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported (write 'as')"
            seen[alias.name] = node.module
    assert seen == cw._WHERE


def test_the_root_is_for_training_scripts() -> None:
    """What a policy of your own reads and returns lives in :mod:`ckptwise.policy` only."""
    from ckptwise import policy

    for name in (
        "TrainingState",
        "RetentionContext",
        "RetentionPlan",
        "plan_retention",
        "SaveMark",
        "MetricStats",
        "Decision",
        "Request",
        "Variant",
        "daly_interval",
    ):
        assert name not in cw.__all__, name
        assert not hasattr(cw, name), name
        assert name in policy.__all__, name
    for name in ("Trigger", "RetentionPolicy", "ContentPolicy", "every", "keep_best", "full"):
        assert getattr(cw, name) is getattr(policy, name), name


def test_the_classes_the_factories_return_are_exported_by_policy() -> None:
    from ckptwise import policy

    for name in cw._EXPORTS["ckptwise.policy"]:
        obj = getattr(cw, name)
        if inspect.isfunction(obj):
            returned = typing.get_type_hints(obj)["return"]
            assert getattr(policy, returned.__name__) is returned, (name, returned)
            assert returned.__name__ in policy.__all__, (name, returned)
