"""Keep what is published equal to libvirt's state: live events, reconcile, statistics.

Every read and submit for one object runs in that object's lane (``relay.lanes``), so a live
event and a reconcile check of the same object never race: each re-reads the object when it
runs and compares with what is published at that moment. A reconcile submits only differences:
``added``, ``changed`` or ``removed`` (state None), with origin RECONCILED.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import libvirt

from relay.changes import (
    LIVE,
    RECONCILED,
    STATS,
    STORAGE_POOL,
    STORAGE_VOLUME,
    Change,
    ChangeSink,
    ObjectKey,
    PublishedStates,
)
from relay.errors import LibvirtError, LibvirtPermanent, LibvirtTransient
from relay.lanes import Lanes
from relay.libvirt.errors import is_missing, libvirt_calls
from relay.libvirt.objects import OBJECT_CLASSES, active_pool_volumes, key_of, list_keys, read_state

log = logging.getLogger(__name__)

State = dict[str, Any]


class Publisher:
    """Submits changes and mirrors the published state of every object, consistently.

    ``load`` re-reads the sink's published states; submits and loads are serialized, so the
    mirror always equals what the sink holds.
    """

    def __init__(self, sink: ChangeSink, published: PublishedStates):
        self._sink = sink
        self._published = published
        self._lock = threading.Lock()
        self._states: dict[ObjectKey, State] = {}

    def load(self) -> None:
        """Replace the mirror with the sink's published states."""
        with self._lock:
            self._states = dict(self._published.published_states())

    def publish(self, change: Change) -> None:
        """Submit ``change``; its state (unless a statistics sample) becomes the published one."""
        with self._lock:
            self._sink.submit(change)
            if change.origin == STATS:
                return
            if change.state is None:
                self._states.pop(change.key, None)
            else:
                self._states[change.key] = change.state

    def state(self, key: ObjectKey) -> State | None:
        """The published state of ``key`` (None: unknown or removed)."""
        with self._lock:
            return self._states.get(key)

    def keys(self, where: Callable[[ObjectKey, State], bool] = lambda key, state: True
             ) -> set[ObjectKey]:
        """Published objects matching ``where(key, state)``."""
        with self._lock:
            return {key for key, state in self._states.items() if where(key, state)}


class ObjectSync:
    """Queues per-object work in lanes: live events, reconcile checks, statistics samples.

    ``connection()`` returns the current libvirt connection or raises LibvirtTransient;
    ``on_transient(error)`` is told when a libvirt call failed transiently (the connection may
    be gone; the next reconcile catches up).
    """

    def __init__(self, publisher: Publisher, lanes: Lanes,
                 connection: Callable[[], libvirt.virConnect],
                 on_transient: Callable[[LibvirtTransient], None]):
        self._publisher = publisher
        self._lanes = lanes
        self._connection = connection
        self._on_transient = on_transient
        self._listable: set[str] = set()  # object classes the last full pass could list

    def event(self, key: ObjectKey, event: str, details: dict[str, Any],
              observed_at: float) -> None:
        """Queue a live event: its change carries the object's state when the lane reads it."""
        def task() -> None:
            state = read_state(self._connection(), key)
            self._publisher.publish(Change(*key, event=event, origin=LIVE, state=state,
                                           details=details, observed_at=observed_at))
            if key[0] == STORAGE_POOL:  # volumes have no events: check the pool's volumes
                self._check_pool_volumes(key[1])

        self._lanes.submit(key, self._guarded(key, task))

    def stats(self, key: ObjectKey, stats: dict[str, Any]) -> None:
        """Queue a statistics sample of ``key``."""
        change = Change(*key, event="stats", origin=STATS, stats=stats)
        self._lanes.submit(key, self._guarded(key, lambda: self._publisher.publish(change)))

    def check(self, keys: Iterable[ObjectKey], done: Callable[[], None] = lambda: None) -> None:
        """Queue a reconcile check of each of ``keys``; call ``done`` when all have run."""
        keys = sorted(keys)
        countdown = _Countdown(len(keys), done)
        for key in keys:
            self._lanes.submit(key, self._guarded(key, lambda k=key: self._check(k),
                                                  finally_=countdown.tick))

    def full_pass(self, conn: libvirt.virConnect, done: Callable[[], None]) -> None:
        """Check every object libvirt lists and every published one; ``done`` when finished.

        Published objects of a class the connection cannot list are left alone.
        """
        listed = list_keys(conn)
        if listed.keys() != self._listable:
            log.info("reconciling %s; not listable here: %s", ", ".join(sorted(listed)),
                     ", ".join(sorted(OBJECT_CLASSES.keys() - listed.keys())) or "none")
            self._listable = set(listed)
        self._publisher.load()
        published = self._publisher.keys(lambda key, state: key[0] in listed)
        self.check(set().union(*listed.values()) | published, done)

    def _check(self, key: ObjectKey) -> None:
        state = read_state(self._connection(), key)
        published = self._publisher.state(key)
        if state == published:
            return
        event = "removed" if state is None else "added" if published is None else "changed"
        self._publisher.publish(Change(*key, event=event, origin=RECONCILED, state=state))

    def _check_pool_volumes(self, pool_uuid: str) -> None:
        try:
            with libvirt_calls():
                pool = self._connection().storagePoolLookupByUUIDString(pool_uuid)
            listed = {key_of(STORAGE_VOLUME, vol) for vol in active_pool_volumes(pool)}
        except LibvirtPermanent as error:
            if not is_missing(error):
                raise
            listed = set()  # the pool is gone, and so are its volumes
        published = self._publisher.keys(
            lambda key, state: key[0] == STORAGE_VOLUME and state.get("pool") == pool_uuid)
        self.check(listed | published)

    def _guarded(self, key: ObjectKey, task: Callable[[], None],
                 finally_: Callable[[], None] = lambda: None) -> Callable[[], None]:
        def run() -> None:
            try:
                task()
            except LibvirtTransient as error:
                log.debug("reading %s failed transiently: %s", key, error)
                self._on_transient(error)
            except LibvirtError as error:
                log.warning("reading %s failed: %s", key, error)
            finally:
                finally_()

        return run


class _Countdown:
    """Calls ``done`` once ``count`` ticks have happened (at once if count is 0)."""

    def __init__(self, count: int, done: Callable[[], None]):
        self._count = count
        self._done = done
        self._lock = threading.Lock()
        if count == 0:
            done()

    def tick(self) -> None:
        with self._lock:
            self._count -= 1
            finished = self._count == 0
        if finished:
            self._done()
