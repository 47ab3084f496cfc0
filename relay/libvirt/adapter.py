"""The libvirt side of the agent: one connection, kept open, turned into a stream of changes.

``LibvirtAdapter`` opens a libvirt URI in its own thread and reconnects with capped, jittered
exponential backoff whenever libvirt goes away (close callback, keepalive, a dead connection seen
by a call). It subscribes to every event kind, reconciles after every (re)connect, on demand and
periodically, samples statistics, and submits everything to a ``ChangeSink`` in order per
object. Its public methods never wait for libvirt (``reconcile`` waits only if asked to).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import libvirt

from relay.backoff import Backoff
from relay.changes import (
    DOMAIN,
    NODE,
    RECONCILED,
    STORAGE_VOLUME,
    Change,
    ChangeSink,
    ObjectKey,
    PublishedStates,
)
from relay.errors import LibvirtError, LibvirtNotSupported, LibvirtPermanent, LibvirtTransient
from relay.lanes import Lanes
from relay.libvirt.errors import libvirt_calls
from relay.libvirt.events import deregister, register_events
from relay.libvirt.loop import ensure_event_loop
from relay.libvirt.objects import active_pool_volumes, key_of, node_uuid
from relay.libvirt.reconcile import ObjectSync, Publisher
from relay.libvirt.stats import StatsReader
from relay.supervision import Supervisor

log = logging.getLogger(__name__)


class LibvirtAdapter:
    """Publishes one libvirt host's objects and changes to ``sink``; see docs/objects.md.

    ``published`` tells what consoles last saw (the reconcile baseline). Intervals are in
    seconds. ``on_state_change(connected)`` is called from the adapter's thread whenever the
    connection comes up or goes away. Counters are plain attributes.
    """

    def __init__(self, sink: ChangeSink, published: PublishedStates,
                 uri: str = "test:///default", *, workers: int = 4,
                 reconcile_interval: float = 60.0, stats_interval: float = 30.0,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 keepalive_interval: int = 5, keepalive_count: int = 3,
                 liveness_interval: float = 1.0,
                 on_state_change: Callable[[bool], None] | None = None,
                 supervisor: Supervisor | None = None):
        self.uri = uri
        self.on_state_change = on_state_change
        self.connected = False
        self.connects = 0  # successful opens, the first one included
        self.reconnects = 0  # successful opens after a lost connection
        self.connect_failures = 0
        self.disconnects = 0
        self.closed_by_libvirt = 0  # close callbacks (EOF, keepalive timeout, error)
        self.reconcile_passes = 0
        # differences reconcile passes found, by event (added, changed, removed)
        self.reconcile_differences: dict[str, int] = {}
        self._reconcile_interval = reconcile_interval
        self._stats_interval = stats_interval
        self._backoff = (backoff_initial, backoff_max)
        self._keepalive = (keepalive_interval, keepalive_count)
        self._liveness_interval = liveness_interval
        self.supervisor = supervisor or Supervisor()
        self._lanes = Lanes(workers, "libvirt", self.supervisor)
        self._sync = ObjectSync(Publisher(_CountingSink(sink, self.reconcile_differences),
                                          published),
                                self._lanes, self.connection, self._suspect)
        self._conn: libvirt.virConnect | None = None
        self._node_key: ObjectKey | None = None
        self._stats = StatsReader()
        self._check_now = threading.Event()  # wakes the connection thread
        self._close_seen = False  # libvirt's close callback fired for the current connection
        self._stopping = threading.Event()
        self._reconcile_wanted = threading.Event()
        self._reconcile_cond = threading.Condition()
        self._reconcile_requested = 0
        self._reconcile_done = 0
        self._threads = [self.supervisor.thread(name, target, self._stopping.is_set)
                         for target, name in ((self._supervise, "libvirt-connection"),
                                              (self._reconcile_loop, "libvirt-reconcile"),
                                              (self._stats_loop, "libvirt-stats"))]

    def start(self) -> None:
        """Start connecting, in the background; returns at once."""
        _log_libvirt_errors_instead_of_printing()
        ensure_event_loop()
        self._lanes.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread and close the connection (waits up to ``timeout`` per thread)."""
        self._stopping.set()
        self._check_now.set()
        self._reconcile_wanted.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        self._lanes.stop(timeout)

    def connection(self) -> libvirt.virConnect:
        """The open libvirt connection; raises LibvirtTransient while there is none."""
        conn = self._conn
        if conn is None:
            raise LibvirtTransient(f"not connected to {self.uri}")
        return conn

    def reconcile(self, timeout: float | None = 0) -> bool:
        """Ask for a full reconcile pass and wait for it.

        Waits up to ``timeout`` seconds (None: no limit) for a pass that started after this call
        to finish, and returns whether it did; ``timeout=0`` only asks.
        """
        with self._reconcile_cond:
            self._reconcile_requested += 1
            ticket = self._reconcile_requested
        self._reconcile_wanted.set()
        with self._reconcile_cond:
            return self._reconcile_cond.wait_for(lambda: self._reconcile_done >= ticket, timeout)

    def reconcile_objects(self, keys: Iterable[ObjectKey]) -> None:
        """Re-read these objects soon and publish any difference (e.g. after a command)."""
        self._sync.check(keys)

    # The connection thread.

    def _supervise(self) -> None:
        backoff, first = Backoff(*self._backoff), True
        while not self._stopping.is_set():
            if not first and self._stopping.wait(backoff.next()):
                break
            first = False
            try:
                conn, undo = self._open()
            except LibvirtError as error:
                self.connect_failures += 1
                log.warning("cannot connect to libvirt at %s: %s", self.uri, error)
                continue
            since = time.monotonic()
            self._attach(conn)
            self._watch(conn)
            self._detach(conn, undo)
            if time.monotonic() - since > self._backoff[1]:
                backoff.reset()  # it was a stable connection: start backing off anew

    def _open(self) -> tuple[libvirt.virConnect, list[Callable[[], None]]]:
        with libvirt_calls():
            conn = libvirt.open(self.uri)
        undo: list[Callable[[], None]] = []
        try:
            with libvirt_calls():
                conn.registerCloseCallback(self._closed, None)
                undo.append(conn.unregisterCloseCallback)
            try:
                with libvirt_calls():
                    conn.setKeepAlive(*self._keepalive)
            except LibvirtNotSupported:
                log.debug("%s has no keepalive (a local driver)", self.uri)
            undo.extend(register_events(conn, self._sync.event))
            self._node_key = (NODE, node_uuid(conn))
        except LibvirtError:
            _close(conn, undo)
            raise
        return conn, undo

    def _attach(self, conn: libvirt.virConnect) -> None:
        self._stats = StatsReader()
        self._close_seen = False
        self._conn = conn
        self.connected = True
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        log.info("connected to libvirt at %s", self.uri)
        self._notify(True)
        self.reconcile()

    def _watch(self, conn: libvirt.virConnect) -> None:
        """Return once the connection is closed, found dead, or the adapter stops."""
        while not self._stopping.is_set():
            self._check_now.wait(self._liveness_interval)
            self._check_now.clear()
            if self._stopping.is_set() or self._close_seen:
                return
            try:
                if not conn.isAlive():
                    return
            except libvirt.libvirtError:
                return

    def _detach(self, conn: libvirt.virConnect, undo: list[Callable[[], None]]) -> None:
        self._conn = None
        self.connected = False
        self.disconnects += 1
        _close(conn, undo)
        if not self._stopping.is_set():
            log.warning("lost the libvirt connection to %s; reconnecting", self.uri)
        self._notify(False)

    def _closed(self, conn: libvirt.virConnect, reason: int, _opaque: Any) -> None:
        """libvirt's close callback (event loop thread): wake the connection thread."""
        log.info("libvirt closed the connection to %s (reason %d)", self.uri, reason)
        if conn is self._conn:
            self.closed_by_libvirt += 1
            self._close_seen = True
            self._check_now.set()

    def _suspect(self, error: LibvirtTransient) -> None:
        """A call failed transiently: have the connection thread check the connection now."""
        self._check_now.set()

    def _notify(self, connected: bool) -> None:
        if self.on_state_change is not None:
            try:
                self.on_state_change(connected)
            except Exception:
                log.exception("on_state_change(%s) failed", connected)

    # Reconcile and statistics threads.

    def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            self._reconcile_wanted.wait(self._reconcile_interval)
            self._reconcile_wanted.clear()
            conn = self._conn
            if self._stopping.is_set() or conn is None:
                continue  # the next connection asks for a pass
            with self._reconcile_cond:
                ticket = self._reconcile_requested
            done = functools.partial(self._reconcile_finished, ticket)
            self._guarded("reconcile", self._sync.full_pass, conn, done)

    def _reconcile_finished(self, ticket: int) -> None:
        with self._reconcile_cond:
            self._reconcile_done = max(self._reconcile_done, ticket)
            self.reconcile_passes += 1
            self._reconcile_cond.notify_all()

    def _stats_loop(self) -> None:
        while not self._stopping.wait(self._stats_interval):
            conn, node_key, reader = self._conn, self._node_key, self._stats
            if conn is not None and node_key is not None:
                self._guarded("statistics", self._sample, conn, node_key, reader)

    def _sample(self, conn: libvirt.virConnect, node_key: ObjectKey, reader: StatsReader) -> None:
        self._sync.stats(node_key, reader.node(conn))
        domains = reader.call("list.domains", lambda: conn.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) or []
        pools = reader.call("list.storage_pools", lambda: conn.listAllStoragePools(
            libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)) or []
        volumes = [vol for pool in pools for vol in active_pool_volumes(pool)]
        for object_class, handles, read in ((DOMAIN, domains, reader.domain),
                                            (STORAGE_VOLUME, volumes, reader.volume)):
            for handle in handles:
                try:
                    key, stats = key_of(object_class, handle), read(handle)
                except LibvirtPermanent as error:  # gone since it was listed
                    log.debug("no statistics for a %s: %s", object_class, error)
                    continue
                if stats:
                    self._sync.stats(key, stats)

    def _guarded(self, what: str, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except LibvirtTransient as error:
            log.info("%s interrupted: %s", what, error)
            self._suspect(error)
        except LibvirtError as error:
            log.warning("%s failed: %s", what, error)


class _CountingSink:
    """Forwards changes to ``sink``, counting reconcile differences by event in ``counts``.

    The publisher calls ``submit`` under its lock, so the counts need no lock of their own.
    """

    def __init__(self, sink: ChangeSink, counts: dict[str, int]):
        self._sink = sink
        self._counts = counts

    def submit(self, change: Change) -> None:
        if change.origin == RECONCILED:
            self._counts[change.event] = self._counts.get(change.event, 0) + 1
        self._sink.submit(change)


def _close(conn: libvirt.virConnect, undo: list[Callable[[], None]]) -> None:
    """Deregister callbacks and close ``conn``, ignoring failures of a dead connection."""
    deregister(undo)
    try:
        conn.close()
    except libvirt.libvirtError as error:
        log.debug("closing the libvirt connection failed: %s", error)


def _log_libvirt_errors_instead_of_printing() -> None:
    """libvirt prints every error to stderr by default; send them to the debug log instead."""
    libvirt.registerErrorHandler(
        lambda _ctx, error: log.debug("libvirt reported: %s", error[2]), None)
