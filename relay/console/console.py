"""The console: one broker connection that sees and controls the whole fleet (docs/console.md).

``Console`` declares its own durable queues (its event queue is bound to every host's events),
consumes them with manual settlement, applies every event to a fleet model (``relay.console.fleet``)
and commits the model and its deduplication marks to its own journal before it accepts the
deliveries concerned: a restart neither loses nor applies a change twice. It asks hosts for a
resync when it detects a gap, a gap marker or a new epoch. ``call`` sends commands and waits
for their replies; ``subscribe`` and ``changes`` deliver live changes.

Threads: the link thread (proton) receives, applies and settles; the journal's committer
writes; a dispatcher thread runs subscription callbacks; the commander's admin thread talks
AMQP 0-9-1 (declaring queues, checking that a host's command queue exists). The fleet model is
changed only on the link thread; readers take snapshots under a lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import queue
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from journal import Journal, JournalError
from relay import wire
from relay.backoff import Backoff
from relay.broker.codec import ReceivedMessage
from relay.broker.connection import BrokerSettings, LinkHealthCollector
from relay.broker.topology import Addresses, declare_console
from relay.changes import STATS
from relay.console.commander import Commander
from relay.console.fleet import (
    APPLIED,
    DUPLICATE,
    IGNORED,
    NOTICE_GAP,
    NOTICE_RESYNC,
    NOTICE_SWEPT,
    REFUSED,
    STALE,
    STALE_EPOCH,
    UNKNOWN_KIND,
    Changes,
    Fleet,
    HostSnapshot,
    Notice,
    ObjectSnapshot,
)
from relay.console.link import ConsoleLink, Consumer, Token
from relay.console.metrics import PREFIX as METRICS_PREFIX
from relay.console.metrics import ConsoleMetrics
from relay.errors import ConsoleBusy, ConsoleError, RelayError
from relay.status import StatusServer
from relay.supervision import Supervisor

log = logging.getLogger(__name__)

_STALE_REASONS = {STALE: "object-order", STALE_EPOCH: "epoch", IGNORED: "unknown-object"}
_PRUNE_EVERY = 60.0
_BUSY_BATCH, _GATHER_TARGET, _GATHER_SECONDS = 8, 256, 0.01  # see Console._gathering


@dataclass
class _Batch:
    """Deliveries waiting for the commit of what they changed, and what they did."""

    deliveries: list[Token] = field(default_factory=list)
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # (outcome, kind)


class Subscription:
    """Live changes matching a filter, handed to a callback on the dispatcher thread."""

    def __init__(self, console: Console, callback: Callable[[Notice], None], host: str | None,
                 object_class: str | None, object_id: str | None,
                 kinds: tuple[str, ...] | None):
        self._console = console
        self.callback = callback
        self.host, self.object_class, self.object_id = host, object_class, object_id
        self.kinds = kinds

    def matches(self, notice: Notice) -> bool:
        """Whether ``notice`` passes this subscription's filter."""
        return ((self.host is None or notice.host == self.host)
                and (self.object_class is None or notice.object_class == self.object_class)
                and (self.object_id is None or notice.object_id == self.object_id)
                and (self.kinds is None or notice.kind in self.kinds))

    def close(self) -> None:
        """Stop receiving changes."""
        self._console._unsubscribe(self)


class ChangeStream(Subscription):
    """Live changes as an iterator (``for notice in stream``; ``get(timeout)``); close it, or
    use it as a context manager, when done."""

    def __init__(self, console: Console, **filters: Any):
        self._queue: queue.SimpleQueue[Notice | None] = queue.SimpleQueue()
        super().__init__(console, self._queue.put, **filters)

    def get(self, timeout: float | None = None) -> Notice | None:
        """The next change, or None when ``timeout`` passed (or the stream was closed)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[Notice]:
        while (notice := self._queue.get()) is not None:
            yield notice

    def close(self) -> None:
        """Stop receiving changes and end the iteration."""
        super().close()
        self._queue.put(None)

    def __enter__(self) -> ChangeStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Console:
    """A console; ``start()`` returns at once, ``stop()`` shuts down cleanly.

    ``journal_path`` is the console's own journal (fleet model, marks, applied log); one process
    at a time may use it. ``secret`` signs commands (HMAC-SHA256). ``metrics_listen``
    (``HOST:PORT``) serves /metrics, /healthz and /readyz. ``gap_grace``: seconds a missing
    stream seq may stay missing before it counts as lost; ``sweep_quiet``: seconds of quiet
    after a resync's reply before unconfirmed objects are swept (when the host's reply does not
    say where its pass ended). ``stall_after``: seconds without progress after which a vital
    thread turns /healthz red (relay.supervision).
    """

    def __init__(self, console_id: str, urls: list[str], journal_path: str | os.PathLike, *,
                 addresses: Addresses | None = None, settings: BrokerSettings | None = None,
                 secret: bytes | None = None, metrics_listen: str | None = None,
                 prefetch: int = 1000, gap_grace: float = 2.0, sweep_quiet: float = 1.0,
                 history_limit: int = 100_000, synchronous: str = "FULL",
                 stall_after: float = 60.0):
        if not urls:
            raise ConsoleError("a console needs at least one broker URL (amqp://host:port)")
        self.console_id = console_id
        self.addresses = addresses or Addresses()
        self.settings = dataclasses.replace(settings or BrokerSettings(urls=[]), urls=list(urls))
        self.history_limit = history_limit
        self.events_address = self.addresses.console_events_for(console_id)
        self._lock_file = hold_lock(Path(f"{journal_path}.lock"))
        try:
            self.journal = Journal(journal_path, console_id, synchronous=synchronous)
        except JournalError:
            self._lock_file.close()
            raise
        self.fleet = Fleet(console_id, gap_grace=gap_grace, sweep_quiet=sweep_quiet)
        self.fleet.load(self.journal.state("host"), self.journal.state("object"))
        self._lock = threading.Lock()  # guards the fleet model against readers
        self.metrics = ConsoleMetrics()
        self.metrics.watch(self._figures)
        self.supervisor = Supervisor(stall_after=stall_after, prefix=METRICS_PREFIX)
        self.metrics.registry.register(self.supervisor.collector())
        self.supervisor.watch_journal(self.journal)
        self.commander = Commander(console_id, self.addresses, self.settings, self.metrics,
                                   secret)
        self.link = ConsoleLink(self.settings, [
            Consumer(self.events_address, self._on_event, prefetch), self.commander.consumer],
            on_state=self._on_link_state, on_tick=self._tick, on_idle=self._flush,
            supervisor=self.supervisor)
        self.metrics.registry.register(LinkHealthCollector(self.link, METRICS_PREFIX))
        self.commander.attach(self.link)
        self._batch = _Batch()
        self._committing = False
        self._last_batch_size = 0  # deliveries in the last commit (see _gathering)
        self._last_commit_at = 0.0
        self._gather_timer = False
        self._paused = False
        self._owed_credit = 0
        self._commit_backoff = Backoff(0.5, 30.0)
        self._last_prune = time.monotonic()
        self._ever_connected = False
        self._subscriptions: list[Subscription] = []
        self._notices: queue.SimpleQueue[list[Notice] | None] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._dispatcher = self.supervisor.thread("console-dispatch", self._dispatch,
                                                  self._stopped.is_set)
        self.status = (StatusServer(metrics_listen, self.metrics.registry, self.readiness,
                                    self.liveness) if metrics_listen else None)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Declare the queues (retried in the background while the broker is away), connect,
        and send again any resync a previous run asked for."""
        if self.status:
            self.status.start()
        self._dispatcher.start()
        try:
            self._declare()
        except RelayError as exc:
            log.warning("console %s: cannot declare its queues yet (%s); retrying",
                        self.console_id, exc)
            self.commander.in_background(self._declare_until_done)
        self.link.start()
        for host, key in self.fleet.pending_resyncs():
            self.link.call_soon(lambda h=host, k=key: self._send_resync(h, k))
        log.info("console %s started (journal %s, %d hosts known)", self.console_id,
                 self.journal.path, len(self.fleet.hosts))

    def stop(self) -> None:
        """Disconnect and close the journal; unaccepted deliveries go back to the queue."""
        self.supervisor.stopping()
        self._stopped.set()
        self.link.stop()
        self.commander.stop()
        self._notices.put(None)
        if self._dispatcher.is_alive():
            self._dispatcher.join(5)
        if self.status:
            self.status.stop()
        self.journal.close()
        self._lock_file.close()

    def __enter__(self) -> Console:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """True while the broker link is up."""
        return self.link.connected

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: alive while no vital thread is dead, stalled or failed for good."""
        problems = self.supervisor.problems()
        return not problems, {"console": self.console_id, "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /readyz: ready once started and alive; a broker outage (or a broker that went
        silent) degrades."""
        hosts, objects, unconfirmed = self._counts()
        details = {"console": self.console_id, "broker": "up" if self.connected else "down",
                   "broker_url": self.link.connected_url, "broker_error": self.link.last_error,
                   "broker_last_frame_age": round(self.link.last_frame_age(), 1),
                   "hosts": hosts, "objects": objects, "unconfirmed": unconfirmed,
                   "journal": "paused" if self._paused else "ok"}
        problems = self.supervisor.problems()
        if problems:
            details["problems"] = problems
        details["status"] = ("not-ready" if problems else "ok"
                             if self.connected and not self._paused else "degraded")
        return not self._stopped.is_set() and not problems, details


    def wait_idle(self, quiet: float = 0.5, timeout: float = 10.0,
                  resyncs: bool = True) -> bool:
        """Wait until this console has applied what its queue held: for ``quiet`` seconds in a
        row the queue had no message ready (and, with ``resyncs``, no resync was under way),
        and nothing waits for a commit. False when that did not happen within ``timeout``
        (the broker is unreachable, or the console cannot keep up)."""
        deadline = time.monotonic() + timeout
        calm_since: float | None = None
        try:
            with self.commander.admin() as admin:
                while (now := time.monotonic()) < deadline:
                    calm = (self.connected and not (resyncs and self._resyncing())
                            and admin.queue_depth(self.events_address) == 0)
                    if not calm:
                        calm_since = None
                    elif calm_since is None:
                        calm_since = now
                    elif (now - calm_since >= quiet and not self._committing
                          and not self._batch.deliveries):
                        return True
                    time.sleep(0.05)
        except RelayError as exc:
            log.warning("console %s cannot tell whether it caught up: %s", self.console_id, exc)
        return False

    def _resyncing(self) -> bool:
        with self._lock:
            return any(view.resync is not None and view.resync.state != "failed"
                       for view in self.fleet.hosts.values())

    # -- reading the fleet --------------------------------------------------------------------
    def hosts(self) -> dict[str, HostSnapshot]:
        """Every host this console knows, with its objects."""
        with self._lock:
            return self.fleet.snapshot(time.time())

    def host(self, name: str) -> HostSnapshot | None:
        """One host, or None when this console has not heard of it."""
        return self.hosts().get(name)

    def objects(self, host: str | None = None, object_class: str | None = None
                ) -> list[ObjectSnapshot]:
        """Objects of every host (or one), optionally of one class, sorted."""
        found = [obj for name, view in sorted(self.hosts().items())
                 if host is None or name == host
                 for _, obj in sorted(view.objects.items())
                 if object_class is None or obj.object_class == object_class]
        return found

    def history(self, host: str | None = None, limit: int = 20) -> list[Notice]:
        """The last ``limit`` changes applied (of one host), oldest first, from the journal."""
        records = self.journal.last_state_log(limit, f"{host}:" if host else "")
        return [Notice.from_record(r.record) for r in records
                if r.record.get("outcome") == APPLIED]

    # -- live changes -------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[Notice], None], host: str | None = None,
                  object_class: str | None = None, object_id: str | None = None,
                  kinds: tuple[str, ...] | None = None) -> Subscription:
        """Call ``callback(notice)`` for every change applied from now on that matches; the
        callbacks run in apply order on one dispatcher thread (keep them short)."""
        subscription = Subscription(self, callback, host, object_class, object_id, kinds)
        with self._lock:
            self._subscriptions = [*self._subscriptions, subscription]
        return subscription

    def changes(self, host: str | None = None, object_class: str | None = None,
                object_id: str | None = None, kinds: tuple[str, ...] | None = None
                ) -> ChangeStream:
        """An iterator over changes applied from now on that match (see ``subscribe``)."""
        stream = ChangeStream(self, host=host, object_class=object_class,
                              object_id=object_id, kinds=kinds)
        with self._lock:
            self._subscriptions = [*self._subscriptions, stream]
        return stream

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s is not subscription]

    def _dispatch(self) -> None:
        while (notices := self._notices.get()) is not None:
            subscriptions = self._subscriptions
            for notice in notices:
                for subscription in subscriptions:
                    if subscription.matches(notice):
                        try:
                            subscription.callback(notice)
                        except Exception:  # a subscriber's bug must not stop the others
                            log.exception("subscription callback failed on %s", notice)

    # -- commands ---------------------------------------------------------------------------
    def call(self, host: str, operation: str, target: str | None = None,
             args: dict[str, Any] | None = None, timeout: float = 30.0,
             key: str | None = None) -> dict[str, Any]:
        """Run ``operation`` on ``host`` and return the reply body (``result`` holds what the
        operation returned).

        The command carries ``key`` (a fresh one by default) as its idempotency key and is sent
        again with the same key until a reply arrives or ``timeout`` passes: the host runs it
        at most once. Raises ``CommandRejected`` (the host refused it or libvirt failed),
        ``OutcomeUnknown``, ``CommandTimeout``, or ``ConsoleError`` (unknown host, bad call).
        """
        return self.commander.call(host, operation, target, args, timeout, key)

    def resync(self, host: str) -> None:
        """Ask ``host`` for a full resync now (its objects are unconfirmed until it is done)."""
        if self.host(host) is None:
            raise ConsoleError(f"host {host} is unknown to this console")

        def request() -> None:
            with self._lock:
                self.fleet.request_resync(host, time.time())
            self._flush()

        self._on_link_thread(request)

    def _send_resync(self, host: str, key: str) -> None:
        """Send resync ``key`` to ``host`` (``node.refresh`` with ``full``); the reply goes to
        the fleet model."""
        def replied(reply: dict[str, Any]) -> None:
            with self._lock:
                self.fleet.resync_replied(host, key, reply, time.time())
            if reply.get("status") != wire.OK:
                log.error("host %s refused a resync: %s [%s]; its objects stay unconfirmed",
                          host, reply.get("error"), reply.get("code"))
            self._flush()

        self.commander.call_async(host, "node.refresh", {"full": True}, key, replied)

    def _declare(self) -> None:
        with self.commander.admin() as admin:
            declare_console(admin, self.addresses, self.console_id)

    def _declare_until_done(self) -> None:
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        while not self._stopped.is_set():
            try:
                self._declare()
                log.info("console %s declared its queues", self.console_id)
                return
            except RelayError as exc:
                log.warning("console %s: declaring its queues failed (%s)", self.console_id,
                            exc)
            self._stopped.wait(backoff.next())

    # -- receiving (link thread) ----------------------------------------------------------------
    def _on_link_state(self, connected: bool, error: str | None) -> None:
        if connected:
            if self._ever_connected:
                self.metrics.broker_reconnects.inc()
            self._ever_connected = True
        elif error and ("not-found" in error or "not_found" in error) and (
                not self._stopped.is_set()):
            self.commander.in_background(self._declare_until_done)  # a queue went missing

    def _on_event(self, message: ReceivedMessage, delivery: Token) -> None:
        if self._paused:
            self.link.settle([delivery], accept=False, replenish=False)
            self._owed_credit += 1
            return
        try:
            items = wire.unpack(message.properties or {}, message.body,
                                message.content_encoding, str(message.id),
                                message.subject or "")
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            log.error("refusing an undecodable message %s: %s", message.id, exc)
            items = []
            self._batch.outcomes.append((REFUSED, ""))
        now = time.time()
        with self._lock:
            for item in items:
                try:
                    outcome = self.fleet.apply(item, now)
                except Exception:  # no single message may stop the console
                    log.exception("refusing message %s that the fleet model could not apply",
                                  item.message_id)
                    outcome = REFUSED
                kind = ("stats" if isinstance(item.body, dict)
                        and item.body.get("origin") == STATS
                        else str(item.properties.get("kind")))
                self._batch.outcomes.append((outcome, kind))
        self._batch.deliveries.append(delivery)  # committed once the burst is handled

    def _tick(self) -> None:
        now = time.time()
        with self._lock:
            gaps = self.fleet.tick(now)
        for host, lost in gaps.items():
            if lost:
                self.metrics.gaps.inc(lost)
                log.warning("host %s: %d events were lost on the way; asking it for a resync",
                            host, lost)
        self._flush()
        if time.monotonic() - self._last_prune > _PRUNE_EVERY and not self._stopped.is_set():
            self._last_prune = time.monotonic()
            self.commander.in_background(self.journal.prune_state_log, self.history_limit)

    # -- committing (link thread) ---------------------------------------------------------------
    def _flush(self) -> None:
        """Commit what the model changed, then accept the deliveries that changed it. One
        commit runs at a time; what arrives meanwhile forms the next batch. Runs when the link
        thread has handled a burst of deliveries, after each commit and on each tick."""
        if self._committing or self._paused or self._gathering():
            return
        with self._lock:
            changes = self.fleet.take()
        batch, self._batch = self._batch, _Batch()
        self._last_batch_size = len(batch.deliveries)
        if not changes.writes and not changes.log:
            self._committed(batch, changes)
            return
        self._committing = True
        started = time.monotonic()
        handle = self.journal.put_state_async(changes.writes, changes.log)
        handle.add_done_callback(lambda done: self._on_link_thread(
            lambda: self._commit_done(batch, changes, done.exception(), started)))

    def _gathering(self) -> bool:
        """Under load (the last batch was large), wait for a larger batch: up to
        ``_GATHER_SECONDS`` after the last commit, until ``_GATHER_TARGET`` deliveries are
        waiting. Fewer, larger commits cost one fsync and one write per host each; a lone
        change (the last batch was small) is committed at once."""
        if (self._last_batch_size < _BUSY_BATCH or len(self._batch.deliveries) >= _GATHER_TARGET
                or not self._batch.deliveries):
            return False
        wait = self._last_commit_at + _GATHER_SECONDS - time.monotonic()
        if wait <= 0:
            return False
        if not self._gather_timer:
            self._gather_timer = True
            self.link.schedule(wait, self._gathered)
        return True

    def _gathered(self) -> None:
        self._gather_timer = False
        self._flush()  # the wait is over: _gathering lets it through

    def _on_link_thread(self, func: Callable[[], None]) -> None:
        """Hand ``func`` to the link thread, unless the console is stopping."""
        if not self._stopped.is_set():
            self.link.call_soon(func)

    def _commit_done(self, batch: _Batch, changes: Changes, error: BaseException | None,
                     started: float) -> None:
        self._committing = False
        self._last_commit_at = time.monotonic()
        if error is not None:
            self._commit_failed(batch, error)
            return
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        self.metrics.commit_deliveries.observe(len(batch.deliveries))
        self._commit_backoff.reset()
        self._committed(batch, changes)
        self._flush()

    def _committed(self, batch: _Batch, changes: Changes) -> None:
        self.link.settle(batch.deliveries)
        for (outcome, kind), count in Counter(batch.outcomes).items():
            if outcome == APPLIED:
                self.metrics.applied.labels(kind).inc(count)
            elif outcome == DUPLICATE:
                self.metrics.duplicates.inc(count)
            elif outcome == REFUSED:
                self.metrics.refused.inc(count)
            elif outcome == UNKNOWN_KIND:
                self.metrics.ignored.labels(outcome).inc(count)
            else:
                self.metrics.stale.labels(_STALE_REASONS[outcome]).inc(count)
        for _, record in changes.log:
            if record["outcome"] != APPLIED:
                continue
            if record["kind"] == NOTICE_RESYNC:
                self.metrics.resyncs.labels(record["details"]["reason"]).inc()
            elif record["kind"] == NOTICE_SWEPT:
                self.metrics.swept.inc()
            elif record["kind"] == NOTICE_GAP:
                self.metrics.gap_markers.inc()
        if self._subscriptions and (notices := changes.notices):
            self._notices.put(notices)
        for host, key in changes.resyncs:
            self._send_resync(host, key)

    def _commit_failed(self, batch: _Batch, error: BaseException) -> None:
        """The journal refused the batch (disk full, I/O error): the model ran ahead of the
        disk. Release every delivery it covers, reload the model from the journal, pause."""
        self.metrics.journal_errors.inc()
        delay = self._commit_backoff.next()
        log.error("console journal commit failed (%s): releasing %d deliveries, reloading the "
                  "fleet model, pausing %.1f s", error,
                  len(batch.deliveries) + len(self._batch.deliveries), delay)
        released = [*batch.deliveries, *self._batch.deliveries]
        self.link.settle(released, accept=False, replenish=False)
        self._owed_credit += len(released)
        self._batch = _Batch()
        with self._lock:
            self.fleet.load(self.journal.state("host"), self.journal.state("object"))
        self._paused = True
        self.link.schedule(delay, self._resume)

    def _resume(self) -> None:
        self._paused = False
        self.link.replenish(self.events_address, self._owed_credit)
        self._owed_credit = 0

    # -- metrics ------------------------------------------------------------------------------
    def _counts(self) -> tuple[int, int, int]:
        with self._lock:
            return self.fleet.counts()

    def _figures(self) -> tuple[dict[str, float], int, int, int]:
        now = time.time()
        with self._lock:
            lags = {name: max(0.0, now - view.last_journaled_at)
                    for name, view in self.fleet.hosts.items() if view.last_journaled_at}
            return (lags, *self.fleet.counts())


def hold_lock(path: Path, wait: float = 0.0) -> IO[str]:
    """Hold an exclusive lock on ``path`` (one process per console journal), waiting up to
    ``wait`` seconds; raise ``ConsoleBusy`` naming the holder. Closing the returned file (or
    leaving it as a context manager) releases the lock; so does the process's death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (returned to the caller, who holds it open)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ConsoleBusy(
                    f"{path.with_suffix('')} is in use by process {holder}: one process per "
                    "console; stop that one, or use another state directory or console "
                    "id") from None
            time.sleep(0.05)
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


__all__ = ["ChangeStream", "Console", "HostSnapshot", "Notice", "ObjectSnapshot",
           "Subscription", "hold_lock"]
