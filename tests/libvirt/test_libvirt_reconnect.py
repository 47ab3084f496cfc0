"""The adapter survives libvirtd dying under it: close callback, backoff, reconnect, reconcile.

A private libvirtd (harness/libvirtd.py) serves its embedded test driver over a unix
socket; SIGKILL closes the connection for real, and the driver's state resets on restart.
"""

from __future__ import annotations

import contextlib
import os
import time

import libvirt
import pytest

from chaos.libvirtd import private_libvirtd
from harness import wait_until
from harness.libvirt_side import DOMAIN_XML, Scratch, next_change, running_adapter
from harness.memory_sink import MemorySink
from relay.changes import DOMAIN, LIVE, RECONCILED


@pytest.fixture
def libvirtd():
    with private_libvirtd() as daemon:
        pid = daemon.process.pid
        yield daemon
    assert not os.path.exists(f"/proc/{pid}"), "libvirtd outlived the test"


def _restart_and_wait_for_reconnect(daemon, adapter) -> None:
    """Kill libvirtd, see the close callback and failed retries, start it, see the reconnect."""
    closes, failures, reconnects = (adapter.closed_by_libvirt, adapter.connect_failures,
                                    adapter.reconnects)
    daemon.kill()
    wait_until(lambda: adapter.closed_by_libvirt == closes + 1 and not adapter.connected,
               what="the close callback to report the dead connection")
    wait_until(lambda: adapter.connect_failures >= failures + 2,
               what="reconnect attempts to fail and back off while libvirtd is down")
    daemon.start()
    wait_until(lambda: adapter.connected and adapter.reconnects == reconnects + 1,
               what="the adapter to reconnect")


def test_restart_of_an_unchanged_libvirtd_reconnects_and_publishes_nothing(libvirtd):
    sink = MemorySink()
    states = []
    # liveness checks off: only libvirt's close callback can notice the loss quickly
    with running_adapter(sink, libvirtd.uri, liveness_interval=3600,
                         on_state_change=states.append) as adapter:
        published, mark = sink.published_states(), sink.count()
        assert len(published) > 1
        _restart_and_wait_for_reconnect(libvirtd, adapter)
        assert adapter.reconcile(timeout=10)
        assert sink.changes_since(mark) == [], "a reconnect must not republish the host"
        assert sink.published_states() == published
        assert states == [True, False, True]


def test_changes_lost_with_a_libvirtd_restart_are_published_as_differences(libvirtd):
    sink = MemorySink()
    with running_adapter(sink, libvirtd.uri, liveness_interval=3600) as adapter:
        conn = libvirt.open(libvirtd.uri)
        try:
            builtin = conn.lookupByName("test")
            builtin.suspend()
            created = conn.defineXML(DOMAIN_XML.format(
                name=Scratch.name("lost"), memory=65536, vcpus=1, devices=""))
            builtin_key = (DOMAIN, builtin.UUIDString())
            created_key = (DOMAIN, created.UUIDString())
            assert next_change(sink, builtin_key, 1).event == "lifecycle.suspended.paused"
            assert next_change(sink, created_key, 0).origin == LIVE
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        mark = sink.count()

        _restart_and_wait_for_reconnect(libvirtd, adapter)  # the daemon forgets both changes
        changes = wait_until(lambda: (c := sink.changes_since(mark))[1:] and c,
                             what="the reconnect's reconcile pass to publish two changes")
        assert adapter.reconcile(timeout=10)
        assert sink.changes_since(mark) == changes, "only the two differences are published"
        by_key = {c.key: c for c in changes}
        assert set(by_key) == {builtin_key, created_key}
        assert {c.origin for c in changes} == {RECONCILED}
        assert (by_key[created_key].event, by_key[created_key].state) == ("removed", None)
        assert by_key[builtin_key].event == "changed"
        assert by_key[builtin_key].state["state"] == "running"


def test_reconnect_attempts_back_off_exponentially_up_to_the_cap(libvirtd):
    """With delays 0.05, 0.1, 0.2, then capped at 0.4 s, each jittered to 50-100 %, eight
    failed attempts take 1.2 to 2.4 s: far more without backoff, far less without the cap."""
    with running_adapter(MemorySink(), libvirtd.uri, backoff_initial=0.05,
                         backoff_max=0.4) as adapter:
        libvirtd.kill()
        wait_until(lambda: not adapter.connected, what="the adapter to notice libvirtd died")
        failures, started = adapter.connect_failures, time.monotonic()
        wait_until(lambda: adapter.connect_failures >= failures + 8, timeout=10,
                   what="eight failed reconnect attempts")
        assert 1.1 <= time.monotonic() - started <= 5.0
        libvirtd.start()
        wait_until(lambda: adapter.connected, what="the adapter to reconnect")
