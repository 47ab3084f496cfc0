"""The agent's status endpoint (/metrics, /healthz, /readyz) and the counters that other
components keep (journal bounds and coalescing, quarantine, reconcile differences), each checked
against a truth counted independently of the metrics code."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

from harness import wait_until
from harness.agent import agent_config, running_agent
from harness.libvirt_side import Scratch, running_adapter
from harness.memory_sink import MemorySink
from harness.status import get, sample, scrape
from journal import Journal
from relay.agent import Agent
from relay.agent.metrics import AgentMetrics
from relay.changes import RECONCILED
from relay.status import StatusServer

NO_BROKER = "amqp://127.0.0.1:9"  # discard port: nothing speaks AMQP there


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_scraping_often_does_not_open_a_journal_connection_per_scrape(tmp_path):
    journal = Journal(tmp_path / "journal.db", "host-fd")
    metrics = AgentMetrics()
    metrics.oldest_undelivered.set_function(journal.oldest_undelivered_age)
    server = StatusServer("127.0.0.1:0", metrics.registry, lambda: (True, {}))
    server.start()
    try:
        get(f"http://127.0.0.1:{server.port}/metrics")
        before = open_fds()
        for _ in range(100):
            assert get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
        # a connection per scrape would hold two more descriptors each (database and WAL)
        assert open_fds() - before < 5
    finally:
        server.stop()
        journal.close()


def test_a_broken_collector_answers_500_and_the_endpoint_keeps_serving(tmp_path):
    metrics = AgentMetrics()
    broken = {"on": True}

    def value() -> float:
        if broken["on"]:
            raise RuntimeError("cannot read")
        return 1.0

    metrics.backlog_entries.set_function(value)
    server = StatusServer("127.0.0.1:0", metrics.registry, lambda: (True, {"status": "ok"}))
    server.start()
    try:
        status, body = get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 500 and b"cannot read" in body
        assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, b"ok\n")
        broken["on"] = False
        assert sample(scrape(server.port), "virtrelay_outbox_backlog_entries") == 1.0
        assert get(f"http://127.0.0.1:{server.port}/nowhere")[0] == 404
    finally:
        server.stop()


def test_the_agent_exports_what_its_journal_and_libvirt_adapter_count(tmp_path, libvirt_conn):
    config = agent_config(tmp_path, [NO_BROKER])
    with running_agent(config) as agent:
        wait_until(lambda: agent.libvirt.reconcile_passes, what="the first reconcile pass")
        names = {name for name, _ in scrape(agent.status.port)}
        wired = {"virtrelay_agent_info", "virtrelay_reconcile_differences_total"}
        assert wired <= names, (
            "relay/agent/agent.py must call `self.metrics.watch(self.journal, self.libvirt)` once "
            "both exist (docs/metrics.md); missing: " + ", ".join(sorted(wired - names)))
        assert sample(scrape(agent.status.port), "virtrelay_reconcile_differences_total",
                      event="added") == agent.journal.last_seq > 0


def test_healthz_and_readyz_without_a_broker(tmp_path, libvirt_conn):
    config = agent_config(tmp_path, [NO_BROKER])
    with running_agent(config) as agent:
        base = f"http://127.0.0.1:{agent.status.port}"
        assert get(f"{base}/healthz") == (200, b"ok\n")
        wait_until(lambda: agent.link.last_error and agent.journal.backlog[0],
                   what="a failed broker connect and a journaled reconcile")
        status, body = get(f"{base}/readyz")
        details = json.loads(body)
        assert status == 200, details  # a missing broker degrades, it does not unready
        assert details["status"] == "degraded" and details["broker"] == "down"
        assert details["libvirt"] == "up" and details["host"] == config.host_id
        assert details["broker_error"]
        assert details["backlog_entries"] > 0
        samples = scrape(agent.status.port)
        assert sample(samples, "virtrelay_broker_connected") == 0
        assert sample(samples, "virtrelay_libvirt_connected") == 1


def test_readyz_is_503_while_libvirt_is_unreachable(tmp_path):
    config = agent_config(tmp_path, [NO_BROKER], **{"libvirt.uri": f"test://{tmp_path}/no.xml"})
    agent = Agent(config)
    agent.start()
    try:
        base = f"http://127.0.0.1:{agent.status.port}"
        wait_until(lambda: agent.libvirt.connect_failures > 0, what="a failed libvirt connect")
        status, body = get(f"{base}/readyz")
        assert status == 503 and json.loads(body)["status"] == "not-ready"
        assert get(f"{base}/healthz")[0] == 200
        assert sample(scrape(agent.status.port), "virtrelay_libvirt_connected") == 0
    finally:
        agent.stop()


def test_drops_coalescing_and_quarantine_equal_what_the_journal_holds(tmp_path, libvirt_conn):
    """A bounded journal with no broker: statistics samples coalesce, the drop-oldest bound
    drops entries; the journal file was corrupt at start."""
    journal_path = tmp_path / "bounded-journal.db"
    journal_path.write_bytes(b"this is not an SQLite database" * 100)
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("bounded", start=True)
    config = agent_config(tmp_path, [NO_BROKER], **{
        "journal.path": str(journal_path), "journal.max_entries": 40,
        "journal.policy": "drop-oldest", "libvirt.stats_interval": 0.1})
    try:
        with running_agent(config) as agent:
            assert list(journal_path.parent.glob("bounded-journal.db.corrupt-*"))
            for i in range(60):  # more events than the bound holds
                domain.suspend() if i % 2 == 0 else domain.resume()

            def truth() -> dict[str, int]:
                """Seqs are dense and never reused, nothing was delivered or pruned: every seq
                missing from the outbox was dropped; coalesced rows stay as tombstones."""
                rows = list(agent.journal.entries())
                return {"dropped": agent.journal.last_seq - len(rows),
                        "coalesced": sum(1 for row in rows if row["state"] == "coalesced")}

            wait_until(lambda: truth()["dropped"] > 0 and truth()["coalesced"] > 0,
                       timeout=30, what="drops and coalesced samples")
            agent.libvirt.stop()  # no more changes: the journal holds still
            agent.journal.prune()  # a blocking write: every queued append is committed
            samples, counted = scrape(agent.status.port), truth()
            assert sample(samples, "virtrelay_outbox_dropped_total",
                          reason="drop-oldest") == counted["dropped"]
            assert sample(samples, "virtrelay_outbox_coalesced_total") == counted["coalesced"]
            assert sample(samples, "virtrelay_journal_quarantined_total") == 1
            assert sample(samples, "virtrelay_outbox_backlog_entries") <= 40
            info = [labels for (name, labels), _ in samples.items()
                    if name == "virtrelay_agent_info"]
            assert info == [(("epoch", agent.journal.epoch), ("host_id", config.host_id),
                             ("version", "0.1.0"))]
    finally:
        scratch.cleanup()


def _reconciled_by_event(changes) -> dict[str, int]:
    return dict(collections.Counter(c.event for c in changes if c.origin == RECONCILED))


@pytest.mark.parametrize("changed_while_stopped", [False, True])
def test_reconcile_differences_count_what_reconcile_published(libvirt_conn,
                                                               changed_while_stopped):
    sink = MemorySink()
    scratch = Scratch(libvirt_conn)
    try:
        with running_adapter(sink) as adapter:
            first_pass = _reconciled_by_event(sink.changes())
            assert adapter.reconcile_differences == first_pass
            assert set(first_pass) == {"added"}  # nothing was published yet
            kept, gone = scratch.domain("kept", start=True), scratch.domain("gone")
            wait_until(lambda: {("domain", kept.UUIDString()), ("domain", gone.UUIDString())}
                       <= set(sink.published_states()), what="both domains published")
        if changed_while_stopped:
            kept.suspend()
            gone.undefine()
            scratch.domain("new")
        mark = sink.count()
        with running_adapter(sink) as adapter:
            found = _reconciled_by_event(sink.changes_since(mark))
            assert adapter.reconcile_differences == found
            if changed_while_stopped:
                assert found.get("removed") and found.get("added")
            else:
                assert found == {}
    finally:
        scratch.cleanup()


def test_metrics_doc_lists_the_health_endpoints():
    text = (Path(__file__).resolve().parents[2] / "docs/metrics.md").read_text()
    for needle in ("/healthz", "/readyz", "not-ready", "degraded", "503"):
        assert needle in text
