"""Which remote errors are retried, how patiently, and what is said when retries run out."""

from __future__ import annotations

import errno
from datetime import timedelta

import pytest

from ckptwise.errors import CheckpointNotFoundError, ConfigError, StorageError
from ckptwise.store.retry import RetryPolicy, is_transient, retrying


class ClientError(Exception):
    """Shaped like botocore's: the answer's code and status in ``response``."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's: a connection that could not be made."""


def _wrapped(cause: BaseException, exc: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs's SlowDown
        (OSError(errno.EREMOTEIO, "We encountered an internal error."), True),  # 500
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (EndpointConnectionError("Could not connect"), True),
        (ClientError("SlowDown", 503), True),
        (ClientError("Throttling", 400), True),
        (ClientError("Whatever", 502), True),
        (_wrapped(ClientError("BadGateway", 502), OSError(errno.EIO, "?")), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (FileExistsError("conditional write lost"), False),
        (ClientError("NoSuchBucket", 404), False),
        (_wrapped(ClientError("AccessDenied", 403), OSError(errno.EIO, "?")), False),
        (OSError(errno.EIO, "unknown"), False),
        (ValueError("bad"), False),
        (CheckpointNotFoundError("ours"), False),
    ],
)
def test_only_failures_that_pass_are_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_retrying_repeats_transient_failures_with_growing_waits() -> None:
    waits: list[float] = []
    failures: list[BaseException] = [TimeoutError(), OSError(errno.EBUSY, "slow down")]

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    policy = RetryPolicy(attempts=3, first_delay=timedelta(seconds=1))
    assert (
        retrying(call, policy=policy, action="read", where="s3://b/r/x", sleep=waits.append)
        == "done"
    )
    assert len(waits) == 2
    assert 0.5 <= waits[0] <= 1.0
    assert 1.0 <= waits[1] <= 2.0


def test_retrying_gives_up_naming_the_file_the_attempts_and_the_fix() -> None:
    def call() -> None:
        raise OSError(errno.EBUSY, "Please reduce your request rate.")

    policy = RetryPolicy(attempts=2, first_delay=timedelta(0))
    with pytest.raises(StorageError) as info:
        retrying(
            call, policy=policy, action="write", where="s3://b/r/objects/x", sleep=lambda s: None
        )
    message = str(info.value)
    assert "could not write s3://b/r/objects/x: gave up after 2 attempt(s)" in message
    assert "RetryPolicy" in message
    assert isinstance(info.value.__cause__, OSError)


def test_a_permanent_failure_is_raised_at_once() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        retrying(call, policy=RetryPolicy(), action="write", where="x", sleep=lambda s: None)
    assert calls == 1


def test_the_waits_are_capped() -> None:
    policy = RetryPolicy(first_delay=timedelta(seconds=1), max_delay=timedelta(seconds=4))
    assert all(2.0 <= policy.delay(n) <= 4.0 for n in range(3, 30))


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"attempts": True}, {"first_delay": timedelta(seconds=-1)}, {"max_delay": 3}],
)
def test_a_bad_policy_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
