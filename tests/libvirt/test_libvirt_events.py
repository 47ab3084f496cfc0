"""Every operation libvirt's test driver supports yields the expected change with the new state."""

from __future__ import annotations

import libvirt
import pytest

from harness import wait_until
from harness.libvirt_side import DOMAIN_XML, Scratch, next_change, running_adapter
from harness.memory_sink import MemorySink
from relay.changes import (
    DOMAIN,
    LIVE,
    NETWORK,
    NODE_DEVICE,
    RECONCILED,
    STORAGE_POOL,
    STORAGE_VOLUME,
)
from relay.libvirt.events import SOURCES, deregister, register_events


@pytest.fixture
def sink():
    return MemorySink()


@pytest.fixture
def adapter(sink):
    with running_adapter(sink) as running:
        yield running


@pytest.fixture
def scratch(libvirt_conn):
    objects = Scratch(libvirt_conn)
    yield objects
    objects.cleanup()


def _walk(sink, key, steps, seen=0):
    """Run each (operation, event, expected state items or None) and check the change it made,
    after the first ``seen`` changes of ``key``; return how many changes were seen then."""
    for operation, event, expected in steps:
        operation()
        change = next_change(sink, key, seen)
        seen += 1
        assert (change.event, change.origin) == (event, LIVE), f"after {event}"
        if expected is None:
            assert change.state is None, f"{event} should leave no state"
        else:
            assert expected.items() <= change.state.items(), f"state after {event}"
    assert sink.changes(key)[seen:] == [], "an operation made more than one change"
    return seen


def test_domain_operations_publish_each_event_with_the_new_state(
        adapter, sink, scratch, libvirt_conn, tmp_path):
    dom = scratch.domain()
    key = (DOMAIN, dom.UUIDString())
    saved = str(tmp_path / "saved-domain")
    running = {"state": "running", "active": True}
    _walk(sink, key, [
        (lambda: None, "lifecycle.defined.added",
         {"name": dom.name(), "state": "shutoff", "active": False, "id": None,
          "persistent": True, "autostart": False, "num_vcpus": 1, "maximum_memory": 65536}),
        (dom.create, "lifecycle.started.booted", running | {"state_reason": "booted"}),
        (dom.suspend, "lifecycle.suspended.paused", {"state": "paused", "state_reason": "user"}),
        (dom.resume, "lifecycle.resumed.unpaused", running | {"state_reason": "unpaused"}),
        (lambda: dom.save(saved), "lifecycle.stopped.saved",
         {"state": "shutoff", "state_reason": "saved", "active": False, "id": None}),
        (lambda: libvirt_conn.restore(saved), "lifecycle.started.restored",
         running | {"state_reason": "restored"}),
        (dom.shutdown, "lifecycle.stopped.shutdown",
         {"state": "shutoff", "state_reason": "shutdown"}),
        (dom.create, "lifecycle.started.booted", running),
        (dom.destroy, "lifecycle.stopped.destroyed",
         {"state": "shutoff", "state_reason": "destroyed"}),
        (dom.undefine, "lifecycle.undefined.removed", None),
    ])
    assert key not in sink.published_states()


def test_running_domain_has_an_id_and_transient_domain_vanishes_when_destroyed(
        adapter, sink, libvirt_conn):
    name = Scratch.name("transient")
    dom = libvirt_conn.createXML(DOMAIN_XML.format(name=name, memory=65536, vcpus=2, devices=""))
    key = (DOMAIN, dom.UUIDString())
    started = next_change(sink, key, 0)
    assert started.event == "lifecycle.started.booted"
    assert started.state["persistent"] is False and started.state["num_vcpus"] == 2
    assert started.state["id"] == dom.ID()
    _walk(sink, key, [(dom.destroy, "lifecycle.stopped.destroyed", None)], seen=1)


def test_network_operations_publish_lifecycle_changes(adapter, sink, scratch):
    net = scratch.network()
    key = (NETWORK, net.UUIDString())
    _walk(sink, key, [
        (lambda: None, "lifecycle.defined",
         {"name": net.name(), "active": False, "persistent": True, "bridge": net.bridgeName()}),
        (net.create, "lifecycle.started", {"active": True}),
        (net.destroy, "lifecycle.stopped", {"active": False}),
        (net.undefine, "lifecycle.undefined", None),
    ])


def test_pool_operations_publish_changes_and_refresh_reveals_new_volumes(adapter, sink, scratch):
    pool = scratch.pool()
    key = (STORAGE_POOL, pool.UUIDString())
    seen = _walk(sink, key, [
        (lambda: None, "lifecycle.defined", {"name": pool.name(), "state": "inactive",
                                             "active": False, "persistent": True}),
        (pool.create, "lifecycle.started", {"state": "running", "active": True}),
    ])
    vol = pool.createXML("<volume><name>disk0</name><capacity>1048576</capacity>"
                         "<allocation>4096</allocation></volume>")
    vol_key = (STORAGE_VOLUME, vol.key())
    seen = _walk(sink, key, [(pool.refresh, "refresh", {"allocation": 4096})], seen)
    added = next_change(sink, vol_key, 0)
    assert (added.event, added.origin) == ("added", RECONCILED)
    assert added.state == {"key": vol.key(), "name": "disk0", "path": vol.path(),
                           "pool": pool.UUIDString(), "capacity": 1048576}

    seen = _walk(sink, key, [(pool.destroy, "lifecycle.stopped", {"state": "inactive"})], seen)
    removed = next_change(sink, vol_key, 1)
    assert (removed.event, removed.origin, removed.state) == ("removed", RECONCILED, None)
    _walk(sink, key, [(pool.undefine, "lifecycle.undefined", None)], seen)


def test_node_device_creation_and_deletion_publish_changes(adapter, sink, libvirt_conn):
    dev = libvirt_conn.nodeDeviceCreateXML(
        "<device><parent>scsi_host1</parent><capability type='scsi_host'>"
        "<capability type='fc_host'><wwnn>2000000012341234</wwnn><wwpn>1000000012341234</wwpn>"
        "</capability></capability></device>")
    key = (NODE_DEVICE, dev.name())
    try:
        created = next_change(sink, key, 0)
        assert created.event == "lifecycle.created"
        assert created.state["parent"] == "scsi_host1"
        assert "scsi_host" in created.state["capabilities"]
    finally:
        dev.destroy()
    deleted = next_change(sink, key, 1)
    assert (deleted.event, deleted.state) == ("lifecycle.deleted", None)


def test_events_of_each_object_are_published_in_libvirt_order(sink, scratch):
    with running_adapter(sink, workers=4):
        domains = [scratch.domain(start=True) for _ in range(3)]
        keys = [(DOMAIN, dom.UUIDString()) for dom in domains]
        for key in keys:
            wait_until(lambda k=key: len(sink.changes(k)) == 2, what=f"{key} defined and started")
        for _ in range(15):
            for dom in domains:
                dom.suspend()
                dom.resume()
        for key in keys:
            changes = wait_until(lambda k=key: len(sink.changes(k)) >= 32 and sink.changes(k),
                                 what=f"30 more changes of {key}")
            assert [c.event for c in changes[2:]] == [
                "lifecycle.suspended.paused", "lifecycle.resumed.unpaused"] * 15
            assert sink.published_states()[key]["state"] == "running"


def test_every_event_kind_of_the_installed_libvirt_python_is_subscribed(libvirt_conn):
    domain_kinds = {name.removeprefix("VIR_DOMAIN_EVENT_ID_").lower()
                    for name in dir(libvirt) if name.startswith("VIR_DOMAIN_EVENT_ID_")}
    assert {"lifecycle", "reboot", "tray_change", "device_removed", "block_threshold",
            "memory_failure"} <= domain_kinds
    assert set(SOURCES[0].kinds()) == domain_kinds
    undo = register_events(libvirt_conn, lambda *event: None)
    try:
        assert len(undo) == sum(len(source.kinds()) for source in SOURCES)
    finally:
        deregister(undo)
