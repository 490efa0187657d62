"""Shared fixtures; the tiny model and state they use live in :mod:`tiny_state`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptwise as cw
from s3_proxy import S3Proxy, s3_proxy
from s3_server import moto_s3


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Put ``os.environ`` back after each test.

    Libraries write to it as a side effect: transformers 4.x's ``TrainingArguments(bf16=True)``
    sets ``ACCELERATE_MIXED_PRECISION``, which would make every later ``Trainer`` in the
    process wrap its model's ``forward`` in bf16 autocast."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def manager(run_dir: Path) -> Iterator[cw.CheckpointManager]:
    with cw.CheckpointManager(run_dir, save=cw.every(1), keep=cw.keep_all()) as m:
        yield m


@pytest.fixture(scope="module")
def s3(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback, one per test module, with the bucket named by the
    module's ``BUCKET``; yields the storage options that reach it."""
    bucket = getattr(request.module, "BUCKET", None)
    if not isinstance(bucket, str):
        raise TypeError(f"{request.module.__name__} uses the s3 fixture: give it a BUCKET")
    with moto_s3(bucket) as options:
        yield options


@pytest.fixture
def proxy(s3: dict[str, Any]) -> Iterator[S3Proxy]:
    """The loopback proxy of :mod:`s3_proxy` in front of the module's :func:`s3` server."""
    with s3_proxy(s3) as proxy:
        yield proxy
