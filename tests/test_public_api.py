"""The public surface: a curated ``__all__`` whose every entry exists and is documented."""

from __future__ import annotations

import inspect

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
