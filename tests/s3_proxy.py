"""A loopback HTTP proxy in front of ``moto_server`` that misbehaves on request.

It forwards every request to the real server and can, per request, answer S3's
``503 SlowDown`` instead (the first N matching requests, or every one), wait a while first
(throttling), or hold a request until the test lets it go (or drops it, as a dead client's
request is never finished). Every request is logged with the status it got, so tests assert
on the order the store was written in, not on wall time.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

#: Decides whether a rule applies: (method, path) -> bool, the path without the query.
Match = Callable[[str, str], bool]

_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


def matching(method: str | None = None, contains: str = "") -> Match:
    """A :data:`Match` for requests of ``method`` (any when ``None``) whose path holds
    ``contains``."""
    return lambda m, p: (method is None or m == method) and contains in p


@dataclass
class _Hold:
    match: Match
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    drop: bool = False


@dataclass
class Logged:
    """One request the proxy saw: its method, path (query left out) and the answer."""

    method: str
    path: str
    status: int


class S3Proxy:
    """Forwards to ``target`` (``host:port``); see the module docstring."""

    def __init__(self, target: str) -> None:
        self.target = target
        #: seconds every request waits before it is forwarded
        self.delay = 0.0
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._failures: list[list[Any]] = []  # [match, remaining or None for always]
        self._holds: list[_Hold] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def options(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` storage options with the endpoint moved to this proxy."""
        return {**base, "endpoint_url": self.endpoint}

    def fail(self, match: Match, times: int | None = None) -> None:
        """Answer ``503 SlowDown`` to the next ``times`` requests ``match`` accepts (every
        one when ``None``)."""
        with self._lock:
            self._failures.append([match, times])

    def heal(self) -> None:
        """Stop failing requests."""
        with self._lock:
            self._failures.clear()

    def hold(self, match: Match) -> _Hold:
        """Hold every request ``match`` accepts until ``.release`` is set; ``.arrived`` is
        set when one is held. With ``.drop`` set before release, held requests are never
        forwarded: their connection is closed unanswered."""
        hold = _Hold(match)
        with self._lock:
            self._holds.append(hold)
        return hold

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        """The logged requests of ``method`` whose path holds ``contains``, in order."""
        with self._lock:
            return [
                r for r in self.log if (method is None or r.method == method) and contains in r.path
            ]

    def close(self) -> None:
        with self._lock:
            for hold in self._holds:
                hold.release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        path = unquote(urlsplit(handler.path).path)
        body = _read_body(handler)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            holds = [h for h in self._holds if h.match(method, path)]
        for hold in holds:
            hold.arrived.set()
            hold.release.wait(60)
            if hold.drop:
                with self._lock:
                    self.log.append(Logged(method, path, 0))
                handler.close_connection = True
                return
        with self._lock:
            failing = False
            for rule in self._failures:
                if rule[0](method, path) and (rule[1] is None or rule[1] > 0):
                    if rule[1] is not None:
                        rule[1] -= 1
                    failing = True
                    break
        if failing:
            self._answer(
                handler, method, path, 503, [("Content-Type", "application/xml")], _SLOWDOWN
            )
            return
        conn = http.client.HTTPConnection(self.target, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(method, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]
            if method == "HEAD":
                # a HEAD answer has no body but the size of what a GET would send
                kept.append(("Content-Length", response.getheader("Content-Length") or "0"))
                self._answer(handler, method, path, response.status, kept, b"", length=False)
            else:
                self._answer(handler, method, path, response.status, kept, data)
        finally:
            conn.close()

    def _answer(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        path: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        length: bool = True,
    ) -> None:
        with self._lock:
            self.log.append(Logged(method, path, status))
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if body:
            handler.wfile.write(body)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, sent whole or in chunks."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        parts: list[bytes] = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if not size:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


@contextmanager
def s3_proxy(options: dict[str, Any]) -> Iterator[S3Proxy]:
    """A proxy in front of the server the storage ``options`` reach (see
    :func:`s3_server.moto_s3`); use ``proxy.options(options)`` to go through it."""
    target = urlsplit(options["endpoint_url"]).netloc
    proxy = S3Proxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
