"""Group commit: many writers, one SQLite transaction, nobody told "done" before it is durable.

Every write is a *request*: a function run inside the shared transaction. Requests queue up; one
thread at a time is the *leader*: it takes everything queued, runs each request in its own
savepoint (a request that raises fails alone), commits once, then resolves every handle. A caller
of ``run`` becomes the leader itself when no commit is in progress, so a lone write commits at
once without a thread hand-off; ``submit`` never blocks: a background flusher thread leads for it.
Consecutive ``Batchable`` requests of one kind run as a single call (e.g. one multi-row INSERT
for many appends), which is where group commit gains over one statement per caller.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from journal.errors import JournalClosed, translate_sqlite_error

Request = Callable[[sqlite3.Connection], Any]


class Batchable:
    """A request that may run together with the consecutive queued requests of the same kind.

    ``run_all(conn, payloads)`` does the work of several requests at once and returns one
    result per payload; it is all or nothing (if it raises, each request is redone alone).
    Requests are of the same kind when their ``run_all`` are equal (e.g. one bound method).
    """

    __slots__ = ("run_all", "payload")

    def __init__(self, run_all: Callable[[sqlite3.Connection, list[Any]], list[Any]],
                 payload: Any):
        self.run_all = run_all
        self.payload = payload

    def __call__(self, conn: sqlite3.Connection) -> Any:
        return self.run_all(conn, [self.payload])[0]


class Handle:
    """The promise of one request: ``wait()`` returns its result once it is durable.

    Handles are cheap (no lock or event of their own): waiters sleep on their committer's
    condition, which is notified once per commit.
    """

    __slots__ = ("_committer", "_done", "_result", "_error", "_callbacks")

    def __init__(self, committer: GroupCommitter):
        self._committer = committer
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Handle], None]] | None = None

    def done(self) -> bool:
        """True once the request is committed or has failed."""
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        """Block until durable; return the request's result or raise its error."""
        if not self._done and not self._committer._wait_for(self, timeout):
            raise TimeoutError("journal write not durable yet")
        if self._error is not None:
            raise self._error
        return self._result

    def add_done_callback(self, callback: Callable[[Handle], None]) -> None:
        """Call ``callback(handle)`` once done (at once if already done, else on the leader)."""
        with self._committer._lock:
            if not self._done:
                self._callbacks = [*(self._callbacks or ()), callback]
                return
        callback(self)

    def exception(self) -> BaseException | None:
        """The request's error, or None (only meaningful once done)."""
        return self._error


class GroupCommitter:
    """Coalesces concurrent write requests on one connection into shared transactions.

    ``on_batch(size, seconds)`` is called after each successful commit. Requests may change
    their owner's in-memory state; ``snapshot()`` captures it and ``restore(token)`` puts it
    back whenever the database work it mirrored is rolled back.

    The flusher thread survives what it runs for others: a done-callback that raises is
    reported to ``on_failure(error, fatal=False)`` and the flusher goes on. An exception of its
    own ends it: queued and later requests fail with ``JournalClosed`` naming it, and
    ``on_failure(error, fatal=True)`` tells the owner, who cannot write any more.
    """

    def __init__(self, connection: sqlite3.Connection,
                 snapshot: Callable[[], Any], restore: Callable[[Any], None],
                 on_batch: Callable[[int, float], None] | None = None,
                 on_failure: Callable[[BaseException, bool], None] | None = None):
        self._conn = connection
        self._snapshot = snapshot
        self._restore = restore
        self._on_batch = on_batch
        self._on_failure = on_failure or (lambda error, fatal: None)
        self.failure: BaseException | None = None  # what ended the flusher thread
        self._commit_started: float | None = None  # monotonic start of the running commit
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # run() callers waiting for leadership
        self._work = threading.Condition(self._lock)  # the flusher waiting for work
        self._durable = threading.Condition(self._lock)  # handle waiters, notified per commit
        self._queue: list[tuple[Request, Handle]] = []
        self._leading = False
        self._wake_pending = False  # handles resolved, their sleeping waiters not woken yet
        self._flusher_idle = False  # waiting on self._work
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_forever, name="journal-flusher",
                                         daemon=True)
        self._flusher.start()

    def submit(self, request: Request) -> Handle:
        """Queue ``request`` and return at once; the flusher thread commits it."""
        handle = Handle(self)
        with self._lock:
            if self._closed:
                raise JournalClosed(self._closed_reason())
            self._queue.append((request, handle))
            if self._flusher_idle:
                self._work.notify()
        return handle

    def run(self, request: Request) -> Any:
        """Run ``request`` durably and return its result, leading a commit if nobody is."""
        handle = Handle(self)
        with self._cond:
            if self._closed:
                raise JournalClosed(self._closed_reason())
            self._queue.append((request, handle))
        while not handle.done():
            with self._cond:
                while self._leading and not handle.done():
                    self._cond.wait()
                if handle.done():
                    break
                batch = self._take_leadership()
            self._commit(batch)
        return handle.wait()

    def close(self) -> None:
        """Commit what is queued, then stop the flusher thread."""
        with self._cond:
            self._closed = True
            self._work.notify()
        self._flusher.join()

    def _take_leadership(self) -> list[tuple[Request, Handle]]:
        # caller holds self._cond
        self._leading = True
        batch, self._queue = self._queue, []
        return batch

    def _closed_reason(self) -> str:
        if self.failure is not None:
            return f"the journal's flusher thread failed ({self.failure!r}); restart the process"
        return "the journal is closed"

    @property
    def flusher_alive(self) -> bool:
        """False once the flusher thread ended other than by ``close``."""
        return self.failure is None

    def commit_running_for(self) -> float:
        """Seconds the running commit has taken so far (0 when none runs)."""
        started = self._commit_started
        return 0.0 if started is None else time.monotonic() - started

    def _flush_forever(self) -> None:
        try:
            self._flush_until_closed()
        except BaseException as exc:  # a bug of ours: nothing can be committed any more
            with self._cond:
                self.failure, self._closed = exc, True
                queued, self._queue = self._queue, []
            error = JournalClosed(self._closed_reason())
            self._resolve([(handle, None, error) for _, handle in queued], wake_now=True)
            self._on_failure(exc, True)

    def _flush_until_closed(self) -> None:
        while True:
            with self._cond:
                if self._leading or not self._queue:
                    self._wake_waiters()  # nothing to begin: wake them now
                while (self._leading or not self._queue) and not (self._closed and not self._queue
                                                                   and not self._leading):
                    self._flusher_idle = True
                    self._work.wait()
                    self._flusher_idle = False
                if self._closed and not self._queue:
                    return
                batch = self._take_leadership()
            self._commit(batch, wake_now=False)

    def _commit(self, batch: list[tuple[Request, Handle]], wake_now: bool = True) -> None:
        """Run ``batch`` in one transaction and resolve its handles.

        With ``wake_now`` false (the flusher), threads sleeping on these handles are woken only
        once the next transaction has begun (or nothing follows): woken writers then run while
        that transaction's statements execute outside the GIL, instead of delaying its start.
        """
        started = time.perf_counter()
        self._commit_started = time.monotonic()
        before = self._snapshot()
        try:
            try:
                results = self._run_batch(batch, isolate=False)
            except _RequestFailed:
                # Fast path failed: redo the batch with one savepoint per request.
                self._rollback(before)
                results = self._run_batch(batch, isolate=True)
        except sqlite3.Error as exc:
            error = translate_sqlite_error(exc)
            self._rollback(before)
            results = [(handle, None, error) for _, handle in batch]
        else:
            if self._on_batch and batch:
                self._on_batch(len(batch), time.perf_counter() - started)
        finally:
            self._commit_started = None
            with self._cond:
                self._leading = False
                self._cond.notify_all()
                if self._queue or self._closed:
                    self._work.notify()
        self._resolve(results, wake_now)

    def _resolve(self, results: list[tuple[Handle, Any, BaseException | None]],
                 wake_now: bool) -> None:
        callbacks = []
        with self._lock:
            for handle, result, error in results:
                handle._result, handle._error, handle._done = result, error, True
                if handle._callbacks:
                    callbacks.extend((callback, handle) for callback in handle._callbacks)
                    handle._callbacks = None
            self._wake_pending = True
            if wake_now or any(error is not None for _, _, error in results):
                self._wake_waiters()
        for callback, handle in callbacks:
            try:
                callback(handle)
            except Exception as exc:  # the caller's bug must not stop the journal
                self._on_failure(exc, False)

    def _wake_waiters(self) -> None:
        # caller holds self._lock
        if self._wake_pending:
            self._wake_pending = False
            self._durable.notify_all()

    def _wait_for(self, handle: Handle, timeout: float | None) -> bool:
        with self._lock:
            return self._durable.wait_for(lambda: handle._done, timeout)

    def _run_batch(self, batch: list[tuple[Request, Handle]], isolate: bool) -> list[tuple]:
        """Run every request in one transaction and commit it.

        Without ``isolate`` a failing request aborts the attempt (``_RequestFailed``); with it,
        each request runs in a savepoint, so one that raises fails alone.
        """
        results: list[tuple[Handle, Any, BaseException | None]] = []
        if not batch:
            return results
        self._conn.execute("BEGIN IMMEDIATE")
        with self._lock:
            self._wake_waiters()
        if not isolate:
            try:
                for group in _runs_of_a_kind(batch):
                    results.extend(self._run_group(group))
            except Exception as exc:
                raise _RequestFailed from exc
            self._conn.execute("COMMIT")
            return results
        for index, (request, handle) in enumerate(batch):
            self._conn.execute(f"SAVEPOINT r{index}")
            before = self._snapshot()
            try:
                result = request(self._conn)
            except Exception as exc:
                self._conn.execute(f"ROLLBACK TO r{index}")
                self._restore(before)
                results.append((handle, None, _journal_error(exc)))
            else:
                results.append((handle, result, None))
            self._conn.execute(f"RELEASE r{index}")
        self._conn.execute("COMMIT")
        return results

    def _run_group(self, group: list[tuple[Request, Handle]]) -> list[tuple]:
        first = group[0][0]
        if len(group) == 1:
            return [(group[0][1], first(self._conn), None)]
        outcomes = first.run_all(self._conn, [request.payload for request, _ in group])
        return [(handle, outcome, None) for (_, handle), outcome in zip(group, outcomes,
                                                                           strict=True)]

    def _rollback(self, before: Any) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        self._restore(before)


def _runs_of_a_kind(batch: list[tuple[Request, Handle]]) -> Iterator[list[tuple[Request, Handle]]]:
    """Split ``batch`` into runs of consecutive Batchable requests of one kind (others alone)."""
    start, end = 0, len(batch)
    while start < end:
        kind = getattr(batch[start][0], "run_all", None)
        stop = start + 1
        if kind is not None:
            while stop < end and getattr(batch[stop][0], "run_all", None) == kind:
                stop += 1
        yield batch[start:stop]
        start = stop


class _RequestFailed(Exception):
    """A request raised on the fast path; the batch is redone with savepoints."""


def _journal_error(exc: Exception) -> Exception:
    return translate_sqlite_error(exc) if isinstance(exc, sqlite3.Error) else exc
