"""Statistics are sampled periodically, kept out of state, and unsupported calls are skipped."""

from __future__ import annotations

import logging

import pytest

from harness import wait_until
from harness.libvirt_side import Scratch, running_adapter
from harness.memory_sink import MemorySink
from relay.changes import DOMAIN, LIVE, NODE, STATS, STORAGE_VOLUME


@pytest.fixture
def scratch(libvirt_conn):
    objects = Scratch(libvirt_conn)
    yield objects
    objects.cleanup()


def _samples(sink, key, count):
    return wait_until(lambda: len(s := sink.changes(key, origin=STATS)) >= count and s,
                      what=f"{count} statistics samples of {key}")


@pytest.fixture
def sink_and_domain(scratch):
    sink = MemorySink()
    with running_adapter(sink, stats_interval=0.1):
        dom = scratch.domain("sampled", start=True, devices=True)
        wait_until(lambda: len(sink.changes((DOMAIN, dom.UUIDString()), origin=LIVE)) == 2,
                   what="the domain to be published defined and started")
        yield sink, dom


def test_running_domains_are_sampled_periodically_without_touching_their_state(sink_and_domain):
    sink, dom = sink_and_domain
    key = (DOMAIN, dom.UUIDString())
    published = sink.published_states()[key]
    first, second = _samples(sink, key, 2)[:2]
    assert (first.event, first.state, second.observed_at > first.observed_at) == (
        "stats", None, True)
    stats = second.stats
    assert stats["cpu_time"] > 0
    assert stats["memory"]["actual"] == 65536
    assert set(stats["block"]) == {"vda"} and stats["block"]["vda"]["rd_bytes"] >= 0
    assert set(stats["interface"]) == {f"{dom.name()}-nic"}
    assert set(stats["interface"][f"{dom.name()}-nic"]) >= {"rx_bytes", "tx_bytes"}
    assert second.coalesce_key == f"stats:domain:{key[1]}"
    assert sink.published_states()[key] == published


def test_inactive_domains_are_not_sampled_and_volumes_report_their_allocation(scratch):
    sink = MemorySink()
    pool = scratch.pool()
    pool.create()
    vol = pool.createXML("<volume><name>v</name><capacity>1048576</capacity>"
                         "<allocation>8192</allocation></volume>")
    idle = scratch.domain("idle")
    with running_adapter(sink, stats_interval=0.1):
        (sample,) = _samples(sink, (STORAGE_VOLUME, vol.key()), 1)[:1]
        assert sample.stats == {"allocation": 8192}
        _samples(sink, (STORAGE_VOLUME, vol.key()), 3)
        assert sink.changes((DOMAIN, idle.UUIDString()), origin=STATS) == []


def test_a_call_the_driver_does_not_support_is_tried_once_per_connection(caplog):
    """The test driver lacks virNodeGetMemoryStats: logged once, then skipped every cycle."""
    sink = MemorySink()
    caplog.set_level(logging.INFO, logger="relay.libvirt.stats")
    with running_adapter(sink, stats_interval=0.05) as adapter:
        node_key = next(key for key in sink.published_states() if key[0] == NODE)
        samples = _samples(sink, node_key, 4)
        assert {"mhz", "cpu"} <= set(samples[-1].stats) and "memory" not in samples[-1].stats
        assert adapter.connects == 1
    refusals = [r for r in caplog.records if "node.memory_stats not supported" in r.getMessage()]
    assert len(refusals) == 1
