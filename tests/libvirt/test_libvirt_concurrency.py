"""One object stuck in a blocking libvirt call must not hold up the others; lanes keep order."""

from __future__ import annotations

import os
import threading

import pytest

from harness import wait_until
from harness.libvirt_side import Scratch, next_change, running_adapter
from harness.memory_sink import MemorySink
from relay.changes import DOMAIN, LIVE, RECONCILED
from relay.lanes import Lanes


@pytest.fixture
def scratch(libvirt_conn):
    objects = Scratch(libvirt_conn)
    yield objects
    objects.cleanup()


def test_a_domain_blocked_in_libvirt_does_not_stop_events_of_other_domains(
        scratch, libvirt_conn, tmp_path):
    """The test driver holds a domain's lock while ``save`` opens its file: saving to a FIFO
    that nobody reads blocks every libvirt call on that domain, and only on that one."""
    sink = MemorySink()
    fifo = tmp_path / "save-fifo"
    os.mkfifo(fifo)
    with running_adapter(sink, workers=2) as adapter:
        stuck, other = scratch.domain("stuck", start=True), scratch.domain("other", start=True)
        stuck_key, other_key = (DOMAIN, stuck.UUIDString()), (DOMAIN, other.UUIDString())
        for key in (stuck_key, other_key):
            wait_until(lambda k=key: len(sink.changes(k)) == 2, what=f"{key} defined, started")
        saving = threading.Thread(target=stuck.save, args=(str(fifo),), daemon=True)
        saving.start()
        probes: list[threading.Thread] = []
        try:
            wait_until(lambda: _blocks(probes, lambda: libvirt_conn.lookupByUUIDString(
                stuck_key[1]).info()), what="the saving domain to block lookups")
            stuck_changes = len(sink.changes(stuck_key))
            adapter.reconcile_objects([stuck_key])  # its lane now blocks in libvirt

            other.suspend()
            change = next_change(sink, other_key, 2, timeout=5)
            assert (change.event, change.origin) == ("lifecycle.suspended.paused", LIVE)
            assert change.state["state"] == "paused"
            assert saving.is_alive() and len(sink.changes(stuck_key)) == stuck_changes
        finally:
            with open(fifo, "rb") as reader:  # unblock the save
                reader.read()
            for thread in [saving, *probes]:
                thread.join(10)
        events = wait_until(lambda: sink.changes(stuck_key)[stuck_changes:][1:],
                            what="the stuck domain's changes once unblocked")
        assert [c.origin for c in sink.changes(stuck_key)[stuck_changes:]] == [RECONCILED, LIVE]
        assert events[0].event == "lifecycle.stopped.saved"
        assert sink.published_states()[stuck_key]["state_reason"] == "saved"


def _blocks(probes: list[threading.Thread], call, within: float = 0.3) -> bool:
    """Whether ``call`` is still running after ``within`` s, in a thread added to ``probes``."""
    probes.append(threading.Thread(target=call, daemon=True))
    probes[-1].start()
    probes[-1].join(within)
    return probes[-1].is_alive()


def test_lanes_run_each_keys_tasks_in_order_and_keys_in_parallel():
    lanes = Lanes(workers=3)
    lanes.start()
    release = threading.Event()
    done: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    try:
        lanes.submit("blocked", release.wait)
        for i in range(200):
            for key in done:
                lanes.submit(key, lambda k=key, n=i: done[k].append(n))
        wait_until(lambda: all(len(seq) == 200 for seq in done.values()),
                   what="every key's tasks to run beside the blocked lane")
        assert all(seq == list(range(200)) for seq in done.values())
        assert lanes.pending() == 1
    finally:
        release.set()
        lanes.stop()

