"""Bounded retries with exponential backoff for remote stores.

A remote store fails now and then in ways that pass: S3 answers ``503 SlowDown`` when a
prefix is written too fast, a server errs with a 5xx, a connection is reset or times out.
:func:`retrying` repeats such a call a bounded number of times, waiting longer each time
(doubling from :attr:`RetryPolicy.first_delay` up to :attr:`RetryPolicy.max_delay`, each wait
drawn between half and all of that so that many clients do not retry in step). Any other
error (a missing file, a refused permission, a bad request) is raised at once: repeating it
cannot help.

These retries sit above those of the client libraries (botocore retries 5xx answers a few
times itself, s3fs a ``SlowDown``): an error reaches them only once those gave up. After
the last attempt the error is a :class:`~ckptwise.errors.StorageError` naming the file, the
attempts and what to do. Messages carry the library's words and the run's URL, never the
storage options (credentials stay in them, the environment or fsspec's configuration).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from ckptwise.errors import CheckpointError, ConfigError, StorageError

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "is_transient", "retrying"]

log = logging.getLogger("ckptwise")

T = TypeVar("T")

#: errno values of failures that pass: s3fs maps 503 SlowDown, ServiceUnavailable and 409
#: OperationAborted to EBUSY and 500 InternalError to EREMOTEIO
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EREMOTEIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
    }
)
#: S3 error codes that mean "later": throttling and server-side failures
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
    }
)
#: client-library exception classes (by name, so no library must be imported) that are a
#: connection lost, refused or timed out, or a response cut short
_TRANSIENT_CLASSES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
        "ResponseStreamingError",
        "ResponseParserError",
        "IncompleteReadError",
        "IncompleteRead",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerTimeoutError",
        "FSTimeoutError",
    }
)
#: draws the jitter of the waits
_jitter = random.Random()
#: errors that never pass, whatever their cause says
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


def _one_transient(exc: BaseException) -> bool | None:
    """Whether ``exc`` itself says the failure passes: True, False, or None (it cannot tell)."""
    if isinstance(exc, (CheckpointError, *_PERMANENT)):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        code = error.get("Code") if isinstance(error, dict) else None
        server_side = isinstance(status, int) and (status >= 500 or status == 429)
        return code in _TRANSIENT_CODES or server_side
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None  # e.g. s3fs's EIO for an error code it does not know: ask the cause


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that may pass if the call is repeated.

    The exception and its causes are looked at in turn (s3fs raises an ``OSError`` whose
    cause is botocore's error): the first that can tell decides.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _one_transient(current)
        if verdict is not None:
            return verdict
        current = current.__cause__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing remote call is repeated.

    ``attempts`` counts every try, the first included (1 never repeats). The wait before
    try ``n + 1`` is drawn between half and all of ``first_delay * 2**(n - 1)``, capped at
    ``max_delay``. The default tries 6 times over about 30 seconds, on top of the client
    library's own retries.

    Raises:
        ConfigError: ``attempts`` below 1, or a negative delay.

    >>> RetryPolicy(attempts=3, first_delay=timedelta(milliseconds=100)).attempts
    3
    """

    attempts: int = 6
    first_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(seconds=20)

    def __post_init__(self) -> None:
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or self.attempts < 1
        ):
            raise ConfigError(
                f"RetryPolicy(attempts={self.attempts!r}): give the number of tries, at least "
                "1 (1 never repeats a failed call)"
            )
        for name in ("first_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ConfigError(
                    f"RetryPolicy({name}={value!r}): give a non-negative timedelta, e.g. "
                    "timedelta(seconds=1)"
                )

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed try (1 for the first)."""
        ceiling = min(
            self.max_delay.total_seconds(),
            self.first_delay.total_seconds() * 2.0 ** max(failures - 1, 0),
        )
        return ceiling * (0.5 + 0.5 * (rng or _jitter).random())


#: What remote backends use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()


def retrying(
    call: Callable[[], T],
    *,
    policy: RetryPolicy,
    action: str,
    where: str,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()``, repeated on transient errors as ``policy`` says.

    ``action`` and ``where`` name what is done to which file (``"write"``,
    ``"s3://bucket/run/objects/ab/ab12..."``) for the log and the final error. A
    non-transient error propagates unchanged, for the caller to wrap.

    Raises:
        StorageError: every attempt failed with a transient error; chained to the last.
    """
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                elapsed = time.monotonic() - started
                raise StorageError(
                    f"could not {action} {where}: gave up after {attempt} attempt(s) over "
                    f"{elapsed:.1f} s, each failing with an error that usually passes "
                    f"(throttling, a server error or a lost connection); the last: "
                    f"{_describe(exc)}. Check the network and the endpoint and try again; "
                    "to wait longer, pass a RetryPolicy with more attempts or a longer "
                    "max_delay"
                ) from exc
            wait = policy.delay(attempt)
            log.info(
                "could not %s %s (attempt %d of %d: %s); retrying in %.2f s",
                action,
                where,
                attempt,
                policy.attempts,
                _describe(exc),
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _describe(exc: BaseException) -> str:
    """The error's class and words, shortened: what the log and messages show of it."""
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text[:300]}"
