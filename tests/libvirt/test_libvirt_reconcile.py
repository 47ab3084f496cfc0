"""Reconcile publishes exactly the differences between libvirt and what was published."""

from __future__ import annotations

import contextlib
import threading

import libvirt
import pytest

from harness import wait_until
from harness.libvirt_side import Scratch, next_change, running_adapter
from harness.memory_sink import MemorySink
from relay.changes import DOMAIN, LIVE, NETWORK, RECONCILED
from relay.libvirt.objects import OBJECT_CLASSES, list_keys, read_state


@pytest.fixture
def sink():
    return MemorySink()


@pytest.fixture
def scratch(libvirt_conn):
    objects = Scratch(libvirt_conn)
    yield objects
    objects.cleanup()


def test_first_pass_publishes_every_object_and_an_unchanged_host_then_diffs_to_nothing(
        sink, libvirt_conn):
    with running_adapter(sink) as adapter:
        listed = list_keys(libvirt_conn)
        assert set(listed) == set(OBJECT_CLASSES), "the test driver lists every class"
        assert set(sink.published_states()) == set().union(*listed.values())
        assert {c.event for c in sink.changes()} == {"added"}
        mark = sink.count()
        assert adapter.reconcile(timeout=10) and adapter.reconcile(timeout=10)
        assert sink.changes_since(mark) == []


def test_changes_made_while_the_adapter_was_stopped_come_back_as_differences(
        sink, scratch, libvirt_conn):
    with running_adapter(sink):
        kept, gone = scratch.domain("kept", start=True), scratch.domain("gone")
        net = scratch.network()
        keys = {"kept": (DOMAIN, kept.UUIDString()), "gone": (DOMAIN, gone.UUIDString()),
                "net": (NETWORK, net.UUIDString())}
        wait_until(lambda: set(keys.values()) <= set(sink.published_states()),
                   what="the scratch objects to be published")
    mark = sink.count()

    with _events_delivered(libvirt_conn, count=4):  # none may reach the next adapter live
        kept.suspend()
        gone.undefine()
        new = scratch.domain("new")
        net.create()
    keys["new"] = (DOMAIN, new.UUIDString())

    with running_adapter(sink):
        changes = {c.key: c for c in sink.changes_since(mark)}
    assert {c.origin for c in changes.values()} == {RECONCILED}
    assert set(changes) == set(keys.values()), "only the objects that changed are published"
    assert (changes[keys["kept"]].event, changes[keys["kept"]].state["state"]) == (
        "changed", "paused")
    assert (changes[keys["gone"]].event, changes[keys["gone"]].state) == ("removed", None)
    assert (changes[keys["new"]].event, changes[keys["new"]].state["name"]) == (
        "added", new.name())
    assert (changes[keys["net"]].event, changes[keys["net"]].state["active"]) == ("changed", True)


@contextlib.contextmanager
def _events_delivered(conn: libvirt.virConnect, count: int):
    """Wait on exit until libvirt delivered ``count`` domain and network lifecycle events."""
    seen = []

    def record(*event):
        seen.append(event)

    callbacks = [(conn.domainEventDeregisterAny, conn.domainEventRegisterAny(
                      None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, record, None)),
                 (conn.networkEventDeregisterAny, conn.networkEventRegisterAny(
                      None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, record, None))]
    try:
        yield
        wait_until(lambda: len(seen) >= count, what=f"libvirt to deliver {count} events")
    finally:
        for deregister, callback_id in callbacks:
            deregister(callback_id)


def test_live_events_and_reconcile_passes_never_race_into_a_wrong_state(sink, scratch,
                                                                          libvirt_conn):
    with running_adapter(sink, workers=4) as adapter:
        domains = [scratch.domain("race", start=True) for _ in range(3)]
        keys = [(DOMAIN, dom.UUIDString()) for dom in domains]
        stop = threading.Event()

        def reconcile_until_stopped():
            while not stop.is_set():
                adapter.reconcile(timeout=10)

        reconciling = threading.Thread(target=reconcile_until_stopped)
        reconciling.start()
        try:
            for _ in range(20):
                for dom in domains:
                    dom.suspend()
                    dom.resume()
            domains[0].suspend()
        finally:
            stop.set()
            reconciling.join()
        for key, events in zip(keys, (43, 42, 42), strict=True):
            wait_until(lambda k=key, n=events: len(sink.changes(k, origin=LIVE)) == n,
                       what=f"{events} live changes of {key}")
            assert sink.published_states()[key] == read_state(libvirt_conn, key)
            assert all(c.state is not None for c in sink.changes(key)), "a spurious removal"
        assert sink.published_states()[keys[0]]["state"] == "paused"
        mark = sink.count()
        assert adapter.reconcile(timeout=10)
        assert sink.changes_since(mark) == []


def test_reconcile_objects_publishes_a_change_that_has_no_libvirt_event(sink, scratch):
    with running_adapter(sink) as adapter:
        dom = scratch.domain()
        key = (DOMAIN, dom.UUIDString())
        next_change(sink, key, 0)
        dom.setAutostart(1)  # the test driver emits no event for this
        adapter.reconcile_objects([key])
        change = next_change(sink, key, 1)
        assert (change.event, change.origin, change.state["autostart"]) == (
            "changed", RECONCILED, True)


def test_periodic_reconcile_finds_changes_by_itself(sink, scratch):
    with running_adapter(sink, reconcile_interval=0.2):
        dom = scratch.domain()
        key = (DOMAIN, dom.UUIDString())
        next_change(sink, key, 0)
        dom.setAutostart(1)
        change = next_change(sink, key, 1)
        assert (change.event, change.origin, change.state["autostart"]) == (
            "changed", RECONCILED, True)
