"""Several processes, one remote run, a local cache each: a manifest goes up only once every
rank's objects of that checkpoint are up.

With ``cache=`` in a job of several ranks (one node or many), each rank writes its objects
into a cache folder of its own on its node's disk and uploads them in the background; rank 0
also writes the manifest. A reader of the remote must never list a checkpoint whose objects
are not all there, so rank 0's manifest waits (parked, see :mod:`~ckptwise.store.uploads`)
until every rank has confirmed, on the job's own channel, that the objects it held unsent
when the checkpoint committed are uploaded. Nothing is inferred from listing the bucket.

:class:`UploadConfirmer` runs those confirmations on a thread and a ``gloo`` group of its
own, one checkpoint at a time in commit order (every rank committed the same checkpoints in
the same order). For each checkpoint every rank waits up to half a second for its uploads,
then all agree in one small collective: all done (rank 0 releases the manifest), some still
uploading (another round), or one rank's object was dropped as damaged (the checkpoint stays
in rank 0's cache only, with a warning; the next save writes the object again). A rank that
pauses never holds the others in a collective for longer than one round.

A job restarted on the same cache folders confirms first what each rank's cache still held
unsent (the *recovery* round); rank 0 then asks the remote once for the objects its waiting
manifests name, the one time it looks, since the processes that uploaded them are gone.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from datetime import timedelta

from ckptwise.distributed.ranks import Ranks
from ckptwise.errors import CheckpointError, StorageError
from ckptwise.store import TensorEntry, TieredBackend

__all__ = ["UploadConfirmer"]

log = logging.getLogger("ckptwise")

#: how long a rank waits for its uploads before each round of agreement
POLL_SECONDS = 0.5

_DONE, _WAITING, _DROPPED, _FAILED = 0, 1, 2, 3


class UploadConfirmer:
    """Confirms each committed checkpoint's uploads across ``ranks`` (see the module
    docstring); every rank creates it at the same point, after its backend started
    uploading. ``backend`` is this rank's cached backend."""

    def __init__(
        self,
        ranks: Ranks,
        backend: TieredBackend,
        *,
        poll: float = POLL_SECONDS,
        exit_timeout: timedelta | None = None,
    ) -> None:
        self._ranks = ranks.channel()
        self._backend = backend
        self._poll = poll
        #: how long an interpreter exiting without :meth:`close` waits for the confirmations
        self.exit_timeout = exit_timeout
        self._cond = threading.Condition()
        #: checkpoints to confirm, in commit order (``None``: what a restart found unsent),
        #: each with the objects this rank held unsent when it committed
        self._queue: deque[tuple[int | None, set[str]]] = deque()
        self._give_up = False
        self._closing = False
        self._stopped = False
        #: the failure that stopped the confirmations (a rank died)
        self.error: CheckpointError | None = None
        self._thread = threading.Thread(target=self._work, name="ckptwise-confirm", daemon=True)
        self._queue.append((None, backend.unsent_objects()))
        self._thread.start()
        _register(self)

    def committed(self, step: int, part: Iterable[TensorEntry] = ()) -> None:
        """Confirm ``step``'s uploads: call on every rank once it committed, with the
        entries of this rank's part. An object of the part that this rank dropped as
        damaged (after the save had planned to reuse it) counts as never sent: the
        checkpoint then stays in rank 0's cache, never listed remotely without it."""
        unsent = self._backend.unsent_objects() | self._backend.dropped_of(part)
        with self._cond:
            self._queue.append((step, unsent))
            self._cond.notify_all()

    def drain(self, timeout: timedelta | None = None) -> None:
        """Wait until every checkpoint committed so far is confirmed on every rank (each
        rank waits for its own view of the same confirmations; the confirming goes on
        after a timeout).

        Raises:
            StorageError: ``timeout`` passed first (the confirmations go on).
            CheckpointError: the confirmations stopped (a rank died): what this rank knows.
        """
        self._wait(timeout, give_up=False)

    def _wait(self, timeout: timedelta | None, *, give_up: bool) -> None:
        """:meth:`drain`; with ``give_up``, once ``timeout`` passed the ranks stop
        confirming together (what is left stays in the caches, whole, for a restart on
        them) instead of raising."""
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._cond:
            if self._queue and not self._stopped:
                log.info(
                    "waiting for every rank's uploads of %d checkpoint(s) to %s",
                    sum(step is not None for step, _ in self._queue),
                    self._backend.url,
                )
            while self._queue and not self._stopped:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if not give_up:
                        raise StorageError(
                            f"the uploads to {self._backend.url} were not all confirmed within "
                            f"{timeout}: {len(self._queue)} checkpoint(s) still wait for some "
                            "rank's objects (they go on uploading; call flush_uploads() again "
                            "to wait longer)"
                        )
                    self._give_up = True
                    self._cond.notify_all()
                    left = None
                    deadline = None  # now wait for the ranks to stop together
                self._cond.wait(left)
            if self.error is not None:
                raise self.error

    def close(self, timeout: timedelta | None = None) -> None:
        """Wait as :meth:`drain` does, then stop the thread and destroy the group; every rank
        calls it at the same point. After ``timeout`` the ranks stop confirming together
        (what is left stays in the caches, whole, for a restart on them). Safe to call
        twice."""
        try:
            if not self._stopped:
                self._wait(timeout, give_up=True)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
            self._ranks.close()
            _live.discard(self)

    # -- the thread ------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    step, unsent = self._queue[0]
                if not self._confirm(step, unsent):
                    return
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
        except CheckpointError as exc:
            log.warning(
                "confirming uploads stopped (%s); the checkpoints not confirmed stay whole in "
                "the ranks' caches, and a job restarted on them uploads them",
                exc,
            )
            with self._cond:
                self.error = exc
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _confirm(self, step: int | None, unsent: set[str]) -> bool:
        """Rounds of agreement on one checkpoint until every rank is done; ``False`` when
        the ranks gave up together."""
        while True:
            sent = self._backend.wait_sent(unsent, self._poll)
            fatal = self._backend.fatal_error
            state = _state(sent, fatal)
            with self._cond:
                give_up = int(self._give_up)
            worst, quit_ = self._ranks.max_flags([state, give_up])
            if quit_:
                with self._cond:
                    left = len(self._queue)
                    self._queue.clear()
                log.warning(
                    "stopped waiting for the uploads of %d checkpoint(s): they stay whole in "
                    "the ranks' caches, and a job restarted on them uploads them",
                    left,
                )
                return False
            if worst == _FAILED:  # every rank stops: nothing will be confirmed any more
                raise StorageError(
                    f"a rank's uploads to {self._backend.url} stopped for good "
                    f"({fatal or 'on another rank'}); the checkpoints not confirmed stay "
                    "whole in the ranks' caches"
                )
            if worst == _WAITING:
                continue
            if self._ranks.coordinator:
                self._release(step, dropped=worst == _DROPPED)
            return True

    def _release(self, step: int | None, *, dropped: bool) -> None:
        """On rank 0: let the checkpoint's manifest go up (or say why it does not)."""
        if step is None:
            self._backend.recheck_parked()
            return
        if dropped:
            log.warning(
                "checkpoint %d stays in rank 0's cache only: a rank dropped one of its objects "
                "as damaged before uploading it (the next save writes it again)",
                step,
            )
            return
        self._backend.confirm_step(step)


def _state(sent: bool | None, fatal: CheckpointError | None) -> int:
    """This rank's word in a round: its uploader stopped for good, an object dropped as
    damaged (``sent`` is ``None``), still uploading, or done."""
    if fatal is not None:
        return _FAILED
    if sent is None:
        return _DROPPED
    return _DONE if sent else _WAITING


_live: weakref.WeakSet[UploadConfirmer] = weakref.WeakSet()
_hooked = False
_hook_lock = threading.Lock()


def _register(confirmer: UploadConfirmer) -> None:
    """Finish ``confirmer``'s work at exit unless it was closed. The hook is registered
    after the cached backend's (atexit runs the last registered first), so the manifests
    it releases are still uploaded by the backend's drain."""
    global _hooked
    _live.add(confirmer)
    with _hook_lock:
        if not _hooked:
            atexit.register(_drain_at_exit)
            _hooked = True


def _drain_at_exit() -> None:
    """Finish the confirmations of managers the program did not close."""
    for confirmer in list(_live):
        try:
            confirmer._wait(confirmer.exit_timeout, give_up=True)
        except CheckpointError as exc:
            log.warning("exiting with uploads unconfirmed: %s", exc)
